"""The two-way parameter name tables of the converters (sadpipe/convert/names.py)."""

import pytest
from torchvision.models.detection import retinanet_resnet50_fpn

from sadpipe.convert import detectron2, mmdet
from sadpipe.convert.names import Field, NameMap


def test_name_map_both_ways_with_shifted_and_converted_fields():
    names = NameMap([
        ("net.res{stage}.w", "body.layer{stage}.w"),
        ("sub.{conv}.{param}", "head.conv.{conv}.0.{param}"),
    ], {
        "stage": Field.shifted("[2-5]", "[1-4]", by=-1),
        "conv": Field(r"\d*[02468]", r"\d+", lambda v: str(int(v) // 2), lambda v: str(2 * int(v))),
        "param": Field("weight|bias"),
    })
    assert names.to_torchvision("net.res2.w") == "body.layer1.w"       # 2 - 1
    assert names.to_torchvision("net.res5.w") == "body.layer4.w"
    assert names.to_torchvision("net.res6.w") is None                  # outside [2-5]
    assert names.to_torchvision("sub.12.bias") == "head.conv.6.0.bias"  # 12 // 2
    assert names.to_torchvision("sub.3.bias") is None                  # odd positions are ReLUs
    assert names.to_torchvision("sub.2.running_mean") is None          # not weight|bias
    assert names.to_torchvision("xnet.res2.w") is None                 # the whole name must match
    assert names.to_torchvision("net.res2.w.extra") is None
    assert names.to_file("body.layer4.w") == "net.res5.w"
    assert names.to_file("head.conv.6.0.weight") == "sub.12.weight"    # 2 * 6
    assert names.to_file("not.a.known.name") == "not.a.known.name"     # messages keep it as is


def test_templates_escape_dots():
    names = NameMap([("a.b", "c.d")], {})
    assert names.to_torchvision("a.b") == "c.d"
    assert names.to_torchvision("aXb") is None


@pytest.fixture(scope="module")
def torchvision_keys():
    model = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3)
    # BatchNorm's step counters are not parameters any foreign file carries
    return [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]


def test_mmdet_names_round_trip_for_every_parameter(torchvision_keys):
    file_state = {mmdet.file_name(k): k for k in torchvision_keys}
    assert len(file_state) == len(torchvision_keys)  # no two parameters share a file name
    renamed = mmdet.rename_state(file_state, "f.pth")
    assert renamed == {k: k for k in torchvision_keys}
    # hand-written from MMDetection's RetinaNet (ResNet + FPN with add_extra_convs, RetinaHead)
    assert mmdet.file_name("backbone.body.layer3.5.bn2.running_var") == "backbone.layer3.5.bn2.running_var"
    assert mmdet.file_name("backbone.fpn.inner_blocks.2.0.weight") == "neck.lateral_convs.2.conv.weight"
    assert mmdet.file_name("backbone.fpn.extra_blocks.p7.bias") == "neck.fpn_convs.4.conv.bias"
    assert mmdet.file_name("head.regression_head.conv.3.0.weight") == "bbox_head.reg_convs.3.conv.weight"


def test_detectron2_names_round_trip_for_every_parameter(torchvision_keys):
    file_state = {detectron2.file_name(k): k for k in torchvision_keys}
    assert len(file_state) == len(torchvision_keys)
    renamed, buffers = detectron2.rename_state(file_state, "f.pkl")
    assert renamed == {k: k for k in torchvision_keys} and buffers == {}
    # hand-written from detectron2's ResNet (res2..res5, convN.norm, shortcut), FPN and RetinaNetHead
    assert detectron2.file_name("backbone.body.layer2.3.bn1.running_mean") == \
        "backbone.bottom_up.res3.3.conv1.norm.running_mean"
    assert detectron2.file_name("backbone.body.layer1.0.downsample.1.weight") == \
        "backbone.bottom_up.res2.0.shortcut.norm.weight"
    assert detectron2.file_name("backbone.fpn.inner_blocks.0.0.weight") == "backbone.fpn_lateral3.weight"
    assert detectron2.file_name("backbone.fpn.layer_blocks.2.0.bias") == "backbone.fpn_output5.bias"
    assert detectron2.file_name("head.classification_head.conv.3.0.weight") == "head.cls_subnet.6.weight"
