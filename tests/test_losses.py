import math

import pytest
import torch
import torch.nn.functional as F
import torchvision

from sadpipe import losses


def _hand_kl(zs: float, zt: float) -> float:
    """Binary KL with math.log on probabilities (only for moderate logits)."""
    q = 1 / (1 + math.exp(-zt))
    p = 1 / (1 + math.exp(-zs))
    return q * math.log(q / p) + (1 - q) * math.log((1 - q) / (1 - p))


def test_adl_hand_values_paper():
    # z_s = 0, z_t = 0: q = p = 0.5 -> KL = 0, T = log 2, ADL = ADW * 0 = 0.
    out = losses.adaptive_distillation_loss(torch.tensor([0.0]), torch.tensor([0.0]))
    assert out.item() == pytest.approx(0.0, abs=1e-7)

    # z_t = 0 (q = 0.5), z_s = log(3) (p = 0.75):
    #   KL = 0.5 log(0.5/0.75) + 0.5 log(0.5/0.25) = 0.5 (log 2 - log 1.5) = 0.5 log(4/3)
    #      = 0.143841...
    #   T  = log 2 = 0.693147...
    #   beta = 1, gamma = 2: ADW = (1 - exp(-(0.143841 + 0.693147)))**2
    #      = (1 - exp(-0.836988))**2 = (1 - 0.433013)**2 = 0.321474...
    #   ADL = 0.321474 * 0.143841 = 0.046241...
    kl = 0.5 * math.log(4 / 3)
    adw = (1 - math.exp(-(kl + math.log(2)))) ** 2
    out = losses.adaptive_distillation_loss(torch.tensor([math.log(3)]), torch.tensor([0.0]))
    assert out.item() == pytest.approx(adw * kl, rel=1e-5)
    assert adw * kl == pytest.approx(0.046241, rel=1e-4)

    # z_t = log(9) (q = 0.9), z_s = 0 (p = 0.5), beta = 0.5, gamma = 1:
    #   KL = 0.9 log(1.8) + 0.1 log(0.2) = 0.9*0.587787 + 0.1*(-1.609438) = 0.368064
    #   T  = -(0.9 log 0.9 + 0.1 log 0.1) = 0.094824 + 0.230259 = 0.325083
    #   ADW = 1 - exp(-(0.368064 + 0.5*0.325083)) = 1 - exp(-0.530605) = 0.411746
    #   ADL = 0.411746 * 0.368064 = 0.151549
    kl = 0.9 * math.log(1.8) + 0.1 * math.log(0.2)
    t = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))
    expected = (1 - math.exp(-(kl + 0.5 * t))) * kl
    out = losses.adaptive_distillation_loss(torch.tensor([0.0]), torch.tensor([math.log(9)]), beta=0.5, gamma=1.0)
    assert out.item() == pytest.approx(expected, rel=1e-5)
    assert expected == pytest.approx(0.151549, rel=1e-4)


def test_helpers_match_hand_values():
    zs = torch.tensor([0.3, -2.0, 4.0], dtype=torch.float64)
    zt = torch.tensor([-1.0, 1.5, 4.0], dtype=torch.float64)
    kl = losses.binary_kl(zs, zt)
    for i in range(3):
        assert kl[i].item() == pytest.approx(_hand_kl(zs[i].item(), zt[i].item()), rel=1e-10, abs=1e-14)
    # T(q) at q = 0.5 is log 2; at q = sigmoid(log 9) = 0.9: 0.325083 (see above).
    t = losses.teacher_entropy(torch.tensor([0.0, math.log(9)], dtype=torch.float64))
    assert t[0].item() == pytest.approx(math.log(2), rel=1e-12)
    assert t[1].item() == pytest.approx(-(0.9 * math.log(0.9) + 0.1 * math.log(0.1)), rel=1e-10)


def test_kl_zero_when_student_equals_teacher():
    z = torch.linspace(-30, 30, 61)
    assert torch.allclose(losses.binary_kl(z, z), torch.zeros_like(z), atol=1e-6)
    assert torch.allclose(losses.adaptive_distillation_loss(z, z), torch.zeros_like(z), atol=1e-6)


