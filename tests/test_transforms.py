"""Preprocessing against torchvision's GeneralizedRCNNTransform; flips, batch padding, config geometry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import REPO
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes

from sadpipe.config import ConfigError, load_config
from sadpipe.geometry import AnchorLayout
from sadpipe.transforms import Preprocess, geometry_from_config, hflip, pad_batch, scale_boxes

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _random_image(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("hw,min_size,max_size", [
    ((100, 150), 128, 128),    # long side limits: 128 x 128/150*100 = 85.33 -> 85
    ((37, 91), 64, 100),       # long side limits: 100/91 -> 40 x 100
    ((120, 90), 128, 1000),    # short side limits: 128/90 -> 170 x 128 (upsampling)
    ((128, 128), 128, 128),    # no resize at all
    ((300, 200), 100, 1333),   # downsampling by 2 -> 150 x 100
])
def test_preprocess_matches_torchvision_transform(hw, min_size, max_size):
    image = _random_image(*hw, seed=hw[0])
    pre = Preprocess(min_size=min_size, max_size=max_size, pad_divisor=128, image_mean=MEAN, image_std=STD)
    (h, w), (ph, pw) = pre.sizes(*hw)
    ours = pre(image)

    tv = GeneralizedRCNNTransform(min_size, max_size, list(MEAN), list(STD), size_divisible=128).eval()
    with torch.no_grad():
        image_list, _ = tv([torch.from_numpy(image).permute(2, 0, 1).float() / 255.0])
    assert image_list.image_sizes[0] == (h, w)
    assert ours.shape == (3, h, w) and ours.dtype == torch.float32
    assert tuple(image_list.tensors.shape[-2:]) == (ph, pw)
    # torchvision normalises then resizes; bilinear weights sum to 1, so the order does not matter
    torch.testing.assert_close(ours, image_list.tensors[0, :, :h, :w], rtol=0, atol=1e-4)
    padded, canvas = pad_batch([ours], [(ph, pw)])
    assert canvas == (ph, pw)
    torch.testing.assert_close(padded, image_list.tensors, rtol=0, atol=1e-4)


def test_preprocess_normalises_by_hand():
    # a constant 128-px grey image needs no resize: value (v / 255 - mean_c) / std_c per channel
    image = np.full((128, 128, 3), (0, 51, 255), dtype=np.uint8)
    out = Preprocess(128, 128)(image)
    expected = [(0 - 0.485) / 0.229, (0.2 - 0.456) / 0.224, (1.0 - 0.406) / 0.225]
    for c in range(3):
        assert torch.allclose(out[c], torch.full((128, 128), expected[c]), atol=1e-6)


def test_preprocess_dict_round_trip():
    pre = Preprocess(96, 160, pad_divisor=64, image_mean=(0.1, 0.2, 0.3), image_std=(0.4, 0.5, 0.6))
    d = pre.to_dict()
    assert d["image_mean"] == [0.1, 0.2, 0.3]  # plain lists: TOML/JSON friendly
    assert Preprocess.from_dict(d) == pre


def test_scale_boxes_matches_torchvision():
    boxes = np.array([[10, 20, 50, 60], [0, 0, 150, 100]], dtype=np.float32)
    ours = scale_boxes(boxes, (100, 150), (85, 128))
    theirs = resize_boxes(torch.from_numpy(boxes), (100, 150), (85, 128)).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)
    # by hand: x * 128/150, y * 85/100
    np.testing.assert_allclose(ours[0], [10 * 128 / 150, 20 * 0.85, 50 * 128 / 150, 60 * 0.85], rtol=1e-6)
    assert ours.dtype == np.float32


def test_hflip_image_and_boxes_by_hand():
    image = np.zeros((4, 5, 3), dtype=np.uint8)
    image[1, 0] = (255, 0, 0)          # a red pixel in column 0 ...
    boxes = np.array([[0, 1, 1, 2], [1.5, 0, 4, 3]], dtype=np.float32)
    flipped, fboxes = hflip(image, boxes)
    assert tuple(flipped[1, 4]) == (255, 0, 0) and flipped[1, :4].sum() == 0   # ... lands in column 4
    # width 5: x1' = 5 - x2, x2' = 5 - x1; y unchanged
    np.testing.assert_array_equal(fboxes, [[4, 1, 5, 2], [1, 0, 3.5, 3]])
    np.testing.assert_array_equal(boxes, [[0, 1, 1, 2], [1.5, 0, 4, 3]])  # inputs untouched
    again, back = hflip(flipped, fboxes)
    np.testing.assert_array_equal(again, image)
    np.testing.assert_array_equal(back, boxes)
    assert hflip(image)[1] is None


def test_pad_batch_layout():
    a = torch.full((3, 50, 70), 1.0)
    b = torch.full((3, 130, 40), 2.0)
    batch, canvas = pad_batch([a, b], [(128, 128), (256, 128)])
    assert canvas == (256, 128) and batch.shape == (2, 3, 256, 128)
    # each image top-left, zeros everywhere else
    assert torch.all(batch[0, :, :50, :70] == 1) and batch[0].sum() == 3 * 50 * 70
    assert torch.all(batch[1, :, :130, :40] == 2) and batch[1].sum() == 2 * 3 * 130 * 40


def test_geometry_from_config():
    cfg = load_config(REPO / "pipelines" / "toy.toml", ["geometry.scales=[1.0, 1.5]", "geometry.image_std=[1, 1, 1]"])
    layout, pre = geometry_from_config(cfg)
    # toy.toml: 128/128, pad 128, anchors 16..256 on strides 8..128
    assert layout == AnchorLayout(strides=(8, 16, 32, 64, 128), sizes=(16.0, 32.0, 64.0, 128.0, 256.0),
                                  aspect_ratios=(0.5, 1.0, 2.0), scales=(1.0, 1.5), pad_divisor=128)
    assert layout.anchors_per_cell == 6
    assert pre == Preprocess(min_size=128, max_size=128, pad_divisor=128, image_mean=MEAN, image_std=(1, 1, 1))
    # 128x128: (16*16 + 8*8 + 4*4 + 2*2 + 1) cells * 6 anchors
    assert layout.num_anchors(pre.sizes(128, 128)[1]) == (256 + 64 + 16 + 4 + 1) * 6


def test_geometry_from_config_rejects_inconsistent_geometry():
    cfg = load_config(REPO / "pipelines" / "toy.toml", ["geometry.pad_divisor=96"])
    with pytest.raises(ConfigError, match=r"geometry.*pad_divisor 96.*128"):
        geometry_from_config(cfg)
    cfg = load_config(REPO / "pipelines" / "toy.toml", ["geometry.anchor_sizes=[16, 32]"])
    with pytest.raises(ConfigError, match=r"geometry.*one size per level"):
        geometry_from_config(cfg)


def test_default_preprocess_dict_is_unchanged_by_the_new_options():
    # the dict checkpoints and stores carried before channel_order / pixel_scale existed
    assert Preprocess(800, 1333).to_dict() == {"min_size": 800, "max_size": 1333, "pad_divisor": 128,
                                               "image_mean": list(MEAN), "image_std": list(STD)}
    assert Preprocess.from_dict(Preprocess(800, 1333).to_dict()) == Preprocess(800, 1333)


def test_bgr_0_255_preprocessing_by_hand():
    """detectron2's input: BGR pixels on 0-255 minus the BGR mean, std 1."""
    pre = Preprocess(4, 6, image_mean=(103.53, 116.28, 123.675), image_std=(1.0, 1.0, 1.0), channel_order="BGR",
                     pixel_scale=255)
    image = np.zeros((4, 6, 3), np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = 10, 20, 30  # R, G, B
    x = pre(image)
    # channel 0 is blue: 30 - 103.53 = -73.53; green 20 - 116.28 = -96.28; red 10 - 123.675 = -113.675
    torch.testing.assert_close(x[:, 0, 0], torch.tensor([-73.53, -96.28, -113.675]))
    assert pre.to_dict()["channel_order"] == "BGR" and pre.to_dict()["pixel_scale"] == 255.0
    assert Preprocess.from_dict(pre.to_dict()) == pre
    # RGB on 0-255 with mean/std x 255 is the default on 0-1 (MMDetection's pytorch-style numbers)
    mm = Preprocess(4, 6, image_mean=tuple(255 * m for m in MEAN), image_std=tuple(255 * s for s in STD),
                    pixel_scale=255.0)
    torch.testing.assert_close(mm(image), Preprocess(4, 6)(image))
    with pytest.raises(ValueError, match="channel_order 'BRG'"):
        Preprocess(4, 6, channel_order="BRG")
    with pytest.raises(ValueError, match="pixel_scale 2"):
        Preprocess(4, 6, pixel_scale=2)


def test_geometry_from_config_reads_the_foreign_teacher_options():
    cfg = load_config(REPO / "pipelines" / "toy.toml", ["geometry.rounded_anchors=false", 'geometry.channel_order="BGR"',
                                                        "geometry.pixel_scale=255", "geometry.image_std=[1, 1, 1]"])
    layout, pre = geometry_from_config(cfg)
    assert layout.rounded_anchors is False and pre.channel_order == "BGR" and pre.pixel_scale == 255.0
    # defaults: nothing new in the dicts
    layout, pre = geometry_from_config(load_config(REPO / "pipelines" / "toy.toml"))
    assert "rounded_anchors" not in layout.to_dict() and set(pre.to_dict()) == {
        "min_size", "max_size", "pad_divisor", "image_mean", "image_std"}
    with pytest.raises(ConfigError, match="channel_order 'XYZ'"):
        geometry_from_config(load_config(REPO / "pipelines" / "toy.toml", ['geometry.channel_order="XYZ"']))
