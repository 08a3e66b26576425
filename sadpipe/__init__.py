"""sadpipe: Semi-supervised Adaptive Distillation for single-stage detectors.

Two offline stages: ``sadpipe dump-teacher`` writes a compressed Zarr cache of a teacher's
per-anchor logits; ``sadpipe train-student`` distills a student from that cache.
"""

__version__ = "0.1.0"