@pytest.mark.parametrize("variant", ["paper", "released"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_extreme_logits_finite_value_and_grad(variant, dtype):
    big = [50.0, -50.0, 1e4, -1e4] if dtype != torch.float16 else [50.0, -50.0, 6e4, -6e4]
    pairs = [(a, b) for a in big + [0.0] for b in big + [0.0]]
    zs = torch.tensor([a for a, _ in pairs], dtype=dtype, requires_grad=True)
    zt = torch.tensor([b for _, b in pairs], dtype=dtype)
    loss = losses.adaptive_distillation_loss(zs, zt, variant=variant)
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss).all()
    loss.sum().backward()
    assert torch.isfinite(zs.grad).all()
    # Opposite saturated signs: z_t = 1e4 (q = 1), z_s = -1e4: KL = -log p = 1e4 (float32).
    if dtype == torch.float32:
        i = pairs.index((-1e4, 1e4))
        assert loss[i].item() == pytest.approx(1e4, rel=1e-6)
        # dKL/dz_s = p - q = -1, ADW = 1 with zero slope there.
        assert zs.grad[i].item() == pytest.approx(-1.0, abs=1e-6)


def test_extreme_logits_kd_and_normalizer_finite():
    zs = torch.tensor([1e4, -1e4, 50.0], requires_grad=True)
    zt = torch.tensor([-1e4, 1e4, -50.0])
    kd = losses.binary_kd_loss(zs, zt, temperature=2.0)
    kd.sum().backward()
    assert torch.isfinite(kd).all() and torch.isfinite(zs.grad).all()
    assert torch.isfinite(losses.adaptive_normalizer(zt))


@pytest.mark.parametrize("variant", ["paper", "released"])
def test_gradcheck_float64(variant):
    torch.manual_seed(0)
    zs = (torch.randn(3, 5, dtype=torch.float64) * 3).requires_grad_()
    zt = (torch.randn(3, 5, dtype=torch.float64) * 3).requires_grad_()
    fn = lambda a, b: losses.adaptive_distillation_loss(a, b, beta=0.7, gamma=2.0, variant=variant)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (zs, zt))


def test_gradient_flows_through_weight():
    # If ADW were detached the gradient would be ADW * (p - q); with it attached
    # there is the extra term dADW/dz_s * KL. Compare with an independent
    # float64 closed form: d/dz_s ADW = gamma (1-e)^(gamma-1) e dKL/dz_s,
    # e = exp(-(KL + beta T)), dKL/dz_s = p - q.
    zs = torch.tensor([1.2], dtype=torch.float64, requires_grad=True)
    zt = torch.tensor([-0.4], dtype=torch.float64)
    beta, gamma = 1.0, 2.0
    losses.adaptive_distillation_loss(zs, zt, beta=beta, gamma=gamma).sum().backward()
    q, p = 1 / (1 + math.exp(0.4)), 1 / (1 + math.exp(-1.2))
    kl = _hand_kl(1.2, -0.4)
    t = -(q * math.log(q) + (1 - q) * math.log(1 - q))
    e = math.exp(-(kl + beta * t))
    adw = (1 - e) ** gamma
    expected = gamma * (1 - e) ** (gamma - 1) * e * (p - q) * kl + adw * (p - q)
    assert zs.grad.item() == pytest.approx(expected, rel=1e-10)


