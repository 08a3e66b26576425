"""Pure loss functions for sigmoid (RetinaNet-style) detectors and their distillation.

Every function here is stateless and works elementwise on logits of any shape
``[..., K]`` (K independent binary classes per anchor, no background channel).

Notation, per entry (anchor a, class c)::

    q = sigmoid(z_t)      teacher probability
    p = sigmoid(z_s)      student probability

    KL(q||p) = q log(q/p) + (1-q) log((1-q)/(1-p))       binary KL
    T(q)     = -(q log q + (1-q) log(1-q))               teacher entropy
    BCE(q,p) = -(q log p + (1-q) log(1-p)) = KL + T      soft binary cross-entropy

Numerics: every log is taken from the logits (``log q = logsigmoid(z_t)``,
``log(1-q) = logsigmoid(-z_t)``, same for p), never from clamped probabilities,
so saturated logits (|z| = 50 or 1e4, q exactly 0 or 1 in float) give finite
values and finite gradients. float16 / bfloat16 inputs are computed in float32
and the result is returned as float32 (float64 stays float64).

Sources: Tang et al., "Learning Efficient Detector with Semi-supervised Adaptive
Distillation" (arXiv 1901.00366) and its released Caffe2 op; see docs/method.md, section
"The released code and the paper".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "adaptive_distillation_loss",
    "adaptive_normalizer",
    "binary_kd_loss",
    "binary_kl",
    "focal_distillation_loss",
    "foreground_normalizer",
    "sigmoid_focal_loss",
    "teacher_bounded_regression_loss",
    "teacher_entropy",
    "weighted_soft_cross_entropy",
]

_REDUCTIONS = ("none", "sum", "mean")
_ADL_VARIANTS = ("paper", "released")


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half precision is upcast)."""
    if any(t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def _as_float(*tensors: Tensor) -> tuple[Tensor, ...]:
    dtype = _compute_dtype(*tensors)
    return tuple(t.to(dtype) for t in tensors)


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean()
    raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _check_same_shape(student_logits: Tensor, teacher_logits: Tensor) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "student and teacher logits must have the same shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}; "
            "check that both come from heads with the same anchors and classes"
        )


def _binary_kl_float(z_s: Tensor, z_t: Tensor) -> Tensor:
    """KL(q||p) from float logits of equal dtype (no casting)."""
    log_q, log_1mq = F.logsigmoid(z_t), F.logsigmoid(-z_t)
    log_p, log_1mp = F.logsigmoid(z_s), F.logsigmoid(-z_s)
    q = torch.sigmoid(z_t)
    # (1 - q) is computed as sigmoid(-z_t) so it is exact for large positive z_t.
    one_minus_q = torch.sigmoid(-z_t)
    return q * (log_q - log_p) + one_minus_q * (log_1mq - log_1mp)


def _teacher_entropy_float(z_t: Tensor) -> Tensor:
    q, one_minus_q = torch.sigmoid(z_t), torch.sigmoid(-z_t)
    return -(q * F.logsigmoid(z_t) + one_minus_q * F.logsigmoid(-z_t))


