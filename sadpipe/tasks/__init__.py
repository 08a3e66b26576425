"""What sadpipe runs, each built on ``sadpipe.engine``:

- ``supervised``: a detector trained on the labeled images (``train-teacher``, or a student alone)
- ``distill``: a student distilled from the teacher cache (``train-student``: ADL, SAD and baselines)
- ``dump``: the teacher run once over the images, written to a teacher cache (``dump-teacher``)
"""
