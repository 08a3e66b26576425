"""Compact teacher targets (sadpipe/cache/targets.py): sparse form, fillers, packing, and the
device-side decode, checked against the codec's own dense CPU decode bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from numcodecs import Zstd

from sadpipe.cache import targets as tg
from sadpipe.cache.codec import BinnedProbabilityCodec, UniformProbabilityCodec, default_codec

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _synthetic_logits(num_anchors: int, num_classes: int, mu: float, sd: float, hard: int, seed: int) -> torch.Tensor:
    """Background N(mu, sd) plus ``hard`` entries N(1, 2) at random places (a detector-like teacher)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(num_anchors, num_classes, generator=g) * sd + mu
    flat = z.view(-1)
    flat[torch.randint(0, flat.numel(), (hard,), generator=g)] = torch.randn(hard, generator=g) * 2 + 1
    return z


def _record(codec, codes: torch.Tensor) -> tg.CompactTargets:
    return tg.targets_from_codes(codes, codec)


def test_gaps_past_uint16_are_bridged_by_fillers_that_decode_to_background():
    codes = torch.zeros(50_000, 6, dtype=torch.uint8)  # 300,000 values
    flat = codes.view(-1)
    flat[[3, 70_000, 299_999]] = torch.tensor([5, 1, 200], dtype=torch.uint8)
    deltas, values = tg.sparse_entries(codes)
    # gaps from position -1: 4, 69,997, 229,999. Fillers: (4-1)//65535 = 0, (69,997-1)//65535 = 1,
    # (229,999-1)//65535 = 3; each filler advances 65535 with code 0.
    assert deltas.tolist() == [4, 65535, 69_997 - 65535, 65535, 65535, 65535, 229_999 - 3 * 65535]
    assert values.tolist() == [5, 0, 1, 0, 0, 0, 200]
    codec = default_codec()
    record = _record(codec, codes)
    assert record.encoding == tg.SPARSE and record.num_entries == 7
    assert torch.equal(tg.decode(record, tg.code_table(codec)), codec.decode(codes).float())
    dense = tg.dense_codes(record.encoding, record.deltas.numpy(), record.codes.numpy(), codes.numel())
    assert np.array_equal(dense, flat.numpy())


def test_no_entry_above_background_is_an_empty_record():
    codec = default_codec()
    codes = torch.zeros(10, 3, dtype=torch.uint8)
    record = _record(codec, codes)
    assert record.num_entries == 0 and record.encoding == tg.SPARSE
    # the image's background: every one of its 30 entries is code 0 (n0 = 30, n1 = 0)
    assert record.background == pytest.approx(float(np.float32(codec.floor_value(30, 0))))
    assert torch.equal(tg.decode(record, tg.code_table(codec)), codec.decode(codes).float())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mu,sd", [(-3.0, 2.5), (-4.5, 1.2), (-7.0, 1.5), (-8.0, 1.0)])
@pytest.mark.parametrize("codec_kind", ["fitted", "no_context", "uniform"])
def test_device_decode_equals_the_codec_decode_bit_for_bit(device, mu, sd, codec_kind):
    z = _synthetic_logits(3069, 6, mu, sd, hard=200, seed=int(-mu * 10))
    codec = {"fitted": default_codec(), "no_context": BinnedProbabilityCodec(),
             "uniform": UniformProbabilityCodec(levels=128)}[codec_kind]
    codes = codec.encode(z)
    record = _record(codec, codes)
    # weak teachers (mu -3) have >1/3 of entries above the floor: stored dense; the others sparse
    expected_encoding = tg.DENSE if 3 * int((codes > 0).sum()) >= codes.numel() else tg.SPARSE
    assert record.encoding == expected_encoding
    decoded = tg.decode(record.to(device), tg.code_table(codec).to(device))
    assert decoded.device.type == device and decoded.dtype == torch.float32
    reference = codec.decode(codes.numpy()).float()  # the codec's CPU lookup (per-image floor value)
    assert torch.equal(decoded.cpu(), reference)


