"""Detectors: self-describing checkpoints, torchvision state dicts, COCO 91->80 channels, backbone files."""

from __future__ import annotations

import pytest
import torch
from torchvision.models import resnet18, resnet34
from torchvision.models.detection import (RetinaNet_ResNet50_FPN_Weights, retinanet_resnet50_fpn,
                                          retinanet_resnet50_fpn_v2)

from sadpipe.geometry import AnchorLayout
from sadpipe.models import (COCO80_CATEGORY_IDS, CheckpointError, Detector, build_detector, default_spec, load_detector,
                            save_checkpoint)
from sadpipe.transforms import Preprocess

TINY = dict(fpn_channels=16, tiny_widths=[8, 16, 32, 64], head_norm="group")


def _tiny_spec(**kw):
    layout = AnchorLayout(sizes=(16, 32, 64, 128, 256), aspect_ratios=(0.5, 1.0, 2.0), scales=(1.0, 1.5))
    pre = Preprocess(min_size=96, max_size=160, image_mean=(0.5, 0.4, 0.3), image_std=(0.2, 0.25, 0.3))
    return default_spec("tiny", 3, layout, pre, category_ids=[4, 9, 11], class_names=["a", "b", "c"], **TINY, **kw)


def _image(seed: int, size: int = 128) -> torch.Tensor:
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_checkpoint_is_self_describing(tmp_path):
    torch.manual_seed(0)
    model = build_detector(_tiny_spec()).eval()
    # non-default BN statistics, so the buffers must travel with the weights
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    path = save_checkpoint(tmp_path / "m.pt", model, {"step": 7})
    loaded = load_detector(path).eval()  # nothing but the file
    assert loaded.spec == model.spec
    assert loaded.layout == model.layout and loaded.preprocess == model.preprocess
    assert loaded.layout.anchors_per_cell == 6 and loaded.num_classes == 3
    x = _image(1)
    with torch.no_grad():
        (c1, b1), (c2, b2) = model(x), loaded(x)
    assert c1.shape == (1, model.layout.num_anchors((128, 128)), 3)
    assert torch.equal(c1, c2) and torch.equal(b1, b2)
    assert not (tmp_path / "m.pt.tmp").exists()


def _tv_head_outputs(tv_model, x):
    with torch.no_grad():
        features = list(tv_model.backbone(x).values())
        out = tv_model.head(features)
    return out["cls_logits"], out["bbox_regression"]


@pytest.fixture(scope="module")
def torchvision_files(tmp_path_factory) -> dict:
    """arch -> (torchvision model in eval mode, its plain state dict file), built once per module."""
    out = {}
    for arch, factory in (("retinanet_resnet50_fpn", retinanet_resnet50_fpn),
                          ("retinanet_resnet50_fpn_v2", retinanet_resnet50_fpn_v2)):
        torch.manual_seed(0)
        tv = factory(weights=None, weights_backbone=None, num_classes=91).eval()
        path = tmp_path_factory.mktemp("tv") / "tv.pth"
        torch.save(tv.state_dict(), path)
        out[arch] = (tv, path)
    return out


