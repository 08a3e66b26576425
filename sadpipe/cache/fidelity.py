"""How faithfully decoded teacher logits reproduce the distillation signal, and what they cost.

Two measurements, used by ``benchmarks/codec_fidelity.py``, ``sadpipe cache fidelity`` and the
codec tests:

- :func:`distill_fidelity` compares a normalised soft loss (ADL, plain KD or Chen et al.'s
  weighted soft cross-entropy) computed with decoded teacher logits against the same loss with
  the exact teacher logits, for a given student: relative error of the loss, cosine and relative
  error of the gradient with respect to the student logits, and relative error of the adaptive
  normaliser ``max(1, sum q**power)``. :func:`adl_fidelity` is its ADL case.
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


def distillation_losses(beta: float = 1.0, gamma: float = 2.0, variant: str = "paper",
                        background_weight: float = 1.5) -> dict[str, Callable]:
    """The per-entry soft losses a store feeds, by the ``distill.method`` that uses them:
    ``adl`` (ADL with ``beta``, ``gamma``, ``variant``; SAD uses it too), ``kd`` (plain binary KD,
    temperature 1) and ``weighted_ce`` (Chen et al.'s weighted soft cross-entropy). Each maps
    (student logits, teacher logits) of one shape to per-entry losses of that shape."""
    from sadpipe import losses

    return {
        "adl": lambda s, t: losses.adaptive_distillation_loss(s, t, beta=beta, gamma=gamma, variant=variant),
        "kd": lambda s, t: losses.binary_kd_loss(s, t),
        "weighted_ce": lambda s, t: losses.weighted_soft_cross_entropy(s, t, background_weight=background_weight),
    }


def distill_fidelity(
    student_logits: torch.Tensor,
    exact_teacher_logits: torch.Tensor,
    decoded_teacher_logits: torch.Tensor,
    loss_fn: Callable,
    *,
    power: float = 1.8,
    normalizer_fn: Callable | None = None,
) -> dict:
    """Fidelity of decoded teacher logits against exact ones for one soft loss and one student batch.

    The loss is the one training minimises: ``L = sum(loss_fn(z_s, z_t)) / max(1, sum q**power)``
    (the adaptive normaliser, ``sadpipe.losses.adaptive_normalizer``).

    Args:
        student_logits: float ``[B, A, K]`` (any shape ``[..., K]`` works).
        exact_teacher_logits: float, same shape: the teacher's logits as computed.
        decoded_teacher_logits: float, same shape: the logits after encode + decode.
        loss_fn: per-entry soft loss, e.g. a value of :func:`distillation_losses`.
        power: exponent of the adaptive normaliser (1.8 in the released code).
        normalizer_fn: override ``sadpipe.losses.adaptive_normalizer`` (same signature); for tests.

    Everything is computed in float64 so that cosines near 1 are not limited by rounding.

    Returns:
        dict with float values
        ``loss_rel_error`` = |L_dec - L_exact| / |L_exact|,
        ``grad_cosine`` = cos(dL_dec/dz_s, dL_exact/dz_s) over all entries (1.0 when both are zero),
        ``grad_rel_error`` = |dL_dec/dz_s - dL_exact/dz_s| / |dL_exact/dz_s| (0.0 when both are zero),
        ``normalizer_rel_error`` = |N_dec - N_exact| / N_exact,
        plus ``loss_exact``, ``loss_decoded`` and ``loss_signed_rel_error`` for reporting.
    """
    if normalizer_fn is None:
        from sadpipe import losses

        normalizer_fn = losses.adaptive_normalizer
    shapes = {tuple(t.shape) for t in (student_logits, exact_teacher_logits, decoded_teacher_logits)}
    if len(shapes) != 1:
        raise ValueError(
            "student, exact teacher and decoded teacher logits must have one shape, got "
            f"{[tuple(t.shape) for t in (student_logits, exact_teacher_logits, decoded_teacher_logits)]}"
        )
    results = {}
    for key, teacher in (("exact", exact_teacher_logits), ("decoded", decoded_teacher_logits)):
        student = torch.as_tensor(student_logits).detach().to(torch.float64).requires_grad_(True)
        teacher = torch.as_tensor(teacher).detach().to(torch.float64)
        normaliser = normalizer_fn(teacher, power=power)
        loss = loss_fn(student, teacher).sum() / normaliser
        (grad,) = torch.autograd.grad(loss, student)
        results[key] = (loss.item(), float(normaliser), grad.flatten())
    loss_e, norm_e, grad_e = results["exact"]
    loss_d, norm_d, grad_d = results["decoded"]
    denom = grad_e.norm() * grad_d.norm()
    cosine = 1.0 if float(denom) == 0.0 else float(grad_e @ grad_d / denom)
    grad_err = float((grad_d - grad_e).norm())
    grad_rel = (0.0 if grad_err == 0.0 else float("inf")) if float(grad_e.norm()) == 0.0 else grad_err / float(grad_e.norm())
    signed = (loss_d - loss_e) / abs(loss_e) if loss_e != 0 else (0.0 if loss_d == 0 else float("inf"))
    return {
        "loss_rel_error": abs(signed),
        "grad_cosine": cosine,
        "grad_rel_error": grad_rel,
        "normalizer_rel_error": abs(norm_d - norm_e) / norm_e,
        "loss_exact": loss_e,
        "loss_decoded": loss_d,
        "loss_signed_rel_error": signed,
    }


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
    """:func:`distill_fidelity` of the normalised ADL (docs/method.md, section "Adaptive
    Distillation Loss") with ``beta``, ``gamma``, ``variant``; ``adl_fn`` overrides
    ``sadpipe.losses.adaptive_distillation_loss`` (same signature), for tests with a second formula."""
    if adl_fn is None:
        loss_fn = distillation_losses(beta=beta, gamma=gamma, variant=variant)["adl"]
    else:
        def loss_fn(s, t):
            return adl_fn(s, t, beta=beta, gamma=gamma, reduction="none", variant=variant)
    return distill_fidelity(student_logits, exact_teacher_logits, decoded_teacher_logits, loss_fn, power=power,
                            normalizer_fn=normalizer_fn)


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