def test_pack_is_byte_planes_and_unpack_inverts_it():
    deltas = np.array([1, 300, 65535], np.uint16)
    codes = np.array([7, 8, 9], np.uint8)
    blob = tg.pack(tg.SPARSE, deltas, codes)
    # low bytes 1, 300 % 256 = 44, 255; high bytes 0, 300 // 256 = 1, 255; then the codes
    assert list(blob) == [1, 44, 255, 0, 1, 255, 7, 8, 9]
    d, c = tg.unpack(blob, tg.SPARSE, 3)
    assert d.view(np.uint16).tolist() == [1, 300, 65535] and c.tolist() == [7, 8, 9]
    with pytest.raises(ValueError, match="expected 3 x 4"):
        tg.unpack(blob, tg.SPARSE, 4)
    assert tg.unpack(bytes([3, 4]), tg.DENSE, 2)[1].tolist() == [3, 4]


def test_encoding_by_size_and_by_compressed_size_in_between():
    # sparse costs 3 bytes per entry, dense 1 per value: 34 of 100 -> 102 >= 100 dense; below 1/12
    # of the values sparse (8 of 100: 24 < 25); in between the compressed sizes decide (None)
    assert tg.choose_encoding(34, 100) == tg.DENSE
    assert tg.choose_encoding(8, 100) == tg.SPARSE
    assert tg.choose_encoding(9, 100) is None and tg.choose_encoding(33, 100) is None
    zstd = Zstd(level=3)
    g = torch.Generator().manual_seed(0)
    # ~20 % of the entries above the bin, scattered (sparse compresses smaller), or as 8 prototype
    # rows each repeated over runs of 40 anchors (like neighbouring anchors of one object: dense
    # runs compress smaller, measured 306 vs 552 bytes): the chosen form is the smaller one
    scattered = (torch.rand(3000, 80, generator=g) < 0.2).to(torch.uint8) * 7
    proto = ((torch.rand(8, 80, generator=g) < 0.2) * torch.randint(1, 30, (8, 80), generator=g)).to(torch.uint8)
    rows = proto[torch.arange(3000) // 40 % 8]
    for codes, expected in ((scattered, tg.SPARSE), (rows, tg.DENSE)):
        encoding, deltas, values = tg.compact_from_codes(codes)
        d2, v2 = tg.sparse_entries(codes)
        sizes = {tg.SPARSE: len(zstd.encode(tg.pack(tg.SPARSE, d2.numpy().astype(np.uint16), v2.numpy()))),
                 tg.DENSE: len(zstd.encode(codes.numpy().tobytes()))}
        assert encoding == expected == min(sizes, key=sizes.get), sizes


@pytest.mark.parametrize("mu,sd,min_gain", [(-4.5, 1.2, 1.0), (-7.0, 1.5, 1.3)])
def test_compact_records_compress_smaller_than_the_dense_codes(mu, sd, min_gain):
    """The stored bytes (zstd level 3, as the store writes them) of the compact record against the
    version-1 layout's dense codes of the same image. Measured at COCO geometry in
    benchmarks/coco_scale.py (15x -> 19x weak, 160x -> 264x confident); here at 1/10 of it."""
    z = _synthetic_logits(12_276, 80, mu, sd, hard=200, seed=3)
    codec = default_codec().fit(z[None])
    codes = codec.encode(z)
    record = _record(codec, codes)
    zstd = Zstd(level=3)
    compact = len(zstd.encode(tg.pack(record.encoding, record.deltas.numpy().view(np.uint16), record.codes.numpy())))
    dense = len(zstd.encode(codes.numpy().tobytes()))
    assert dense / compact >= min_gain, (dense, compact)


def test_a_version_1_store_is_refused_with_what_to_do(tmp_path):
    import zarr

    from sadpipe.cache.format import UnsupportedFormatError
    from sadpipe.cache.reader import TeacherCache

    root = zarr.open_group(tmp_path / "old.zarr", mode="w")
    root.attrs["sadpipe"] = {"format_version": 1}
    root.attrs["sadpipe_completion"] = {"complete": True}
    with pytest.raises(UnsupportedFormatError, match=r"version-1 teacher cache .* Re-dump the teacher"):
        TeacherCache(tmp_path / "old.zarr")
