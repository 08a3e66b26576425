"""Lossy codec for teacher classification logits.

A codec maps float logits to uint8 codes of the same shape (so the store keeps plain
fixed-shape uint8 arrays that zarr compresses with zstd) and back to float32 logits.
Encoding is torch (it runs on the GPU before the host copy); decoding is a table lookup.

Baseline (REFERENCE section 6): uniform 8-bit steps in probability space. Code c decodes to
the logit of the bin centre.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class UniformProbabilityCodec:
    """q = sigmoid(logit) quantised to ``levels`` uniform bins on [0, 1].

    encode: float logits [...] -> uint8 codes [...]
    decode: uint8 codes [...] -> float32 logits [...]
    """

    levels: int = 256
    zstd_level: int = 3
    name: str = "uniform_probability"

    def __post_init__(self) -> None:
        if not 2 <= self.levels <= 256:
            raise ValueError(f"levels must be in [2, 256], got {self.levels}")

    def encode(self, logits: torch.Tensor) -> torch.Tensor:
        q = torch.sigmoid(logits.float())
        codes = torch.clamp((q * self.levels).floor(), 0, self.levels - 1)
        return codes.to(torch.uint8)

    def decode_table(self) -> np.ndarray:
        """float32 [levels]: the logit each code decodes to."""
        centres = (np.arange(self.levels, dtype=np.float64) + 0.5) / self.levels
        return np.log(centres / (1.0 - centres)).astype(np.float32)

    def decode(self, codes: np.ndarray | torch.Tensor) -> torch.Tensor:
        table = torch.from_numpy(self.decode_table())
        codes_t = torch.as_tensor(np.asarray(codes) if not isinstance(codes, torch.Tensor) else codes)
        return table[codes_t.long()]

    def to_dict(self) -> dict:
        return asdict(self)


CODECS = {"uniform_probability": UniformProbabilityCodec}


def codec_from_dict(spec: dict):
    """Rebuild a codec from ``codec.to_dict()`` (as stored in the cache metadata)."""
    spec = dict(spec)
    name = spec.pop("name", None)
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r}; known: {sorted(CODECS)}")
    return CODECS[name](**spec)


def default_codec():
    return UniformProbabilityCodec()