def test_beta_zero_is_focal_style_and_fdl():
    torch.manual_seed(1)
    zs, zt = torch.randn(4, 7, dtype=torch.float64) * 2, torch.randn(4, 7, dtype=torch.float64) * 2
    # Independent KL via probabilities.
    q, p = torch.sigmoid(zt), torch.sigmoid(zs)
    kl = q * torch.log(q / p) + (1 - q) * torch.log((1 - q) / (1 - p))
    expected = (1 - torch.exp(-kl)) ** 2.0 * kl
    got = losses.adaptive_distillation_loss(zs, zt, beta=0.0, gamma=2.0)
    assert torch.allclose(got, expected, rtol=1e-9, atol=1e-12)
    assert torch.allclose(losses.focal_distillation_loss(zs, zt, gamma=2.0), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_released_variant_matches_bce_form(beta):
    torch.manual_seed(2)
    zs, zt = torch.randn(6, 4, dtype=torch.float64) * 3, torch.randn(6, 4, dtype=torch.float64) * 3
    q = torch.sigmoid(zt)
    bce = F.binary_cross_entropy_with_logits(zs, q, reduction="none")
    entropy = F.binary_cross_entropy_with_logits(zt, q, reduction="none")  # BCE(q, q) = T(q)
    beta_code = 1.0 - beta
    expected = (1 - torch.exp(-(bce - beta_code * entropy))) ** 2 * bce
    got = losses.adaptive_distillation_loss(zs, zt, beta=beta, gamma=2.0, variant="released")
    assert torch.allclose(got, expected, rtol=1e-9, atol=1e-12)


def test_reductions_and_shapes():
    torch.manual_seed(3)
    zs, zt = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    none = losses.adaptive_distillation_loss(zs, zt)
    assert none.shape == (2, 3, 4)
    assert losses.adaptive_distillation_loss(zs, zt, reduction="sum").item() == pytest.approx(none.sum().item(), rel=1e-6)
    assert losses.adaptive_distillation_loss(zs, zt, reduction="mean").item() == pytest.approx(none.mean().item(), rel=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        losses.adaptive_distillation_loss(zs, zt, reduction="avg")
    with pytest.raises(ValueError, match="variant"):
        losses.adaptive_distillation_loss(zs, zt, variant="caffe")
    with pytest.raises(ValueError, match="same shape"):
        losses.adaptive_distillation_loss(zs, zt[..., :3])


def test_binary_kd_temperature_against_independent():
    torch.manual_seed(4)
    zs, zt = torch.randn(5, 3, dtype=torch.float64) * 4, torch.randn(5, 3, dtype=torch.float64) * 4
    temperature = 3.0
    # Independent: KL as BCE(q_T, p_T) - BCE(q_T, q_T) with torch's BCE on probabilities.
    q_t, p_t = torch.sigmoid(zt / temperature), torch.sigmoid(zs / temperature)
    expected = (F.binary_cross_entropy(p_t, q_t, reduction="none") - F.binary_cross_entropy(q_t, q_t, reduction="none")) * 9.0
    got = losses.binary_kd_loss(zs, zt, temperature=temperature)
    assert torch.allclose(got, expected, rtol=1e-8, atol=1e-10)
    assert losses.binary_kd_loss(zs, zt, reduction="sum").item() == pytest.approx(
        losses.binary_kl(zs, zt).sum().item(), rel=1e-10
    )


def test_adaptive_normalizer_with_and_without_mask():
    # q = 0.5 and 0.9 (logits 0, log 9), and one tiny entry.
    zt = torch.tensor([[[0.0, math.log(9)], [math.log(9), 0.0]]], dtype=torch.float64)  # [1, 2 anchors, 2 classes]
    # No mask: 2 * 0.5**1.8 + 2 * 0.9**1.8 = 2*0.287175 + 2*0.827244 = 2.228838
    expected_all = 2 * 0.5**1.8 + 2 * 0.9**1.8
    assert losses.adaptive_normalizer(zt).item() == pytest.approx(expected_all, rel=1e-10)
    # Per-anchor mask [1, 2, 1]: keep only anchor 0 -> 0.5**1.8 + 0.9**1.8 = 1.114419
    anchor_mask = torch.tensor([[[True], [False]]])
    assert losses.adaptive_normalizer(zt, mask=anchor_mask).item() == pytest.approx(0.5**1.8 + 0.9**1.8, rel=1e-10)
    # Per-entry mask: keep only the two q = 0.5 entries -> 2 * 0.287175 = 0.574349 < 1 -> clamped to 1.
    entry_mask = torch.tensor([[[True, False], [False, True]]])
    assert losses.adaptive_normalizer(zt, mask=entry_mask).item() == 1.0
    # Other power: sum of q over everything = 0.5+0.9+0.9+0.5 = 2.8
    assert losses.adaptive_normalizer(zt, power=1.0).item() == pytest.approx(2.8, rel=1e-10)
    with pytest.raises(ValueError, match="broadcast"):
        losses.adaptive_normalizer(zt, mask=torch.ones(3, dtype=torch.bool))


def test_foreground_normalizer():
    assert losses.foreground_normalizer(0).item() == 1.0
    assert losses.foreground_normalizer(7).item() == 7.0
    assert losses.foreground_normalizer(torch.tensor([2, 3])).item() == 5.0


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (0.5, 0.0), (-1.0, 1.5)])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_sigmoid_focal_matches_torchvision(alpha, gamma, reduction):
    torch.manual_seed(5)
    logits = torch.randn(20, 6) * 5
    targets = (torch.rand(20, 6) > 0.7).float()
    expected = torchvision.ops.sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction=reduction)
    got = losses.sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction=reduction)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-7)


