"""Optimiser and learning-rate schedule of a training run (``[teacher.train]`` / ``[student.train]``)."""

from __future__ import annotations

import math

import torch


def build_optimizer(model: torch.nn.Module, train_cfg) -> torch.optim.Optimizer:
    """AdamW or SGD over the trainable parameters; no weight decay on norms and biases (1-d tensors),
    as is usual for detectors."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": train_cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if train_cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=train_cfg.lr, momentum=train_cfg.momentum)
    return torch.optim.AdamW(groups, lr=train_cfg.lr)


def lr_factor(step: int, total_steps: int, train_cfg) -> float:
    """Linear warm-up, then cosine decay (adamw) or x0.1 at each milestone fraction (sgd, the paper)."""
    warmup = train_cfg.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    if train_cfg.optimizer == "sgd":
        return 0.1 ** sum(step >= m * total_steps for m in train_cfg.lr_milestones)
    progress = (step - warmup) / max(1, total_steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
