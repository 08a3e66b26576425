"""Deterministic per-image geometry: resize, pad, anchors in torchvision's head order.

Every image is resized on its own (scale = min(min_size / short, max_size / long), sizes
floored, as torchvision's GeneralizedRCNNTransform does) and padded at right/bottom to a
multiple of ``pad_divisor`` (128 by default, the stride of P7), so every level's stride is
exact and an image's anchors never depend on the batch it lands in (docs/geometry.md, section
"Padding per image to 128").
A batch pads its images further to the largest padded size; an image's level-l grid is then
the top-left ``H_l x W_l`` block of the batch's level-l grid (``image_to_batch_index``).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field

import torch


def resized_size(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """(h, w) after scaling so the short side is min_size unless the long side exceeds max_size.

    Floors like torchvision's interpolate(scale_factor=s, recompute_scale_factor=True).
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    scale = min(min_size / min(height, width), max_size / max(height, width))
    return max(1, int(math.floor(height * scale))), max(1, int(math.floor(width * scale)))


def padded_size(height: int, width: int, divisor: int) -> tuple[int, int]:
    """(ph, pw): the smallest multiples of ``divisor`` that hold (height, width)."""
    return int(math.ceil(height / divisor) * divisor), int(math.ceil(width / divisor) * divisor)


