"""Converted MMDetection RetinaNets against MMDetection 3.3.0 itself (the `mmdet` extra installs it).

Random-weight RetinaNets are built by MMDetection from its own zoo config files, saved as MMDetection
checkpoints, converted by sadpipe, and compared on the same normalised input: anchors, head outputs,
final detections, and the normalisation of a uint8 image. Skipped when mmdet is not installed.

CI sets SADPIPE_REQUIRE_MMDET=1 (it installs the extra): a failed import is then an error, not a skip.

Full mmcv does not build here and mmcv-lite has no compiled ops. RetinaNet inference needs one of
them, nms; a stand-in ``mmcv._ext`` routes it to torchvision.ops.nms and raises for anything else.
"""

from __future__ import annotations

import importlib
import os
import sys
import types

import numpy as np
import pytest
import torch
import torchvision
from foreign_files import assert_same_detections


def _register_mmcv_ext_stand_in() -> None:
    try:
        import mmcv._ext  # noqa: F401  (full mmcv: its real ops)
        return
    except ImportError:
        pass

    class StandIn(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            if name == "nms":
                def nms(boxes, scores, iou_threshold, offset=0):
                    if offset != 0:
                        raise RuntimeError("stand-in nms supports offset 0 only")
                    return torchvision.ops.nms(boxes, scores, float(iou_threshold))
                return nms

            def unavailable(*args, **kwargs):
                raise RuntimeError(f"mmcv._ext.{name} is not available with mmcv-lite (stand-in)")
            return unavailable

    sys.modules["mmcv._ext"] = StandIn("mmcv._ext")


def _import(name: str):
    if os.environ.get("SADPIPE_REQUIRE_MMDET") == "1":
        return importlib.import_module(name)
    return pytest.importorskip(name)


_import("mmcv")
_register_mmcv_ext_stand_in()
mmdet = _import("mmdet")
_import("mmengine")

from mmengine.config import Config, ConfigDict  # noqa: E402
from mmdet.registry import MODELS  # noqa: E402
from mmdet.utils import register_all_modules  # noqa: E402

from sadpipe.config import DEFAULTS  # noqa: E402
from sadpipe.data.coco import COCO80_CATEGORY_IDS  # noqa: E402
from sadpipe.labeling import postprocess  # noqa: E402
from sadpipe.models import load_detector  # noqa: E402

register_all_modules()
CONFIGS = os.path.join(os.path.dirname(mmdet.__file__), ".mim", "configs", "retinanet")
COCO_CLASSES = tuple(mmdet.datasets.CocoDataset.METAINFO["classes"])


def _mmdet_config(name: str) -> Config:
    cfg = Config.fromfile(os.path.join(CONFIGS, name))
    cfg.model.backbone.init_cfg = None  # otherwise it downloads ImageNet weights
    return cfg


def _random_mmdet_retinanet(cfg: Config, seed: int):
    """MMDetection builds the zoo config; every weight and BatchNorm statistic is random."""
    torch.manual_seed(seed)
    model = MODELS.build(cfg.model)
    model.init_weights()
    if not isinstance(model.test_cfg, ConfigDict):
        model.test_cfg = ConfigDict(model.test_cfg)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                # mmdet zero-initialises each block's last BN weight; random here so residual branches count
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.0)
                m.bias.uniform_(-0.1, 0.1)
        for module in model.backbone.modules():
            # a small last BN in each residual block keeps a deep random net's activations O(1) (R101's
            # otherwise reach ~25 and saturate every score)
            last_bn = getattr(module, "norm3", None) if hasattr(module, "conv3") else getattr(module, "norm2", None)
            if hasattr(module, "downsample") and last_bn is not None:
                last_bn.weight.uniform_(0.1, 0.3)
        # mmdet's head init (std 0.01) shrinks the features to ~1e-2 by the last conv, leaving logits that are
        # their bias alone and scores that tie; He-scaled weights keep them apart: logits spread over the
        # score threshold, box deltas of a few tenths
        head = model.bbox_head
        for conv in [c.conv for c in list(head.cls_convs) + list(head.reg_convs)]:
            conv.weight.normal_(0, (2 / (9 * conv.in_channels)) ** 0.5)
            conv.bias.uniform_(-0.1, 0.1)
        head.retina_cls.weight.normal_(0, 0.5 * (1 / (9 * head.retina_cls.in_channels)) ** 0.5)
        head.retina_cls.bias.uniform_(-5, -3)
        head.retina_reg.weight.normal_(0, 0.2 * (1 / (9 * head.retina_reg.in_channels)) ** 0.5)
    return model.eval()