def binary_kl(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Elementwise binary KL(q||p), q = sigmoid(teacher), p = sigmoid(student).

    ``KL = q (log q - log p) + (1-q) (log(1-q) - log(1-p))``, logs from logits.
    Shapes: any, equal. Returns float32 (float64 if an input is float64), >= 0
    up to rounding.
    """
    _check_same_shape(student_logits, teacher_logits)
    z_s, z_t = _as_float(student_logits, teacher_logits)
    return _binary_kl_float(z_s, z_t)


def teacher_entropy(teacher_logits: Tensor) -> Tensor:
    """Elementwise binary entropy ``T(q) = -(q log q + (1-q) log(1-q))``, q = sigmoid(z_t).

    In nats, in [0, log 2]. Returns float32 (float64 for float64 input).
    """
    (z_t,) = _as_float(teacher_logits)
    return _teacher_entropy_float(z_t)


def _adaptive_weight(difficulty: Tensor, gamma: float) -> Tensor:
    """``(1 - exp(-difficulty)) ** gamma``; ``-expm1`` keeps precision for small difficulty."""
    if gamma == 0:
        # pow(0, 0) has an undefined gradient; the weight is simply 1.
        return torch.ones_like(difficulty)
    # Rounding can make KL + beta*T a hair negative; a negative base with a
    # fractional gamma would be NaN.
    return (-torch.expm1(-difficulty)).clamp_min(0.0) ** gamma


def adaptive_distillation_loss(student_logits: Tensor, teacher_logits: Tensor, *,
                               beta: float = 1.0, gamma: float = 2.0, reduction: str = "none", variant: str = "paper") -> Tensor:
    """Adaptive Distillation Loss (ADL), elementwise over ``[..., K]`` logits.

    ``variant="paper"`` (default, paper eq.)::

        ADW = (1 - exp(-(KL(q||p) + beta * T(q)))) ** gamma
        ADL = ADW * KL(q||p)

    ``variant="released"`` (the released Caffe2 op)::

        ADW_r = (1 - exp(-(BCE(q,p) - beta_code * T(q)))) ** gamma
        loss  = ADW_r * BCE(q,p),          BCE = KL + T

    ``beta`` is ALWAYS in the paper's convention. For the released variant it
    is mapped to the op's own parameter by ``beta_code = 1 - beta``; then
    ``BCE - beta_code*T = KL + beta*T``, so both variants use the identical
    weight ADW for the same ``beta`` and differ only in what is weighted
    (KL vs BCE = KL + T(q); T does not depend on the student, so both give the
    same gradient through the weighted term, not through ADW's value).

    Defaults ``gamma=2``, ``beta=1`` are the released configuration
    (gamma = 2, beta_code = 0, i.e. beta_paper = 1; docs/method.md, section "Beta convention").
    ``beta=0`` gives the focal-style distillation loss (FDL). Use ``gamma >= 1``
    for a gradient that is finite where KL + beta*T = 0.

    The gradient flows through ADW (it is not detached), as in the released op.
    The teacher logits normally carry no gradient; if they do, it flows too.

    Args:
        student_logits: ``[..., K]`` any float dtype.
        teacher_logits: same shape.
        beta: weight of the teacher entropy in the adaptive weight, >= 0.
        gamma: focusing exponent, >= 0.
        reduction: "none" (elementwise), "sum" or "mean".
        variant: "paper" or "released".

    Returns:
        float32 tensor (float64 if an input is float64) of the input shape,
        or a scalar when reduced.
    """
    if variant not in _ADL_VARIANTS:
        raise ValueError(f"variant must be one of {_ADL_VARIANTS}, got {variant!r}")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    _check_same_shape(student_logits, teacher_logits)
    z_s, z_t = _as_float(student_logits, teacher_logits)
    kl = _binary_kl_float(z_s, z_t)
    entropy = _teacher_entropy_float(z_t)
    weight = _adaptive_weight(kl + beta * entropy, gamma)
    if variant == "paper":
        loss = weight * kl
    else:
        loss = weight * (kl + entropy)
    return _reduce(loss, reduction)


def focal_distillation_loss(student_logits: Tensor, teacher_logits: Tensor, *,
                            gamma: float = 2.0, reduction: str = "none") -> Tensor:
    """Focal-style distillation loss (FDL baseline): ADL with ``beta=0``.

    ``FDL = (1 - exp(-KL(q||p))) ** gamma * KL(q||p)``, elementwise, same
    dtype rules as :func:`adaptive_distillation_loss`.
    """
    return adaptive_distillation_loss(
        student_logits, teacher_logits, beta=0.0, gamma=gamma, reduction=reduction, variant="paper"
    )


def binary_kd_loss(student_logits: Tensor, teacher_logits: Tensor, *,
                   temperature: float = 1.0, reduction: str = "none") -> Tensor:
    """Plain per-entry binary KD: ``KL(sigmoid(z_t/T) || sigmoid(z_s/T)) * T**2``.

    The ``T**2`` factor keeps the gradient scale comparable across
    temperatures (Hinton et al.). Shapes: any, equal; dtype rules as
    :func:`binary_kl`.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    _check_same_shape(student_logits, teacher_logits)
    z_s, z_t = _as_float(student_logits, teacher_logits)
    loss = _binary_kl_float(z_s / temperature, z_t / temperature) * temperature**2
    return _reduce(loss, reduction)


def weighted_soft_cross_entropy(student_logits: Tensor, teacher_logits: Tensor, *, background_weight: float = 1.5,
                                object_weight: float = 1.0, reduction: str = "none") -> Tensor:
    """Chen et al.'s class-weighted soft cross-entropy, in the sigmoid form of a RetinaNet head.

    Chen et al. (NeurIPS 2017, "Learning efficient object detection models with knowledge
    distillation") weight the soft cross-entropy of a softmax head per class, with a larger weight
    ``w_0`` on the background class. A sigmoid head has no background channel: each entry is its
    own two-way softmax {class c, not class c}, so the weight of "not class c" plays w_0's part::

        L = -(object_weight * q log p + background_weight * (1 - q) log(1 - p))

    With equal weights this is BCE(q, p) = KL(q||p) + T(q): plain KD at temperature 1 plus a term
    without gradient. ``background_weight > object_weight`` moves the loss's minimum below the
    teacher, to ``p* = w1 q / (w1 q + w0 (1 - q))``: the student is penalised more for firing
    where the teacher sees background than for missing where the teacher fires.

    Shapes: any, equal; dtype rules as :func:`binary_kl`. Weights must be >= 0.
    """
    if background_weight < 0 or object_weight < 0:
        raise ValueError(f"weights must be >= 0, got background {background_weight}, object {object_weight}")
    _check_same_shape(student_logits, teacher_logits)
    z_s, z_t = _as_float(student_logits, teacher_logits)
    q = torch.sigmoid(z_t)
    loss = -(object_weight * q * F.logsigmoid(z_s) + background_weight * (1 - q) * F.logsigmoid(-z_s))
    return _reduce(loss, reduction)


def teacher_bounded_regression_loss(student_deltas: Tensor, teacher_deltas: Tensor, target_deltas: Tensor, *,
                                    margin: float = 0.0, reduction: str = "none") -> Tensor:
    """Chen et al.'s teacher-bounded regression loss, one value per box ``[..., 4] -> [...]``.

    The teacher is an upper bound, not a target: with squared L2 errors
    ``e_s = ||R_s - y||^2`` and ``e_t = ||R_t - y||^2`` over the 4 box deltas::

        L_b = e_s   if e_s + margin > e_t,   else 0

    so the student is pushed toward the ground truth ``y`` only while it is not better than the
    teacher by at least ``margin``. Chen et al. add it to the usual regression loss with weight
    ``nu = 0.5``. Inputs are encoded box deltas (torchvision ``BoxCoder``, weights 1) at
    foreground anchors; the teacher's carry no gradient.
    """
    if not (student_deltas.shape == teacher_deltas.shape == target_deltas.shape) or student_deltas.shape[-1:] != (4,):
        raise ValueError(f"expected three [..., 4] tensors of one shape, got {tuple(student_deltas.shape)}, "
                         f"{tuple(teacher_deltas.shape)} and {tuple(target_deltas.shape)}")
    r_s, r_t, y = _as_float(student_deltas, teacher_deltas.detach(), target_deltas)
    e_s = (r_s - y).pow(2).sum(-1)
    e_t = (r_t - y).pow(2).sum(-1)
    loss = torch.where(e_s + margin > e_t, e_s, torch.zeros_like(e_s))
    return _reduce(loss, reduction)


def adaptive_normalizer(teacher_logits: Tensor, *, power: float = 1.8, mask: Tensor | None = None) -> Tensor:
    """The released code's "adaptive normaliser": ``max(1, sum q**power)``.

    The sum runs over every entry of ``teacher_logits`` (all anchors, classes
    and images given) where ``mask`` is True. ``q**power`` is computed as
    ``exp(power * logsigmoid(z_t))`` so saturated logits are safe.

    Args:
        teacher_logits: ``[..., K]`` float.
        power: exponent, 1.8 in the released code.
        mask: optional bool tensor broadcastable to the logits, typically
            ``[..., 1]`` (per anchor, e.g. ``matched_idxs != -2``) or ``[..., K]``.
            False entries do not count.

    Returns:
        scalar float32 (float64 for float64 input), no gradient is intended
        (the teacher is fixed) but none is cut either.
    """
    (z_t,) = _as_float(teacher_logits)
    q_pow = torch.exp(power * F.logsigmoid(z_t))
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
        try:
            mask = torch.broadcast_to(mask, q_pow.shape)
        except RuntimeError as error:
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} does not broadcast to the logits "
                f"{tuple(q_pow.shape)}; use [..., 1] (per anchor) or [..., K]"
            ) from error
        q_pow = torch.where(mask, q_pow, torch.zeros_like(q_pow))
    return q_pow.sum().clamp_min(1.0)


