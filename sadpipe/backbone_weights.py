"""ResNet backbone weights: the check that a frozen-BatchNorm backbone starts from trained weights,
and stand-in weights for tests and demos.

Why the check. With ``backbone_norm = "frozen_bn"`` (torchvision's and the paper's choice when
fine-tuning ImageNet weights) every BatchNorm of the backbone is a fixed affine map built from
the loaded running statistics; nothing ever updates them. Without weights those statistics are
the identity (mean 0, variance 1), so nothing normalises the activations of a random ResNet:
they grow block after block (a ResNet-101 reaches ~5e5 by layer4 at 600 px and its first
training step gives a nan loss), and a ResNet that survives that trains from a crippled start.
``check_pretrained_backbone`` refuses such a model where training builds it, naming the fix.

Why stand-ins. Real ImageNet weights cannot be downloaded here (and nothing in sadpipe
downloads). ``make_standin_backbone_weights`` makes weights that *behave* like trained ones
under frozen BatchNorm: activations of order one at every stage, every block alive. They are
NOT ImageNet weights and carry no knowledge of images; they exist so tests and demos can run the
COCO pipelines (frozen BatchNorm, the paper's settings) end to end. How:

- torchvision's random initialisation of the ResNet (Kaiming normal convolutions);
- the last BatchNorm scale of every residual branch set to ``residual_scale`` (0.2): small, so
  the residual stream does not grow with depth, but not zero (``zero_init_residual``), because a
  frozen scale of 0 would block every gradient into the branch for good;
- BatchNorm running statistics calibrated on a few batches of synthetic toy images, normalised
  as the pipelines normalise images, with the network in training mode and cumulative averaging
  (``momentum = None``), so the frozen statistics are the ones the layers actually see.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.models import resnet
from torchvision.ops import FrozenBatchNorm2d

from .config import ConfigError
from .data.toy import image_rng, render_toy_image

__all__ = ["BackboneWeightsError", "STANDIN_ARCHS", "make_standin_backbone_weights", "save_standin_backbone_weights",
           "has_identity_bn_statistics", "check_pretrained_backbone"]

STANDIN_ARCHS = {"resnet18": resnet.resnet18, "resnet34": resnet.resnet34,
                 "resnet50": resnet.resnet50, "resnet101": resnet.resnet101}
# ImageNet normalisation, as DEFAULTS["geometry"] image_mean / image_std
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


class BackboneWeightsError(ConfigError):
    """A frozen-BatchNorm backbone without trained weights; the message names the config key and the fix."""


def calibration_batch(seed: int, index: int, batch_size: int, image_size: int) -> torch.Tensor:
    """float32 [batch_size, 3, S, S]: toy train-style images, ImageNet-normalised."""
    images = [render_toy_image(image_rng(seed, "train", index * batch_size + j), "train", image_size)[0]
              for j in range(batch_size)]
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(_MEAN).view(1, 3, 1, 1)) / torch.tensor(_STD).view(1, 3, 1, 1)


def make_standin_backbone_weights(arch: str, *, seed: int = 0, batches: int = 4, batch_size: int = 8,
                                  image_size: int = 224, residual_scale: float = 0.2) -> dict[str, torch.Tensor]:
    """A torchvision-format ResNet state dict (``fc.*`` included) that behaves like trained weights.

    A stand-in for tests and demos, NOT ImageNet weights (see the module docstring). Deterministic
    for a given ``seed``. Cost: ``batches`` training-mode forwards of ``batch_size`` images at
    ``image_size`` px (about 10 s for a ResNet-101 on one CPU thread with the defaults).
    """
    if arch not in STANDIN_ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(STANDIN_ARCHS)}")
    if batches < 1 or batch_size < 2:
        raise ValueError("calibration needs batches >= 1 and batch_size >= 2 (BatchNorm statistics of a batch)")
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = STANDIN_ARCHS[arch](weights=None)
    finally:
        torch.random.set_rng_state(generator_state)
    with torch.no_grad():
        for block in model.modules():
            last_bn = getattr(block, "bn3", None) if isinstance(block, resnet.Bottleneck) else \
                getattr(block, "bn2", None) if isinstance(block, resnet.BasicBlock) else None
            if last_bn is not None:
                last_bn.weight.fill_(residual_scale)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for index in range(batches):
            model(calibration_batch(seed, index, batch_size, image_size))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def save_standin_backbone_weights(arch: str, out: str | Path, **kwargs) -> Path:
    """Write ``make_standin_backbone_weights(arch, **kwargs)`` with ``torch.save`` (temp file + rename)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = make_standin_backbone_weights(arch, **kwargs)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(out)
    return out


def has_identity_bn_statistics(module: nn.Module) -> bool:
    """True when ``module`` has frozen BatchNorm layers and every one has running mean 0 and variance 1.

    That is a fresh ResNet's state: trained weights never have it. Trainable BatchNorm
    (``nn.BatchNorm2d``) is not looked at: it learns its statistics while training.
    """
    frozen = [m for m in module.modules() if isinstance(m, FrozenBatchNorm2d)]
    return bool(frozen) and all(bool(torch.all(m.running_mean == 0)) and bool(torch.all(m.running_var == 1))
                                for m in frozen)


def check_pretrained_backbone(model: nn.Module, role: str, backbone_weights: str | Path | None,
                              allow_random: bool) -> None:
    """Refuse a detector about to be trained whose frozen-BatchNorm backbone has no trained weights.

    ``model`` is a ``sadpipe.models.Detector`` as built for training from ``cfg.<role>.model``
    (``backbone_weights`` is that table's file, empty or None when unset). Raises
    ``BackboneWeightsError`` unless ``allow_random`` (``<role>.model.allow_random_backbone``).
    """
    if allow_random or not has_identity_bn_statistics(model.backbone.body):
        return
    arch = model.spec["arch"]
    file_arch = "resnet50" if arch.startswith("retinanet_resnet50") else arch
    opt_in = (f"to train from a random backbone anyway, opt in with --set {role}.model.allow_random_backbone=true "
              f"(or use backbone_norm = \"bn\", which trains BatchNorm)")
    if not backbone_weights:
        raise BackboneWeightsError(
            f"{role}.model: arch {arch} with backbone_norm = \"frozen_bn\" and no backbone_weights would train from a "
            f"random backbone whose frozen BatchNorm never normalises anything (activations explode, the loss goes "
            f"nan or training starts crippled). Pass ImageNet weights: --set {role}.model.backbone_weights="
            f"/path/{file_arch}.pth (a local torchvision state dict; for tests and demos "
            f"`sadpipe make-backbone-weights --arch {file_arch} OUT` makes a stand-in); {opt_in}")
    raise BackboneWeightsError(
        f"{role}.model.backbone_weights = {str(backbone_weights)!r}: every BatchNorm in it has running mean 0 and "
        f"variance 1, so these are untrained weights (e.g. torchvision's {file_arch}() saved without ImageNet "
        f"weights), not ImageNet weights; with frozen BatchNorm they let activations explode (loss nan). Use real ImageNet "
        f"weights (or for tests and demos `sadpipe make-backbone-weights --arch {file_arch} OUT`); {opt_in}")
