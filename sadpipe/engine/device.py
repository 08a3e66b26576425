"""Where the work runs: the device (CUDA, the local rank's GPU under torchrun, else CPU), seeds,
host-to-device copies, mixed precision, and anchors kept on the device per canvas size."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from ..errors import TrainingError


def select_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when there is one (the local rank's GPU under torchrun), else CPU."""
    if name not in ("auto", "cpu", "cuda"):
        raise TrainingError(f"--device must be auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("--device cuda was asked for but no CUDA device is visible; use --device cpu")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def move_to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Non-blocking copy (the batch comes from pinned memory on CUDA)."""
    return tensor.to(device, non_blocking=device.type == "cuda")


def model_to(model: torch.nn.Module, device: torch.device, channels_last: bool = True) -> torch.nn.Module:
    """``model`` on ``device``, with its 4-d weights in channels-last layout unless ``channels_last`` is False.

    Convolutions then run channels-last whatever layout the images come in: on CPU (oneDNN) a
    RetinaNet student step is faster (``benchmarks/student_step.py --compare-layout``); on CUDA it
    is the layout tensor cores want under float16 autocast. Values are those of the contiguous
    layout up to float summation order; checkpoints load into either layout.
    """
    return model.to(device=device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def autocast(device: torch.device, enabled: bool):
    """float16 autocast on CUDA when enabled; a no-op context on CPU."""
    return torch.autocast(device_type=device.type, dtype=torch.float16, enabled=enabled and device.type == "cuda")


class AnchorCache:
    """Anchors (float32 [A_canvas, 4]) per canvas size (h, w), built once on the device."""

    def __init__(self, layout, device):
        self.layout, self.device, self.by_canvas = layout, device, {}

    def __call__(self, canvas: tuple[int, int]) -> torch.Tensor:
        if canvas not in self.by_canvas:
            self.by_canvas[canvas] = self.layout.anchors(canvas).to(self.device)
        return self.by_canvas[canvas]
