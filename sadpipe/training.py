"""What every training loop here shares: device and torchrun setup, the resumable sampler,
optimiser and schedule, atomic training-state checkpoints, progress and JSON-lines metrics.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler
from tqdm import tqdm
from .errors import UserError


class TrainingError(UserError, RuntimeError):
    pass


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


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> DistInfo:
    """Join the torchrun process group if launched by torchrun (WORLD_SIZE > 1); NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class ResumableSampler(Sampler[int]):
    """Seeded per-epoch permutation, split across ranks, that can start mid-epoch.

    Rank r takes every world-th index of the epoch's permutation, truncated so all ranks get
    the same count (drop_last). ``start`` skips the first batches of a resumed epoch.
    """

    def __init__(self, length: int, *, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        self.length, self.seed, self.rank, self.world = length, seed, rank, world_size
        self.shuffle = shuffle
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.length // self.world - self.start

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            order = torch.randperm(self.length, generator=g).tolist()
        else:
            order = list(range(self.length))
        per_rank = self.length // self.world
        mine = order[self.rank::self.world][:per_rank]
        return iter(mine[self.start:])


def build_optimizer(model: torch.nn.Module, train_cfg: dict) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    # no weight decay on norms and biases (1-d tensors), as is usual for detectors trained with AdamW
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": train_cfg["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    if train_cfg["optimizer"] == "adamw":
        return torch.optim.AdamW(groups, lr=train_cfg["lr"])
    if train_cfg["optimizer"] == "sgd":
        return torch.optim.SGD(groups, lr=train_cfg["lr"], momentum=train_cfg["momentum"])
    raise TrainingError(f"train.optimizer must be adamw or sgd, got {train_cfg['optimizer']!r}")


def lr_factor(step: int, total_steps: int, train_cfg: dict) -> float:
    """Linear warm-up, then cosine decay (adamw) or x0.1 at each milestone fraction (sgd, the paper)."""
    warmup = train_cfg["warmup_steps"]
    if step < warmup:
        return (step + 1) / warmup
    if train_cfg["optimizer"] == "sgd":
        return 0.1 ** sum(step >= m * total_steps for m in train_cfg["lr_milestones"])
    progress = (step - warmup) / max(1, total_steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def plan_steps(num_images: int, train_cfg: dict, world_size: int, max_steps: int | None) -> tuple[int, int]:
    """(steps_per_epoch, total_steps). max_steps (CLI) overrides train.max_steps; both cap the epochs."""
    per_epoch = (num_images // world_size) // train_cfg["batch_size"]
    if per_epoch < 1:
        raise TrainingError(f"{num_images} images are fewer than one batch of {train_cfg['batch_size']} per rank")
    total = per_epoch * train_cfg["epochs"]
    cap = max_steps or train_cfg["max_steps"]
    return per_epoch, (cap if cap else total)


def save_train_state(path: Path, state: dict) -> None:
    """Write atomically: a crash mid-write leaves the previous state intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_train_state(path: Path) -> dict | None:
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


class MetricsLog:
    """Appends one JSON object per line; a resumed run drops lines past its resume step."""

    def __init__(self, path: Path, resume_step: int | None = None, enabled: bool = True):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            path.write_text("")
        elif path.exists():
            kept = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= resume_step]
            path.write_text("".join(ln + "\n" for ln in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def progress_bar(total_images: int, initial: int, desc: str, enabled: bool = True) -> tqdm:
    """Images/s and ETA; refreshes rarely when stderr is not a terminal (CI logs)."""
    tty = sys.stderr.isatty()
    return tqdm(total=total_images, initial=initial, desc=desc, unit="img", unit_scale=False, dynamic_ncols=True,
                mininterval=0.5 if tty else 30.0, disable=not enabled, file=sys.stderr)


class Throughput:
    def __init__(self):
        self.t0, self.images = time.perf_counter(), 0

    def add(self, n: int) -> None:
        self.images += n

    @property
    def images_per_s(self) -> float:
        return self.images / max(1e-9, time.perf_counter() - self.t0)


def move_to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Non-blocking copy (the batch comes from pinned memory on CUDA)."""
    return tensor.to(device, non_blocking=device.type == "cuda")
