import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList

from sadpipe.geometry import AnchorLayout, image_to_batch_index, padded_size, resized_size


def torchvision_anchors(layout: AnchorLayout, padded_hw):
    """Anchors from torchvision's own AnchorGenerator for one image on a padded canvas."""
    sizes = tuple(tuple(s * k for k in layout.scales) for s in layout.sizes)
    gen = AnchorGenerator(sizes, (tuple(layout.aspect_ratios),) * len(sizes))
    ph, pw = padded_hw
    images = ImageList(torch.zeros(1, 3, ph, pw), [(ph, pw)])
    feats = [torch.zeros(1, 1, ph // s, pw // s) for s in layout.strides]
    return gen(images, feats)[0]


@pytest.mark.parametrize("padded_hw", [(128, 128), (256, 384), (640, 1024), (1024, 640)])
@pytest.mark.parametrize("layout", [AnchorLayout(), AnchorLayout(sizes=(16, 32, 64, 128, 256))])
def test_anchors_match_torchvision(layout, padded_hw):
    ours = layout.anchors(padded_hw)
    ref = torchvision_anchors(layout, padded_hw)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_anchor_counts_by_hand():
    layout = AnchorLayout()
    # 128x128 canvas: grids 16x16, 8x8, 4x4, 2x2, 1x1 = 341 cells, 9 anchors each = 3069
    assert layout.num_anchors((128, 128)) == 3069
    # COCO 600/1000 worst case canvas 640x1024: (80*128 + 40*64 + 20*32 + 10*16 + 5*8) * 9 = 122760
    assert layout.max_anchors(600, 1000) == 122760


def test_cell_anchor_order_is_ratio_major():
    layout = AnchorLayout()
    cell = layout.cell_anchors(0)  # size 32 on P3
    # index 0: ratio 0.5 (h/w), scale 1 -> h = 32*sqrt(.5) = 22.63, w = 32/sqrt(.5) = 45.25 -> [-23,-11, 23, 11]
    assert cell[0].tolist() == [-23.0, -11.0, 23.0, 11.0]
    # index 4: ratio 1 (index 1), scale 2**(1/3) (index 1): side 40.3 -> half 20.16 -> [-20,-20,20,20]
    assert cell[4].tolist() == [-20.0, -20.0, 20.0, 20.0]


def test_resize_and_pad_rules():
    # 480x640 at 600/1000: scale = min(600/480, 1000/640) = min(1.25, 1.5625) = 1.25 -> 600x800
    assert resized_size(480, 640, 600, 1000) == (600, 800)
    # 300x1200 : min(600/300=2, 1000/1200=.8333) = .8333 -> 250 x 1000
    assert resized_size(300, 1200, 600, 1000) == (250, 1000)
    assert padded_size(600, 800, 128) == (640, 896)
    assert padded_size(128, 128, 128) == (128, 128)


def test_layout_rejects_inexact_divisor():
    with pytest.raises(ValueError, match="multiple of the largest stride"):
        AnchorLayout(pad_divisor=32)


def test_fingerprint_is_stable_and_sensitive():
    assert AnchorLayout().fingerprint() == AnchorLayout.from_dict(AnchorLayout().to_dict()).fingerprint()
    assert AnchorLayout().fingerprint() != AnchorLayout(sizes=(16, 32, 64, 128, 256)).fingerprint()


@pytest.mark.parametrize("image_hw,batch_hw", [((128, 256), (384, 256)), ((256, 128), (256, 384)), ((128, 128), (128, 128))])
def test_image_to_batch_index_maps_identical_anchors(image_hw, batch_hw):
    layout = AnchorLayout()
    idx = image_to_batch_index(layout, image_hw, batch_hw)
    # The same anchor boxes at the mapped positions: the image grid is the batch grid's top-left block.
    torch.testing.assert_close(layout.anchors(batch_hw)[idx], layout.anchors(image_hw), rtol=0, atol=0)
    assert idx.unique().numel() == idx.numel()


def test_image_to_batch_index_maps_head_outputs():
    """A conv head sees the same content at the mapped anchors when the image is padded into a larger canvas."""
    torch.manual_seed(0)
    layout = AnchorLayout(strides=(8, 16), sizes=(32, 64), pad_divisor=16)
    conv = torch.nn.Conv2d(3, layout.anchors_per_cell, 1)  # 1x1 conv: no spatial mixing, so padding cannot leak in

    def head(img):
        outs = []
        for s in layout.strides:
            f = conv(torch.nn.functional.avg_pool2d(img, s))
            outs.append(f.permute(0, 2, 3, 1).reshape(img.shape[0], -1))
        return torch.cat(outs, 1)

    img = torch.randn(1, 3, 32, 48)
    canvas = torch.zeros(1, 3, 64, 64)
    canvas[..., :32, :48] = img
    idx = image_to_batch_index(layout, (32, 48), (64, 64))
    torch.testing.assert_close(head(canvas)[0, idx], head(img)[0])


def test_default_layout_dict_and_fingerprint_are_unchanged_by_the_rounding_option():
    # what stores and checkpoints written before the option existed carry (sadpipe at 5d0b16b)
    assert AnchorLayout().to_dict() == {"strides": [8, 16, 32, 64, 128], "sizes": [32, 64, 128, 256, 512],
                                        "aspect_ratios": [0.5, 1.0, 2.0],
                                        "scales": [1.0, 2 ** (1 / 3), 2 ** (2 / 3)], "pad_divisor": 128,
                                        "version": 1}
    assert AnchorLayout().fingerprint() == "3c77b3738d9c82dc"
    assert AnchorLayout(sizes=(16, 32, 64, 128, 256)).fingerprint() == "7e8eddbb760d901f"
    # an old dict (no key) reads back as rounded
    assert AnchorLayout.from_dict(AnchorLayout().to_dict()).rounded_anchors is True


def test_unrounded_anchors_keep_float_corners():
    rounded, exact = AnchorLayout(), AnchorLayout(rounded_anchors=False)
    # P3, ratio 1 (index 1), scale 2^(1/3) (index 1): anchor 1 * 3 + 1 = 4, half side 32 * 2^(1/3) / 2 = 20.1587
    half = 32 * 2 ** (1 / 3) / 2
    torch.testing.assert_close(exact.cell_anchors(0)[4], torch.tensor([-half, -half, half, half]))
    assert rounded.cell_anchors(0)[4].tolist() == [-20.0, -20.0, 20.0, 20.0]
    # ratio 0.5 (h / w), scale 1: w = 32 / sqrt(0.5) = 45.2548, h = 32 * sqrt(0.5) = 22.6274
    w, h = 32 / 0.5 ** 0.5, 32 * 0.5 ** 0.5
    torch.testing.assert_close(exact.cell_anchors(0)[0], torch.tensor([-w / 2, -h / 2, w / 2, h / 2]))
    assert rounded.cell_anchors(0)[0].tolist() == [-23.0, -11.0, 23.0, 11.0]
    # shifted by the same grid: the difference is the cell anchors' rounding only
    diff = exact.anchors((128, 128)) - rounded.anchors((128, 128))
    assert 0 < diff.abs().max() <= 0.5
    assert exact.to_dict()["rounded_anchors"] is False
    assert AnchorLayout.from_dict(exact.to_dict()) == exact
    assert exact.fingerprint() != rounded.fingerprint()
