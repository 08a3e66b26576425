"""The training engine, one concept per module, read in this order:

- ``device``: where the work runs (CUDA under torchrun, else CPU), seeds, copies, autocast, anchors on the device
- ``distributed``: torchrun process group, ranks failing together, the zero term DDP needs
- ``streams``: resumable samplers and the endless batch streams a run takes turns on; steps per epoch
- ``optim``: optimiser and learning-rate schedule
- ``run_state``: a run's files: atomic writes, the resumable state, refusing a clashing start or resume, metrics log
- ``progress``: progress bar and throughput
- ``loop``: ``fit``, the one training loop, with hooks (``Hooks``) to observe or interrupt it

Tasks built on it live in ``sadpipe.tasks`` (supervised training, distillation, the teacher dump).
"""