@pytest.mark.parametrize("arch", ["retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2"])
def test_torchvision_state_dict_gives_torchvision_head_outputs(torchvision_files, arch):
    tv, path = torchvision_files[arch]
    ours = load_detector(path, arch=arch, num_classes=91).eval()
    # a normalised image already at a padded size (128 = the pad divisor), as GeneralizedRCNNTransform would feed it
    x = _image(2)
    with torch.no_grad():
        cls, box = ours(x)
    tv_cls, tv_box = _tv_head_outputs(tv, x)
    assert cls.shape == tv_cls.shape == (1, ours.layout.num_anchors((128, 128)), 91)
    torch.testing.assert_close(cls, tv_cls, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(box, tv_box, rtol=1e-5, atol=1e-5)
    # and torchvision's default anchor geometry, so the outputs also mean the same boxes
    assert ours.layout.sizes == (32, 64, 128, 256, 512) and ours.preprocess.min_size == 800
    assert ours.preprocess.max_size == 1333


def test_coco91_to_80_keeps_the_category_channels(torchvision_files):
    # the used COCO ids, independently: the non-"N/A" entries of torchvision's 91-slot category list
    names = RetinaNet_ResNet50_FPN_Weights.COCO_V1.meta["categories"]
    used_ids = [i for i, n in enumerate(names) if i > 0 and n != "N/A"]
    assert len(used_ids) == 80 and list(COCO80_CATEGORY_IDS) == used_ids

    path = torchvision_files["retinanet_resnet50_fpn"][1]
    m91 = load_detector(path, arch="retinanet_resnet50_fpn", num_classes=91).eval()
    m80 = load_detector(path, arch="retinanet_resnet50_fpn", num_classes=91, coco91_to_80=True).eval()
    assert m80.num_classes == 80 and m80.spec["category_ids"] == used_ids
    x = _image(3)
    with torch.no_grad():
        c91, b91 = m91(x)
        c80, b80 = m80(x)
    assert c80.shape[-1] == 80
    for label, category_id in enumerate(used_ids):
        assert torch.equal(c80[..., label], c91[..., category_id]), (label, category_id)
    assert torch.equal(b80, b91)  # box branch untouched


def test_backbone_weights_from_a_local_file(tmp_path):
    torch.manual_seed(0)
    reference = resnet18(weights=None)
    with torch.no_grad():
        reference.bn1.running_mean.uniform_(-1, 1)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    layout, pre = AnchorLayout(), Preprocess(128, 128)
    spec = default_spec("resnet18", 6, layout, pre, fpn_channels=32)
    torch.manual_seed(1)  # a different init, so equality can only come from the file
    model = build_detector(spec, path)
    body = model.backbone.body
    assert torch.equal(body.conv1.weight, reference.conv1.weight)
    assert torch.equal(body.layer3[1].conv2.weight, reference.layer3[1].conv2.weight)
    assert torch.equal(body.bn1.running_mean, reference.bn1.running_mean)
    assert not torch.equal(build_detector(spec).backbone.body.conv1.weight, reference.conv1.weight)


def test_backbone_weights_errors(tmp_path):
    spec = default_spec("resnet18", 6, AnchorLayout(), Preprocess(128, 128), fpn_channels=32)
    missing = tmp_path / "nowhere" / "resnet18.pth"
    with pytest.raises(CheckpointError, match=r"not found: .*nowhere.*resnet18\.pth"):
        build_detector(spec, missing)
    wrong = tmp_path / "resnet34.pth"
    torch.save(resnet34(weights=None).state_dict(), wrong)
    with pytest.raises(CheckpointError, match=r"resnet34\.pth.*do not fit arch resnet18"):
        build_detector(spec, wrong)


def test_load_detector_errors(tmp_path, torchvision_files):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_detector(tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_detector(garbage)
    plain = tmp_path / "plain.pt"
    torch.save(build_detector(_tiny_spec()).state_dict(), plain)
    with pytest.raises(CheckpointError, match="plain state dict: pass arch"):
        load_detector(plain)
    # a torchvision v1 file with the wrong class count or read as v2: shape mismatch, named
    tv = torchvision_files["retinanet_resnet50_fpn"][1]
    with pytest.raises(CheckpointError, match=r"tv\.pth.*retinanet_resnet50_fpn with 80 classes.*cls_logits"):
        load_detector(tv, arch="retinanet_resnet50_fpn", num_classes=80)
    with pytest.raises(CheckpointError, match=r"tv\.pth.*retinanet_resnet50_fpn_v2 with 91 classes.*p6"):
        load_detector(tv, arch="retinanet_resnet50_fpn_v2", num_classes=91)
    with pytest.raises(CheckpointError, match="unknown arch"):
        default_spec("resnet9000", 3, AnchorLayout(), Preprocess(128, 128))


def test_default_specs_have_no_structure_keys():
    # specs (and so checkpoints) of every arch at its defaults are what they were before the options existed
    for arch in ("tiny", "resnet18", "resnet50", "retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2"):
        spec = default_spec(arch, 3, AnchorLayout(), Preprocess(128, 128))
        assert not {"fpn_p6_input", "fpn_relu_before_p7", "stride_in_1x1"} & set(spec), arch
    spec = default_spec("resnet50", 3, AnchorLayout(), Preprocess(128, 128), fpn_p6_input="p5",
                        fpn_relu_before_p7=True, stride_in_1x1=False)  # the defaults, named
    assert "fpn_p6_input" not in spec and "stride_in_1x1" not in spec


def test_structure_options_change_the_computation_as_documented():
    torch.manual_seed(0)
    base = dict(fpn_channels=16, backbone_norm="frozen_bn", head_norm="none")
    spec = default_spec("resnet50", 3, AnchorLayout(), Preprocess(128, 128), fpn_p6_input="c5",
                        fpn_relu_before_p7=False, stride_in_1x1=True, **base)
    model = build_detector(spec).eval()
    body, top = model.backbone.body, model.backbone.fpn.extra_blocks
    for layer in (body.layer2, body.layer3, body.layer4):  # MSRA: stride in the first 1x1
        assert layer[0].conv1.stride == (2, 2) and layer[0].conv2.stride == (1, 1)
    assert body.layer2[1].conv1.stride == (1, 1)
    x = _image(4)
    with torch.no_grad():
        c = body(x)
        p = model.backbone(x)
        # P6 = conv(C5) and P7 = conv(P6) without a ReLU, by hand
        torch.testing.assert_close(p["p6"], top.p6(c["2"]))  # body returns C3..C5 as "0".."2"
        torch.testing.assert_close(p["p7"], top.p7(p["p6"]))
        assert not torch.allclose(p["p7"], top.p7(torch.relu(p["p6"])))
    assert p["0"].shape[-1] == 16 and p["p7"].shape[-1] == 1  # strides unchanged: 128 / 8, 128 / 128
    reloaded = Detector(spec)
    reloaded.load_state_dict(model.state_dict())  # same parameter names as the default structure
    with pytest.raises(CheckpointError, match="stride_in_1x1 needs a bottleneck ResNet"):
        default_spec("resnet18", 3, AnchorLayout(), Preprocess(128, 128), stride_in_1x1=True)
    with pytest.raises(CheckpointError, match="exactly torchvision's structure"):
        default_spec("retinanet_resnet50_fpn", 3, AnchorLayout(), Preprocess(128, 128), fpn_relu_before_p7=False)
