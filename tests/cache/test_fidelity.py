"""Tests of sadpipe.cache.fidelity against closed-form ADL gradients and known compressibility."""

import numpy as np
import pytest
import torch

from sadpipe.cache.codec import UniformProbabilityCodec
from sadpipe.cache.fidelity import adl_fidelity, codec_size_report, distill_fidelity, distillation_losses


def _logsig(x):
    return -np.logaddexp(0.0, -x)


def _adl_and_grad_numpy(z_s, z_t, beta, gamma, power):
    """Normalised paper ADL and its gradient w.r.t. z_s, by hand (float64 numpy).

    KL = q(log q - log p) + (1-q)(log(1-q) - log(1-p)), dKL/dz_s = p - q;
    x = KL + beta*T(q), W = (1 - e^-x)^gamma, dW/dz_s = gamma (1-e^-x)^(gamma-1) e^-x (p - q);
    L = sum(W KL) / max(1, sum q^power), dL/dz_s = (p - q) (W + KL dW/dKL) / N.
    """
    q, p = 1 / (1 + np.exp(-z_t)), 1 / (1 + np.exp(-z_s))
    kl = q * (_logsig(z_t) - _logsig(z_s)) + (1 - q) * (_logsig(-z_t) - _logsig(-z_s))
    ent = -(q * _logsig(z_t) + (1 - q) * _logsig(-z_t))
    x = kl + beta * ent
    w = (1 - np.exp(-x)) ** gamma
    dw_dkl = gamma * (1 - np.exp(-x)) ** (gamma - 1) * np.exp(-x)
    n = max(1.0, np.sum(q**power))
    return np.sum(w * kl) / n, (p - q) * (w + kl * dw_dkl) / n, n


def _batch(seed=0, shape=(2, 300, 6)):
    gen = torch.Generator().manual_seed(seed)
    teacher = -4.6 + 1.5 * torch.randn(shape, generator=gen, dtype=torch.float64)
    student = -4.6 + 1.0 * torch.randn(shape, generator=gen, dtype=torch.float64)
    return student, teacher


def test_identical_teacher_gives_zero_error_and_cosine_one():
    student, teacher = _batch()
    f = adl_fidelity(student, teacher, teacher.clone())
    assert f["loss_rel_error"] == 0.0
    assert f["normalizer_rel_error"] == 0.0
    assert f["grad_cosine"] == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("beta", [1.0, 0.0])
