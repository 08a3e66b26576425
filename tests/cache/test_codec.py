"""Tests of sadpipe.cache.codec: bin placement, round-trip bounds, extremes, fitting, serialisation."""

import json
import math

import numpy as np
import pytest
import torch

from sadpipe.cache.codec import (
    BinnedProbabilityCodec,
    UniformProbabilityCodec,
    binned_edges,
    codec_from_dict,
    default_codec,
)


def _sigmoid64(z):
    return 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64)))


def _random_logits(shape, seed=0):
    """Logits spread over the whole useful range: mostly background near -4.6, some positives."""
    gen = torch.Generator().manual_seed(seed)
    z = -4.6 + 1.0 * torch.randn(shape, generator=gen)
    pos = torch.rand(shape, generator=gen) < 0.1
    return torch.where(pos, torch.empty(shape).uniform_(-8, 8, generator=gen), z)


def test_binned_edges_by_hand():
    # floor 0.02, ratio 1.6: 0.02, 0.032, 0.0512, 0.08192 (x1.6 = 0.131 > 0.1 stops);
    # then steps of 0.02: 0.10192, 0.12192, ...; the last edge is the largest below 1 - 0.01:
    # 0.08192 + 45 * 0.02 = 0.98192 (46 steps would give 1.00192).
    edges = binned_edges(0.02, 0.6, 0.1, 0.02)
    np.testing.assert_allclose(edges[:6], [0.02, 0.032, 0.0512, 0.08192, 0.10192, 0.12192])
    assert len(edges) == 4 + 45
    assert edges[-1] == pytest.approx(0.98192)
    assert BinnedProbabilityCodec(floor=0.02, log_ratio=0.6, log_until=0.1, step=0.02).num_codes == 50


@pytest.mark.parametrize("codec", [
    BinnedProbabilityCodec(),
    BinnedProbabilityCodec(floor=0.03, step=0.01),
    BinnedProbabilityCodec(floor=0.01, log_ratio=0.3, log_until=0.2, step=0.005),
])
def test_code_is_the_bin_of_q_and_decoded_q_stays_in_that_bin(codec):
    z = _random_logits((4000, 6))
    codes = codec.encode(z).numpy()
    q = _sigmoid64(z.double().numpy())
    # second formula: the code is the number of edges at or below q (searchsorted in float64)
    expected = np.searchsorted(codec.edges_q, q, side="right")
    # entries within float32 rounding of an edge may fall either side; there are none here
    assert (codes == expected).mean() > 0.999
    lo, hi = codec.bin_bounds_q()
    q_dec = _sigmoid64(codec.decode(codes).numpy())
    c = codes.astype(np.int64)
    assert np.all(q_dec >= lo[c] * (1 - 1e-5)) and np.all(q_dec <= hi[c] * (1 + 1e-5))
    # hence |decoded q - q| is at most the width of q's bin (for entries binned like the float64 rule)
    ok = codes == expected
    assert np.all(np.abs(q_dec - q)[ok] <= (hi - lo)[c][ok] * (1 + 1e-5))


def test_uniform_probability_decodes_within_half_a_bin():
    codec = UniformProbabilityCodec(levels=64)
    z = _random_logits((2000, 6), seed=1)
    q = _sigmoid64(z.numpy())
    q_dec = _sigmoid64(codec.decode(codec.encode(z)).numpy())
    assert np.max(np.abs(q_dec - q)) <= 0.5 / 64 + 1e-6


@pytest.mark.parametrize("codec", [BinnedProbabilityCodec(), UniformProbabilityCodec(levels=128), default_codec()])
def test_codes_are_monotone_in_the_logit(codec):
    z = torch.linspace(-60, 60, 20001)
    codes = codec.encode(z).numpy().astype(np.int64)
    assert np.all(np.diff(codes) >= 0)
    assert codes[0] == 0
    decoded = codec.decode(codes.astype(np.uint8)).numpy()
    assert np.all(np.diff(decoded) >= 0)


@pytest.mark.parametrize("codec", [BinnedProbabilityCodec(), UniformProbabilityCodec(), default_codec()])
def test_extreme_logits_encode_to_end_codes_without_nan(codec):
    z = torch.tensor([[-1e4, -50.0, 50.0, 1e4, -math.inf, math.inf]])
    codes = codec.encode(z)
    assert codes.dtype == torch.uint8
    top = (codec.num_codes if hasattr(codec, "num_codes") else codec.levels) - 1
    assert codes.tolist() == [[0, 0, top, top, 0, top]]
    decoded = codec.decode(codes)
    assert torch.isfinite(decoded).all()
    # float16 and float64 inputs are accepted too
    assert torch.equal(codec.encode(z.double()), codes)
    assert torch.equal(codec.encode(torch.tensor([[-50.0, 50.0]], dtype=torch.float16)), torch.tensor([[0, top]], dtype=torch.uint8))


def test_decode_accepts_numpy_torch_and_noncontiguous_codes():
    codec = BinnedProbabilityCodec()
    codes = codec.encode(_random_logits((301, 6), seed=2))
    table = codec.decode_table()
    expected = table[codes.numpy().astype(np.int64)]  # plain indexing as the second formula
    np.testing.assert_array_equal(codec.decode(codes).numpy(), expected)
    np.testing.assert_array_equal(codec.decode(codes.numpy()).numpy(), expected)
    odd = codes.numpy()[:, :5]  # odd size per row, non-contiguous
    np.testing.assert_array_equal(codec.decode(odd).numpy(), expected[:, :5])
    assert codec.decode(codes).dtype == torch.float32
    with pytest.raises(TypeError, match="uint8"):
        codec.decode(codes.numpy().astype(np.int32))