# (zoo config, input h x w, whether the checkpoint carries its config text as MMEngine writes it)
CASES = {
    "r50": ("retinanet_r50_fpn_1x_coco.py", (256, 384), False),
    "r101": ("retinanet_r101_fpn_1x_coco.py", (128, 256), False),
    "r50-caffe": ("retinanet_r50-caffe_fpn_1x_coco.py", (128, 256), True),
    "r18": ("retinanet_r18_fpn_1x_coco.py", (128, 128), True),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    name, hw, with_cfg = CASES[request.param]
    cfg = _mmdet_config(name)
    model = _random_mmdet_retinanet(cfg, seed=len(request.param))
    meta = {"dataset_meta": {"classes": COCO_CLASSES}}
    if with_cfg:
        meta["cfg"] = cfg.pretty_text
    path = tmp_path_factory.mktemp("mmdet") / f"{request.param}.pth"
    torch.save({"state_dict": model.state_dict(), "meta": meta}, path)
    return {"id": request.param, "cfg": cfg, "mmdet": model, "path": path, "hw": hw}


def _flat(levels: list[torch.Tensor], width: int) -> torch.Tensor:
    """[B, A*width, H, W] per level -> [B, sum H*W*A, width], MMDetection's own flattening in predict_by_feat."""
    return torch.cat([t.permute(0, 2, 3, 1).reshape(t.shape[0], -1, width) for t in levels], dim=1)


def test_structure_read_from_the_checkpoint(case):
    ours = load_detector(case["path"], source="mmdet")
    spec = ours.spec
    depth = case["cfg"].model.backbone.depth
    assert spec["arch"] == f"resnet{depth}" and spec["num_classes"] == 80
    assert spec["fpn_p6_input"] == "c5" and spec["fpn_relu_before_p7"] is False  # add_extra_convs='on_input'
    assert spec.get("stride_in_1x1", False) is (case["cfg"].model.backbone.style == "caffe")
    assert ours.layout.rounded_anchors is False
    # COCO's label order is its sorted category ids: mmdet label k is sadpipe label k
    assert spec["category_ids"] == list(COCO80_CATEGORY_IDS) and spec["class_names"] == list(COCO_CLASSES)


def test_anchors_head_outputs_and_detections_equal_mmdet(case):
    mm, h, w = case["mmdet"], *case["hw"]
    ours = load_detector(case["path"], source="mmdet")
    x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(7))  # a normalised, padded input
    with torch.no_grad():
        cls_levels, box_levels = mm.bbox_head(mm.extract_feat(x))
        cls, box = ours(x)
    mm_cls, mm_box = _flat(cls_levels, 80), _flat(box_levels, 4)
    assert cls.shape == mm_cls.shape == (1, ours.layout.num_anchors((h, w)), 80)
    for a, b in ((cls, mm_cls), (box, mm_box)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))

    priors = torch.cat(mm.bbox_head.prior_generator.grid_priors([t.shape[-2:] for t in cls_levels], device="cpu"))
    torch.testing.assert_close(ours.layout.anchors((h, w)), priors, rtol=0, atol=1e-4)

    meta = {"img_shape": (h, w), "ori_shape": (h, w), "scale_factor": (1.0, 1.0)}
    theirs = mm.bbox_head.predict_by_feat(cls_levels, box_levels, batch_img_metas=[meta], rescale=False)[0]
    test_cfg = mm.test_cfg
    detect = DEFAULTS["detect"]  # sadpipe's defaults are the zoo's test_cfg
    assert (test_cfg.score_thr, test_cfg.nms.iou_threshold, test_cfg.max_per_img, test_cfg.nms_pre) == (
        detect["score_thresh"], detect["nms_thresh"], detect["detections_per_img"], detect["topk_candidates"])
    mine = postprocess(cls, box, ours.layout.anchors((h, w)), [(h, w)], ours.layout.anchors_per_level((h, w)))[0]
    assert len(theirs.bboxes) == len(mine["boxes"]) > 20
    assert_same_detections(mine, {"boxes": theirs.bboxes, "scores": theirs.scores, "labels": theirs.labels})


@pytest.mark.parametrize("config", ["retinanet_r50_fpn_1x_coco.py", "retinanet_r50-caffe_fpn_1x_coco.py"])
def test_preprocessing_equals_mmdet_data_preprocessor(config, tmp_path):
    """A uint8 image (RGB for sadpipe, BGR as MMDetection loads it) normalises to the same tensor."""
    cfg = _mmdet_config(config)
    model = _random_mmdet_retinanet(cfg, seed=1)
    path = tmp_path / "m.pth"
    meta = {"dataset_meta": {"classes": COCO_CLASSES}, "cfg": cfg.pretty_text}
    torch.save({"state_dict": model.state_dict(), "meta": meta}, path)
    h, w = 96, 160  # multiples of mmdet's pad divisor 32; min/max size chosen so sadpipe does not resize
    ours = load_detector(path, source="mmdet", min_size=h, max_size=w)
    rgb = np.random.default_rng(3).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    bgr = torch.from_numpy(np.ascontiguousarray(rgb[..., ::-1])).permute(2, 0, 1)
    theirs = model.data_preprocessor({"inputs": [bgr], "data_samples": None}, training=False)["inputs"][0]
    torch.testing.assert_close(ours.preprocess(rgb), theirs, rtol=1e-5, atol=1e-5)
