"""How faithfully decoded teacher logits reproduce the ADL training signal, and what they cost.

Two measurements, used by ``benchmarks/codec_fidelity.py`` and the codec tests:

- :func:`adl_fidelity` compares the normalised Adaptive Distillation Loss (docs/method.md,
  section "Adaptive Distillation Loss") computed with decoded teacher logits against the same
  loss with the exact teacher logits, for a
  given student: relative error of the loss, cosine between the two gradients with respect to the
  student logits, and relative error of the adaptive normaliser ``max(1, sum q**power)``.
- :func:`codec_size_report` measures the bytes the cache store spends on a codec's codes: one zstd
  frame per image (the store writes one zarr inner chunk per image, zstd at ``codec.zstd_level``
  plus a 4-byte crc32c), and the encode / decode wall time per image.
"""

from __future__ import annotations

import time
from typing import Callable

import numcodecs
import numpy as np
import torch

from .codec import as_code_array

# The store appends a crc32c checksum (4 bytes) to every inner chunk.
CRC32C_BYTES = 4


def _normalised_adl(student_logits, teacher_logits, *, beta, gamma, power, variant, adl_fn, normalizer_fn):
    """(loss, normaliser) for one batch: sum(ADL) / max(1, sum q**power); float64 scalars."""
    loss_sum = adl_fn(student_logits, teacher_logits, beta=beta, gamma=gamma, reduction="none", variant=variant).sum()
    normaliser = normalizer_fn(teacher_logits, power=power)
    return loss_sum / normaliser, normaliser


def adl_fidelity(
    student_logits: torch.Tensor,
    exact_teacher_logits: torch.Tensor,
    decoded_teacher_logits: torch.Tensor,
    *,
    beta: float = 1.0,
    gamma: float = 2.0,
    power: float = 1.8,
    variant: str = "paper",
    adl_fn: Callable | None = None,
    normalizer_fn: Callable | None = None,
) -> dict:
    """ADL fidelity of decoded teacher logits against exact ones, for one student batch.

    Args:
        student_logits: float ``[B, A, K]`` (any shape ``[..., K]`` works).
        exact_teacher_logits: float, same shape: the teacher's logits as computed.
        decoded_teacher_logits: float, same shape: the logits after encode + decode.
        beta, gamma, variant: ADL parameters (paper convention, see ``sadpipe.losses``).
        power: exponent of the adaptive normaliser (1.8 in the released code).
        adl_fn, normalizer_fn: override ``sadpipe.losses.adaptive_distillation_loss`` /
            ``adaptive_normalizer`` (same signatures); for tests with a second formula.

    Everything is computed in float64 so that cosines near 1 are not limited by rounding.

    Returns:
        dict with float values
        ``loss_rel_error`` = |L_dec - L_exact| / |L_exact| with L = sum(ADL) / max(1, sum q**power),
        ``grad_cosine`` = cos(dL_dec/dz_s, dL_exact/dz_s) over all entries (1.0 when both are zero),
        ``normalizer_rel_error`` = |N_dec - N_exact| / N_exact,
        plus ``loss_exact``, ``loss_decoded`` and ``loss_signed_rel_error`` for reporting.
    """
    if adl_fn is None or normalizer_fn is None:
        from sadpipe import losses

        adl_fn = adl_fn or losses.adaptive_distillation_loss
        normalizer_fn = normalizer_fn or losses.adaptive_normalizer
    shapes = {tuple(t.shape) for t in (student_logits, exact_teacher_logits, decoded_teacher_logits)}
    if len(shapes) != 1:
        raise ValueError(
            "student, exact teacher and decoded teacher logits must have one shape, got "
            f"{[tuple(t.shape) for t in (student_logits, exact_teacher_logits, decoded_teacher_logits)]}"
        )
    kwargs = dict(beta=beta, gamma=gamma, power=power, variant=variant, adl_fn=adl_fn, normalizer_fn=normalizer_fn)
    results = {}
    for key, teacher in (("exact", exact_teacher_logits), ("decoded", decoded_teacher_logits)):
        student = torch.as_tensor(student_logits).detach().to(torch.float64).requires_grad_(True)
        teacher = torch.as_tensor(teacher).detach().to(torch.float64)
        loss, normaliser = _normalised_adl(student, teacher, **kwargs)
        (grad,) = torch.autograd.grad(loss, student)
        results[key] = (loss.item(), float(normaliser), grad.flatten())
    loss_e, norm_e, grad_e = results["exact"]
    loss_d, norm_d, grad_d = results["decoded"]
    denom = grad_e.norm() * grad_d.norm()
    cosine = 1.0 if float(denom) == 0.0 else float(grad_e @ grad_d / denom)
    signed = (loss_d - loss_e) / abs(loss_e) if loss_e != 0 else (0.0 if loss_d == 0 else float("inf"))
    return {
        "loss_rel_error": abs(signed),
        "grad_cosine": cosine,
        "normalizer_rel_error": abs(norm_d - norm_e) / norm_e,
        "loss_exact": loss_e,
        "loss_decoded": loss_d,
        "loss_signed_rel_error": signed,
    }


def compressed_image_bytes(codes_one_image, zstd_level: int) -> int:
    """Bytes the store spends on one image's code array ``uint8 [A, K]``: zstd frame + crc32c."""
    raw = np.ascontiguousarray(as_code_array(codes_one_image)).tobytes()
    return len(numcodecs.Zstd(level=zstd_level).encode(raw)) + CRC32C_BYTES


def codec_size_report(codec, logits: torch.Tensor, *, repeats: int = 3) -> dict:
    """Compressed size and speed of ``codec`` on a batch of teacher logits.

    Args:
        codec: object with ``encode``, ``decode`` and ``zstd_level`` (see ``sadpipe.cache.codec``).
        logits: float ``[B, A, K]``, one image per leading index (the store's inner chunk).
        repeats: timing repeats; the fastest run is reported (the machine is shared).

    Returns:
        dict with ``bits_per_value`` (compressed bits per logit, crc32c included),
        ``ratio_vs_float32`` (32 / bits_per_value, i.e. against dense uncompressed float32),
        ``encode_ms`` and ``decode_ms`` (milliseconds per image, CPU, one image per call),
        ``bytes_per_image`` (mean).
    """
    logits = torch.as_tensor(logits)
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, A, K] (one image per leading index), got shape {tuple(logits.shape)}")
    batch = logits.shape[0]
    values = logits[0].numel()

    def timed(fn, items):
        best, outputs = float("inf"), None
        for _ in range(max(1, repeats)):
            start = time.perf_counter()
            outputs = [fn(item) for item in items]
            best = min(best, time.perf_counter() - start)
        return outputs, 1e3 * best / len(items)

    codes, encode_ms = timed(lambda image: as_code_array(codec.encode(image)), list(logits))
    _, decode_ms = timed(codec.decode, codes)
    total_bytes = sum(compressed_image_bytes(c, codec.zstd_level) for c in codes)
    bits = 8.0 * total_bytes / (batch * values)
    return {
        "bits_per_value": bits,
        "ratio_vs_float32": 32.0 / bits,
        "encode_ms": encode_ms,
        "decode_ms": decode_ms,
        "bytes_per_image": total_bytes / batch,
    }