def test_fit_decodes_each_bin_to_its_power_mean():
    codec = BinnedProbabilityCodec(floor=0.02, log_ratio=0.6, log_until=0.1, step=0.02)
    # bin 0 holds equal numbers of q = 0.005 and q = 0.01; bin 1 [0.02, 0.032) only q = 0.025
    q = np.array([0.005] * 100 + [0.01] * 100 + [0.025] * 100)
    z = torch.from_numpy(np.log(q / (1 - q)))[None, :, None]
    fitted = codec.fit(z, floor_context=False)
    expected0 = ((0.005**1.8 + 0.01**1.8) / 2) ** (1 / 1.8)  # = 0.007915...
    assert fitted.decode_q[0] == pytest.approx(expected0, rel=1e-9)
    assert fitted.decode_q[1] == pytest.approx(0.025, rel=1e-9)
    # empty bins keep the power mean of a uniform distribution over the bin:
    # ((hi^2.8 - lo^2.8) / (2.8 (hi - lo)))^(1/1.8) for bin 2 = [0.032, 0.0512)
    lo, hi = 0.032, 0.0512
    assert fitted.decode_q[2] == pytest.approx(((hi**2.8 - lo**2.8) / (2.8 * (hi - lo))) ** (1 / 1.8), rel=1e-9)
    decoded_q = _sigmoid64(fitted.decode(fitted.encode(z)).numpy()).ravel()
    # the normaliser sum q^1.8 is preserved exactly on the fitting sample
    assert np.sum(decoded_q**1.8) == pytest.approx(np.sum(q**1.8), rel=1e-5)


def test_fit_floor_context_recovers_a_known_relation_and_decode_applies_it_per_image():
    codec = BinnedProbabilityCodec(floor=0.02)
    a, b = -8.0, 0.5
    images, n0 = [], 400
    for n1 in range(5, 45, 4):
        # each value below is repeated over K = 2 classes, so the image counts are 2*n0 and 2*n1
        x = math.log((2 * n1 + 1) / (2 * n0 + 1))
        q0 = math.exp((a + b * x) / 1.8)  # every code-0 entry of this image has this q
        q = np.array([q0] * n0 + [0.025] * n1 + [0.5] * (50 - n1))
        images.append(np.log(q / (1 - q)))
    z = torch.from_numpy(np.stack(images))[..., None].expand(-1, -1, 2).contiguous()  # [10, 450, 2]
    fitted = codec.fit(z)
    assert fitted.floor_context[0] == pytest.approx(a, abs=1e-6)
    assert fitted.floor_context[1] == pytest.approx(b, abs=1e-6)
    decoded = fitted.decode(fitted.encode(z))  # [B, A, K]: each image uses its own counts
    for i, image in enumerate(images):
        q0 = _sigmoid64(image[0])
        np.testing.assert_allclose(_sigmoid64(decoded[i, :n0].double().numpy()), q0, rtol=1e-4)
        single = fitted.decode(fitted.encode(z[i]))
        assert torch.equal(single, decoded[i])


def test_to_dict_round_trips_through_json():
    sample = _random_logits((12, 500, 6), seed=3)
    for codec in (UniformProbabilityCodec(levels=100), BinnedProbabilityCodec(floor=0.03, step=0.01),
                  BinnedProbabilityCodec().fit(sample), default_codec()):
        spec = json.loads(json.dumps(codec.to_dict()))
        assert "name" in spec
        rebuilt = codec_from_dict(spec)
        assert rebuilt == codec
        assert rebuilt.zstd_level == codec.zstd_level
        codes = codec.encode(sample[0])
        assert torch.equal(rebuilt.encode(sample[0]), codes)
        assert torch.equal(rebuilt.decode(codes), codec.decode(codes))


def test_invalid_specs_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown codec"):
        codec_from_dict({"name": "nope"})
    with pytest.raises(ValueError, match="does not accept"):
        codec_from_dict({"name": "binned_probability", "bogus": 1})
    with pytest.raises(ValueError, match="floor"):
        BinnedProbabilityCodec(floor=0.5, log_until=0.1)
    with pytest.raises(ValueError, match="codes"):
        BinnedProbabilityCodec(step=0.001)  # ~1000 uniform bins do not fit in uint8
    with pytest.raises(ValueError, match="decode_q"):
        BinnedProbabilityCodec(decode_q=(0.1, 0.2))
    with pytest.raises(ValueError, match="levels"):
        UniformProbabilityCodec(levels=300)


def test_default_codec_is_fitted_and_its_context_stays_below_the_floor():
    codec = default_codec()
    assert not codec.needs_fit and BinnedProbabilityCodec().needs_fit
    lo, hi = codec.bin_bounds_q()
    q = np.asarray(codec.decode_q)
    assert np.all((q >= lo) & (q <= hi))
    # an image of only background (n1 = 0) and one crowded just above the floor: the predicted
    # background value rises with n1 / n0 (slope b > 0) but never leaves bin 0 [0, floor)
    empty = _sigmoid64(codec.floor_value(18000, 0))
    crowded = _sigmoid64(codec.floor_value(100, 18000))
    assert 0 < empty < crowded <= codec.floor