@dataclass(frozen=True)
class AnchorLayout:
    """Anchor geometry of a RetinaNet head, identical to torchvision's AnchorGenerator order.

    Level l (P3..P7 by default) has stride ``strides[l]``, and per cell
    ``len(aspect_ratios) * len(scales)`` anchors of size ``sizes[l] * scale`` and aspect
    ratio h / w; anchor index inside a cell is ``ratio_index * len(scales) + scale_index``.

    ``rounded_anchors`` (default True) rounds each cell anchor's corners to whole pixels, as
    torchvision's AnchorGenerator does; MMDetection and detectron2 keep the float corners
    (e.g. half-width 20.16 instead of 20 for size 32 * 2^(1/3) at ratio 1). Teachers converted
    from those frameworks set it to False. Whatever the source framework's own per-cell order,
    the head's anchor rows always follow the order above (converters permute head channels).
    """

    strides: tuple[int, ...] = (8, 16, 32, 64, 128)
    sizes: tuple[float, ...] = (32, 64, 128, 256, 512)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    scales: tuple[float, ...] = (1.0, 2 ** (1 / 3), 2 ** (2 / 3))
    pad_divisor: int = 128
    version: int = field(default=1)
    rounded_anchors: bool = True

    def __post_init__(self) -> None:
        if len(self.strides) != len(self.sizes):
            raise ValueError("anchor layout needs one size per level (strides and sizes differ in length)")
        if self.pad_divisor % max(self.strides) != 0:
            raise ValueError(
                f"pad_divisor {self.pad_divisor} must be a multiple of the largest stride {max(self.strides)} "
                "or the coarse levels' strides are not exact"
            )

    @property
    def num_levels(self) -> int:
        return len(self.strides)

    @property
    def anchors_per_cell(self) -> int:
        return len(self.aspect_ratios) * len(self.scales)

    def grid_sizes(self, padded_hw: tuple[int, int]) -> list[tuple[int, int]]:
        ph, pw = padded_hw
        if ph % self.pad_divisor or pw % self.pad_divisor:
            raise ValueError(f"padded size {ph}x{pw} is not a multiple of {self.pad_divisor}")
        return [(ph // s, pw // s) for s in self.strides]

    def anchors_per_level(self, padded_hw: tuple[int, int]) -> list[int]:
        return [h * w * self.anchors_per_cell for h, w in self.grid_sizes(padded_hw)]

    def num_anchors(self, padded_hw: tuple[int, int]) -> int:
        return sum(self.anchors_per_level(padded_hw))

    def max_anchors(self, min_size: int, max_size: int) -> int:
        """Anchors of the largest padded image the resize rule can produce."""
        short = int(math.ceil(min_size / self.pad_divisor) * self.pad_divisor)
        long = int(math.ceil(max_size / self.pad_divisor) * self.pad_divisor)
        return self.num_anchors((min(short, long), long))

    def cell_anchors(self, level: int) -> torch.Tensor:
        """float32 [anchors_per_cell, 4]: anchors centred on (0, 0), rounded like torchvision unless
        ``rounded_anchors`` is False."""
        scales = torch.as_tensor([self.sizes[level] * s for s in self.scales], dtype=torch.float32)
        ratios = torch.as_tensor(self.aspect_ratios, dtype=torch.float32)
        h_ratios = torch.sqrt(ratios)
        w_ratios = 1 / h_ratios
        ws = (w_ratios[:, None] * scales[None, :]).view(-1)
        hs = (h_ratios[:, None] * scales[None, :]).view(-1)
        corners = torch.stack([-ws, -hs, ws, hs], dim=1) / 2
        return corners.round() if self.rounded_anchors else corners

    def anchors(self, padded_hw: tuple[int, int]) -> torch.Tensor:
        """float32 [num_anchors, 4] (x1, y1, x2, y2) for an image (or batch) padded to padded_hw."""
        out = []
        for level, ((gh, gw), stride) in enumerate(zip(self.grid_sizes(padded_hw), self.strides)):
            shift_x = torch.arange(gw, dtype=torch.int32).to(torch.float32) * stride
            shift_y = torch.arange(gh, dtype=torch.int32).to(torch.float32) * stride
            sy, sx = torch.meshgrid(shift_y, shift_x, indexing="ij")
            shifts = torch.stack([sx.reshape(-1), sy.reshape(-1)] * 2, dim=1)
            out.append((shifts[:, None, :] + self.cell_anchors(level)[None, :, :]).reshape(-1, 4))
        return torch.cat(out)

    def to_dict(self) -> dict:
        """JSON-able; options added after version 1 appear only when not at their default, so the
        dict (and the fingerprint) of a default layout is what it always was."""
        d = asdict(self)
        if self.rounded_anchors:
            del d["rounded_anchors"]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "AnchorLayout":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def fingerprint(self) -> str:
        """Stable short hash of the layout (floats rounded so 2**(1/3) prints the same everywhere)."""
        canon = {k: [round(float(x), 6) for x in v] if isinstance(v, list) else v for k, v in self.to_dict().items()}
        return hashlib.sha256(json.dumps(canon, sort_keys=True).encode()).hexdigest()[:16]


def image_to_batch_index(layout: AnchorLayout, image_padded_hw: tuple[int, int],
                         batch_padded_hw: tuple[int, int]) -> torch.Tensor:
    """int64 [num_anchors(image)]: where each of an image's anchors sits in the batch's anchor list.

    The image occupies the top-left corner of the batch canvas, so on level l its grid is the
    top-left ``H_l x W_l`` block of the batch grid ``BH_l x BW_l``:
    ``batch_index = batch_off_l + (y * BW_l + x) * A + a`` for image index ``off_l + (y * W_l + x) * A + a``.
    """
    if image_padded_hw[0] > batch_padded_hw[0] or image_padded_hw[1] > batch_padded_hw[1]:
        raise ValueError(f"image canvas {image_padded_hw} larger than batch canvas {batch_padded_hw}")
    a = layout.anchors_per_cell
    out, batch_off = [], 0
    for (gh, gw), (bh, bw) in zip(layout.grid_sizes(image_padded_hw), layout.grid_sizes(batch_padded_hw)):
        ys = torch.arange(gh)[:, None, None]
        xs = torch.arange(gw)[None, :, None]
        cell = torch.arange(a)[None, None, :]
        out.append((batch_off + (ys * bw + xs) * a + cell).reshape(-1))
        batch_off += bh * bw * a
    return torch.cat(out)