def test_perturbed_teacher_matches_closed_form_gradient(beta):
    student, teacher = _batch(seed=1)
    perturbed = teacher + 0.3 * torch.randn(teacher.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    f = adl_fidelity(student, teacher, perturbed, beta=beta, gamma=2.0, power=1.8)
    l_e, g_e, n_e = _adl_and_grad_numpy(student.numpy(), teacher.numpy(), beta, 2.0, 1.8)
    l_d, g_d, n_d = _adl_and_grad_numpy(student.numpy(), perturbed.numpy(), beta, 2.0, 1.8)
    cos = float(g_e.ravel() @ g_d.ravel() / (np.linalg.norm(g_e) * np.linalg.norm(g_d)))
    assert cos < 0.9999  # the perturbation is visible
    assert f["grad_cosine"] == pytest.approx(cos, abs=1e-10)
    assert f["loss_rel_error"] == pytest.approx(abs(l_d - l_e) / l_e, rel=1e-8)
    assert f["normalizer_rel_error"] == pytest.approx(abs(n_d - n_e) / n_e, rel=1e-8)
    assert f["loss_exact"] == pytest.approx(l_e, rel=1e-10)


def test_float32_inputs_are_measured_in_float64():
    student, teacher = _batch(seed=2)
    f = adl_fidelity(student.float(), teacher.float(), (teacher + 1e-3).float())
    _, g_e, _ = _adl_and_grad_numpy(student.float().double().numpy(), teacher.float().double().numpy(), 1.0, 2.0, 1.8)
    _, g_d, _ = _adl_and_grad_numpy(student.float().double().numpy(), (teacher + 1e-3).float().double().numpy(), 1.0, 2.0, 1.8)
    cos = float(g_e.ravel() @ g_d.ravel() / (np.linalg.norm(g_e) * np.linalg.norm(g_d)))
    assert f["grad_cosine"] == pytest.approx(cos, abs=1e-12)


def _kd_and_weighted_ce_grads_numpy(z_s, z_t, w0, power):
    """Gradients w.r.t. z_s of the normalised plain KD and weighted soft CE, by hand (float64 numpy).

    KD = KL(q||p): dKD/dz_s = p - q.
    WCE = -(q log p + w0 (1-q) log(1-p)): dWCE/dz_s = -q (1-p) + w0 (1-q) p.
    Both divided by N = max(1, sum q^power), which does not depend on z_s.
    """
    q, p = 1 / (1 + np.exp(-z_t)), 1 / (1 + np.exp(-z_s))
    n = max(1.0, np.sum(q**power))
    return (p - q) / n, (-q * (1 - p) + w0 * (1 - q) * p) / n


def test_kd_and_weighted_ce_fidelity_match_closed_form_gradients():
    student, teacher = _batch(seed=3)
    # a background-only perturbation, as the codec's floor makes: only entries with q < 0.03 move
    q = torch.sigmoid(teacher)
    perturbed = torch.where(q < 0.03, teacher + 0.5, teacher)
    fns = distillation_losses(background_weight=1.5)
    g_kd_e, g_wce_e = _kd_and_weighted_ce_grads_numpy(student.numpy(), teacher.numpy(), 1.5, 1.8)
    g_kd_d, g_wce_d = _kd_and_weighted_ce_grads_numpy(student.numpy(), perturbed.numpy(), 1.5, 1.8)
    for name, g_e, g_d in (("kd", g_kd_e, g_kd_d), ("weighted_ce", g_wce_e, g_wce_d)):
        f = distill_fidelity(student, teacher, perturbed, fns[name], power=1.8)
        cos = float(g_e.ravel() @ g_d.ravel() / (np.linalg.norm(g_e) * np.linalg.norm(g_d)))
        assert cos < 0.9999  # the perturbation is visible
        assert f["grad_cosine"] == pytest.approx(cos, abs=1e-10)
        assert f["grad_rel_error"] == pytest.approx(np.linalg.norm(g_d - g_e) / np.linalg.norm(g_e), rel=1e-8)
    # ADL through the generic function is adl_fidelity
    a = adl_fidelity(student, teacher, perturbed)
    b = distill_fidelity(student, teacher, perturbed, fns["adl"])
    assert a == b


def test_shape_mismatch_raises():
    student, teacher = _batch()
    with pytest.raises(ValueError, match="one shape"):
        adl_fidelity(student, teacher, teacher[:1])


def test_size_report_of_incompressible_and_constant_codes():
    gen = torch.Generator().manual_seed(0)
    # q uniform on [0, 1] -> 256 equiprobable codes: ~8 bits per value after zstd (entropy 8 bits)
    q = torch.rand((3, 4000, 6), generator=gen, dtype=torch.float64)
    report = codec_size_report(UniformProbabilityCodec(levels=256), torch.log(q / (1 - q)))
    assert 7.8 < report["bits_per_value"] < 8.3
    assert report["ratio_vs_float32"] == pytest.approx(32.0 / report["bits_per_value"])
    # every value equal -> one code repeated: zstd shrinks 24000 bytes to a few dozen
    constant = codec_size_report(UniformProbabilityCodec(levels=256), torch.full((3, 4000, 6), -4.6))
    assert constant["bits_per_value"] < 0.02
    assert constant["encode_ms"] >= 0 and constant["decode_ms"] >= 0
    with pytest.raises(ValueError, match=r"\[B, A, K\]"):
        codec_size_report(UniformProbabilityCodec(), torch.zeros(10, 6))