def foreground_normalizer(num_foreground: Tensor | int) -> Tensor:
    """Focal-loss style normaliser ``max(1, n)`` as a float32 scalar tensor."""
    n = torch.as_tensor(num_foreground)
    return n.to(torch.float32).sum().clamp_min(1.0)


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, *,
                       alpha: float = 0.25, gamma: float = 2.0, reduction: str = "none") -> Tensor:
    """Sigmoid focal loss (Lin et al.), elementwise, same values as torchvision's.

    ::

        p   = sigmoid(x)
        ce  = BCE_with_logits(x, y) = -(y log p + (1-y) log(1-p))
        p_t = p y + (1-p)(1-y)
        FL  = alpha_t * (1 - p_t)**gamma * ce,  alpha_t = alpha y + (1-alpha)(1-y)

    ``alpha < 0`` disables the alpha weighting (torchvision convention).
    ``ce`` is computed from the logits (stable); targets may be soft in [0, 1].
    Shapes: equal, any. Returns float32 (float64 if an input is float64).
    """
    _check_same_shape(logits, targets)
    x, y = _as_float(logits, targets)
    ce = F.binary_cross_entropy_with_logits(x, y, reduction="none")
    p = torch.sigmoid(x)
    p_t = p * y + (1 - p) * (1 - y)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * y + (1 - alpha) * (1 - y)) * loss
    return _reduce(loss, reduction)
