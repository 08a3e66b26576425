"""Image preprocessing shared by teacher training, the teacher dump and the student.

The cache stores the teacher's outputs for exactly this preprocessing, so it is described by
a plain dict (``Preprocess.to_dict``) that is saved in checkpoints and in the store, and the
cache reader refuses a student whose preprocessing differs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .config import ConfigError
from .geometry import AnchorLayout, padded_size, resized_size


CHANNEL_ORDERS = ("RGB", "BGR")
PIXEL_SCALES = (1.0, 255.0)


@dataclass(frozen=True)
class Preprocess:
    """Resize + normalisation: ``(pixels in [0, pixel_scale], in channel_order) - image_mean) / image_std``.

    The default (RGB, pixel_scale 1, ImageNet mean/std) is torchvision's; MMDetection's
    pytorch-style RetinaNets compute the same thing on a 0-255 scale (mean 123.675 = 255 * 0.485,
    std 58.395 = 255 * 0.229, ...), so they use the default. detectron2's MSRA-initialised models
    take BGR pixels in 0-255 minus a BGR mean with std 1: ``channel_order="BGR"``,
    ``pixel_scale=255``, ``image_mean=(103.53, 116.28, 123.675)``, ``image_std=(1, 1, 1)``; mean
    and std are listed in the network's channel order and on the pixel_scale scale.
    """

    min_size: int
    max_size: int
    pad_divisor: int = 128
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    channel_order: str = "RGB"
    pixel_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.channel_order not in CHANNEL_ORDERS:
            raise ValueError(f"channel_order {self.channel_order!r}: use 'RGB' or 'BGR'")
        if float(self.pixel_scale) not in PIXEL_SCALES:
            raise ValueError(f"pixel_scale {self.pixel_scale!r}: use 1.0 (pixels in 0-1) or 255.0 (pixels in 0-255)")
        object.__setattr__(self, "pixel_scale", float(self.pixel_scale))

    def sizes(self, height: int, width: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """((h, w) resized, (ph, pw) padded) for an original image of height x width."""
        hw = resized_size(height, width, self.min_size, self.max_size)
        return hw, padded_size(*hw, self.pad_divisor)

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        """uint8 [H, W, 3] RGB -> float32 [3, h, w] resized and normalised (not padded), channels in channel_order."""
        h, w = self.sizes(image.shape[0], image.shape[1])[0]
        x = torch.tensor(image).permute(2, 0, 1).float()
        if self.pixel_scale == 1.0:
            x = x.div_(255.0)
        if self.channel_order == "BGR":
            x = x.flip(0)
        if (h, w) != tuple(image.shape[:2]):
            x = F.interpolate(x[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        mean = torch.tensor(self.image_mean).view(3, 1, 1)
        std = torch.tensor(self.image_std).view(3, 1, 1)
        return (x - mean) / std

    def to_dict(self) -> dict:
        """JSON-able; channel_order and pixel_scale appear only when not at their default, so the dict
        of a default preprocessing is what it was before they existed (stores and checkpoints compare it)."""
        d = asdict(self)
        if self.channel_order == "RGB":
            del d["channel_order"]
        if self.pixel_scale == 1.0:
            del d["pixel_scale"]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def geometry_from_config(cfg: dict) -> tuple[AnchorLayout, Preprocess]:
    """The [geometry] table as (AnchorLayout, Preprocess); an inconsistent table is a ConfigError."""
    g = cfg["geometry"]
    try:
        layout = AnchorLayout(strides=tuple(g["strides"]), sizes=tuple(float(s) for s in g["anchor_sizes"]),
                              aspect_ratios=tuple(float(r) for r in g["aspect_ratios"]),
                              scales=tuple(float(s) for s in g["scales"]), pad_divisor=g["pad_divisor"],
                              rounded_anchors=bool(g.get("rounded_anchors", True)))
        pre = Preprocess(min_size=g["min_size"], max_size=g["max_size"], pad_divisor=g["pad_divisor"],
                         image_mean=tuple(g["image_mean"]), image_std=tuple(g["image_std"]),
                         channel_order=g.get("channel_order", "RGB"), pixel_scale=float(g.get("pixel_scale", 1.0)))
    except ValueError as e:  # a user's config mistake: the CLI reports ConfigError as one line
        raise ConfigError(f"[geometry] in the config: {e}") from None
    return layout, pre


def hflip(image: np.ndarray, boxes: np.ndarray | None = None):
    """Mirror an image uint8 [H, W, 3] and its boxes float32 [N, 4] (x1, y1, x2, y2) left-right."""
    flipped = image[:, ::-1].copy()
    if boxes is None:
        return flipped, None
    w = image.shape[1]
    out = boxes.copy()
    out[:, 0] = w - boxes[:, 2]
    out[:, 2] = w - boxes[:, 0]
    return flipped, out


def scale_boxes(boxes: np.ndarray, from_hw: tuple[int, int], to_hw: tuple[int, int]) -> np.ndarray:
    """Rescale boxes [N, 4] from one image size to another (per axis)."""
    sy, sx = to_hw[0] / from_hw[0], to_hw[1] / from_hw[1]
    return (boxes * np.array([sx, sy, sx, sy], dtype=np.float32)).astype(np.float32)


def pad_batch(images: list[torch.Tensor], padded_sizes: list[tuple[int, int]]) -> tuple[torch.Tensor, tuple[int, int]]:
    """Stack images float32 [3, h_i, w_i] top-left on a zero canvas [B, 3, PH, PW].

    The canvas is the largest per-image padded size, so each image's own padded grid is the
    top-left block of the batch grid (geometry.image_to_batch_index).
    """
    ph = max(p[0] for p in padded_sizes)
    pw = max(p[1] for p in padded_sizes)
    batch = images[0].new_zeros((len(images), 3, ph, pw))
    for i, img in enumerate(images):
        batch[i, :, : img.shape[1], : img.shape[2]] = img
    return batch, (ph, pw)