def test_sigmoid_focal_stable_at_extremes():
    logits = torch.tensor([1e4, -1e4, 100.0, -100.0], requires_grad=True)
    targets = torch.tensor([0.0, 1.0, 1.0, 0.0])
    loss = losses.sigmoid_focal_loss(logits, targets)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(logits.grad).all()
    # Wrong by 1e4 with p_t = 0: alpha_t * 1 * 1e4; first entry y = 0 -> alpha_t = 0.75.
    assert loss[0].item() == pytest.approx(0.75 * 1e4, rel=1e-6)
    assert loss[1].item() == pytest.approx(0.25 * 1e4, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Chen et al. 2017 baselines


def test_weighted_soft_cross_entropy_by_hand():
    # z_s = 0 (p = 1/2), z_t = log 3 (q = 3/4), w1 = 1, w0 = 1.5:
    # L = -(0.75 ln 0.5 + 1.5 * 0.25 ln 0.5) = 1.125 ln 2 = 0.7797905...
    z_s, z_t = torch.zeros(1), torch.tensor([math.log(3.0)])
    value = losses.weighted_soft_cross_entropy(z_s, z_t, background_weight=1.5)
    assert float(value) == pytest.approx(1.125 * math.log(2.0), rel=1e-6)
    # its minimum over p is p* = w1 q / (w1 q + w0 (1 - q)) = 0.75 / 1.125 = 2/3, i.e. z* = ln 2
    z_star = torch.tensor([math.log(2.0)], requires_grad=True)
    losses.weighted_soft_cross_entropy(z_star, z_t, background_weight=1.5).sum().backward()
    assert abs(float(z_star.grad)) < 1e-6


def test_weighted_soft_cross_entropy_with_equal_weights_is_kd_plus_teacher_entropy():
    g = torch.Generator().manual_seed(0)
    z_s, z_t = torch.randn(50, 6, generator=g) * 4, torch.randn(50, 6, generator=g) * 4
    bce = losses.weighted_soft_cross_entropy(z_s, z_t, background_weight=1.0)
    expected = losses.binary_kd_loss(z_s, z_t) + losses.teacher_entropy(z_t)
    torch.testing.assert_close(bce, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        losses.weighted_soft_cross_entropy(z_s, z_t, background_weight=-1.0)


def test_teacher_bounded_regression_by_hand():
    y = torch.zeros(3, 4)
    student = torch.tensor([[1.0, 0, 0, 0], [0.1, 0, 0, 0], [0.1, 0, 0, 0]], requires_grad=True)
    teacher = torch.tensor([[0.5, 0, 0, 0], [0.5, 0, 0, 0], [0.5, 0, 0, 0]])
    # e_s = 1, 0.01, 0.01; e_t = 0.25 each.
    # margin 0:   1 > 0.25 -> 1;   0.01 > 0.25 no -> 0 (twice)
    value = losses.teacher_bounded_regression_loss(student, teacher, y, margin=0.0)
    torch.testing.assert_close(value, torch.tensor([1.0, 0.0, 0.0]))
    # margin 0.3: 0.01 + 0.3 = 0.31 > 0.25 -> the student is still penalised: 0.01
    value = losses.teacher_bounded_regression_loss(student, teacher, y, margin=0.3)
    torch.testing.assert_close(value, torch.tensor([1.0, 0.01, 0.01]))
    # gradient 2 (r_s - y) where the loss is active, none to a teacher that requires grad
    teacher.requires_grad_(True)
    losses.teacher_bounded_regression_loss(student, teacher, y, margin=0.0, reduction="sum").backward()
    torch.testing.assert_close(student.grad, torch.tensor([[2.0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]))
    assert teacher.grad is None
    with pytest.raises(ValueError):
        losses.teacher_bounded_regression_loss(student, teacher[:2], y)
