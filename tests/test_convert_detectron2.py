"""detectron2 RetinaNet conversion, against a restatement of detectron2's conventions written here.

detectron2 does not install from the package registries here, so the reference is a forward pass
written from detectron2's source (modeling/backbone/resnet.py, fpn.py, anchor_generator.py,
meta_arch/retinanet.py, box_regression.py, config/defaults.py), independently of sadpipe's
converter: detectron2's own parameter names, MSRA bottlenecks (a stage's stride in the first 1x1
conv), FrozenBN, FPN with x2 nearest upsampling, P6 from res5 and a ReLU before P7, anchors made
size-outer / ratio-inner, head outputs flattened as (N, A, K, H, W) -> (N, H*W*A, K), and BGR 0-255
input minus PIXEL_MEAN with PIXEL_STD 1. The files are detectron2's formats: a pickle of
{"model": {name: numpy array}} (.pkl, the model zoo's) and torch.save files (.pth).
"""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from foreign_files import assert_same_detections

from sadpipe.data.coco import COCO80_CATEGORY_IDS
from sadpipe.labeling import decode_boxes, postprocess
from sadpipe.models import CheckpointError, load_detector
from sadpipe.transforms import Preprocess

PIXEL_MEAN_BGR = [103.530, 116.280, 123.675]  # detectron2 config/defaults.py
PIXEL_STD = [1.0, 1.0, 1.0]
STAGES = {50: [3, 4, 6, 3]}
K = 80
H, W = 128, 256


def random_detectron2_weights(depth: int = 50, seed: int = 0) -> dict[str, np.ndarray]:
    """{detectron2 parameter name: float32 array} of a random RetinaNet R-50-FPN (He-scaled convs, random FrozenBN)."""
    rng = np.random.default_rng(seed)
    w: dict[str, np.ndarray] = {}

    def conv(name, cout, cin, k, bias=False, std=None):
        std = std if std is not None else math.sqrt(2 / (cin * k * k))
        w[f"{name}.weight"] = rng.normal(0, std, (cout, cin, k, k)).astype(np.float32)
        if bias:
            w[f"{name}.bias"] = rng.uniform(-0.1, 0.1, cout).astype(np.float32)

    def norm(name, c, last=False):
        # the last norm of a residual branch small, so 16 random blocks keep activations O(1)
        w[f"{name}.weight"] = rng.uniform(0.1, 0.3, c).astype(np.float32) if last else \
            rng.uniform(0.5, 1.0, c).astype(np.float32)
        w[f"{name}.bias"] = rng.uniform(-0.1, 0.1, c).astype(np.float32)
        w[f"{name}.running_mean"] = rng.uniform(-0.2, 0.2, c).astype(np.float32)
        w[f"{name}.running_var"] = rng.uniform(0.5, 1.5, c).astype(np.float32)

    # the input is on a 0-255 scale (std ~60), so the stem's He scale is divided by 64 to keep activations O(1)
    conv("backbone.bottom_up.stem.conv1", 64, 3, 7, std=math.sqrt(2 / (3 * 49)) / 64)
    norm("backbone.bottom_up.stem.conv1.norm", 64)
    cin = 64
    for stage, (blocks, width) in enumerate(zip(STAGES[depth], (64, 128, 256, 512))):
        out = width * 4
        for i in range(blocks):
            p = f"backbone.bottom_up.res{stage + 2}.{i}"
            if i == 0:
                conv(f"{p}.shortcut", out, cin, 1)
                norm(f"{p}.shortcut.norm", out)
            conv(f"{p}.conv1", width, cin if i == 0 else out, 1)
            norm(f"{p}.conv1.norm", width)
            conv(f"{p}.conv2", width, width, 3)
            norm(f"{p}.conv2.norm", width)
            conv(f"{p}.conv3", out, width, 1)
            norm(f"{p}.conv3.norm", out, last=True)
        cin = out
    for level, c in zip((3, 4, 5), (512, 1024, 2048)):
        conv(f"backbone.fpn_lateral{level}", 256, c, 1, bias=True)
        conv(f"backbone.fpn_output{level}", 256, 256, 3, bias=True)
    conv("backbone.top_block.p6", 256, 2048, 3, bias=True)
    conv("backbone.top_block.p7", 256, 256, 3, bias=True)
    for i in (0, 2, 4, 6):
        conv(f"head.cls_subnet.{i}", 256, 256, 3, bias=True)
        conv(f"head.bbox_subnet.{i}", 256, 256, 3, bias=True)
    conv("head.cls_score", 9 * K, 256, 3, bias=True, std=0.5 / math.sqrt(9 * 256))
    w["head.cls_score.bias"] = rng.uniform(-5, -3, 9 * K).astype(np.float32)
    conv("head.bbox_pred", 9 * 4, 256, 3, bias=True, std=0.2 / math.sqrt(9 * 256))
    return w


def detectron2_forward(w: dict[str, np.ndarray], x: torch.Tensor, depth: int = 50, stride_in_1x1: bool = True):
    """(cls [N, sum HWA, K], deltas [N, sum HWA, 4], grid sizes) the way detectron2's RetinaNet computes them."""
    t = {k: torch.from_numpy(v) for k, v in w.items()}

    def frozen_bn(y, name):  # detectron2 layers/batch_norm.py FrozenBatchNorm2d, eps 1e-5
        scale = t[f"{name}.weight"] * (t[f"{name}.running_var"] + 1e-5).rsqrt()
        shift = t[f"{name}.bias"] - t[f"{name}.running_mean"] * scale
        return y * scale[None, :, None, None] + shift[None, :, None, None]

    def conv(y, name, stride=1, padding=0):
        return F.conv2d(y, t[f"{name}.weight"], t.get(f"{name}.bias"), stride=stride, padding=padding)

    y = F.relu(frozen_bn(conv(x, "backbone.bottom_up.stem.conv1", 2, 3), "backbone.bottom_up.stem.conv1.norm"))
    y = F.max_pool2d(y, kernel_size=3, stride=2, padding=1)
    res = {}
    for stage, blocks in enumerate(STAGES[depth]):
        for i in range(blocks):
            p = f"backbone.bottom_up.res{stage + 2}.{i}"
            stride = 2 if i == 0 and stage > 0 else 1
            s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
            shortcut = frozen_bn(conv(y, f"{p}.shortcut", stride), f"{p}.shortcut.norm") if i == 0 else y
            z = F.relu(frozen_bn(conv(y, f"{p}.conv1", s1), f"{p}.conv1.norm"))
            z = F.relu(frozen_bn(conv(z, f"{p}.conv2", s3, 1), f"{p}.conv2.norm"))
            z = frozen_bn(conv(z, f"{p}.conv3"), f"{p}.conv3.norm")
            y = F.relu(z + shortcut)
        res[stage + 2] = y
    prev = conv(res[5], "backbone.fpn_lateral5")
    pyramid = [conv(prev, "backbone.fpn_output5", 1, 1)]
    for level in (4, 3):
        prev = conv(res[level], f"backbone.fpn_lateral{level}") + F.interpolate(prev, scale_factor=2.0, mode="nearest")
        pyramid.insert(0, conv(prev, f"backbone.fpn_output{level}", 1, 1))
    p6 = conv(res[5], "backbone.top_block.p6", 2, 1)
    pyramid += [p6, conv(F.relu(p6), "backbone.top_block.p7", 2, 1)]

    def flat(out, width):  # meta_arch/retinanet.py permute_to_N_HWA_K
        n, _, h, w_ = out.shape
        return out.view(n, -1, width, h, w_).permute(0, 3, 4, 1, 2).reshape(n, -1, width)

    logits, deltas = [], []
    for feature in pyramid:
        c, b = feature, feature
        for i in (0, 2, 4, 6):
            c = F.relu(conv(c, f"head.cls_subnet.{i}", 1, 1))
            b = F.relu(conv(b, f"head.bbox_subnet.{i}", 1, 1))
        logits.append(flat(conv(c, "head.cls_score", 1, 1), K))
        deltas.append(flat(conv(b, "head.bbox_pred", 1, 1), 4))
    return torch.cat(logits, 1), torch.cat(deltas, 1), [tuple(f.shape[-2:]) for f in pyramid]


def detectron2_anchors(grid_sizes) -> torch.Tensor:
    """modeling/anchor_generator.py DefaultAnchorGenerator with the RetinaNet config (offset 0)."""
    out = []
    for level, ((gh, gw), stride) in enumerate(zip(grid_sizes, (8, 16, 32, 64, 128))):
        base = 32 * 2 ** level
        cell = []
        for size in (base, base * 2 ** (1 / 3), base * 2 ** (2 / 3)):  # sizes outside
            for ratio in (0.5, 1.0, 2.0):  # ratios inside
                w = math.sqrt(size ** 2 / ratio)
                h = ratio * w
                cell.append([-w / 2, -h / 2, w / 2, h / 2])
        cell = torch.tensor(cell)
        shift_y, shift_x = torch.meshgrid(torch.arange(0, gh * stride, stride, dtype=torch.float32),
                                          torch.arange(0, gw * stride, stride, dtype=torch.float32), indexing="ij")
        shifts = torch.stack([shift_x.reshape(-1), shift_y.reshape(-1)] * 2, dim=1)
        out.append((shifts.view(-1, 1, 4) + cell.view(1, -1, 4)).reshape(-1, 4))
    return torch.cat(out)


def detectron2_apply_deltas(deltas: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """modeling/box_regression.py Box2BoxTransform, weights (1, 1, 1, 1), scale clamp log(1000 / 16)."""
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    ctr_x, ctr_y = boxes[:, 0] + 0.5 * widths, boxes[:, 1] + 0.5 * heights
    dx, dy = deltas[:, 0], deltas[:, 1]
    dw, dh = deltas[:, 2].clamp(max=math.log(1000 / 16)), deltas[:, 3].clamp(max=math.log(1000 / 16))
    cx, cy = dx * widths + ctr_x, dy * heights + ctr_y
    w, h = torch.exp(dw) * widths, torch.exp(dh) * heights
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=1)


def detectron2_rows(grid_sizes) -> torch.Tensor:
    """For each sadpipe head row (ratio outer, scale inner per cell), the detectron2 row of the same anchor."""
    rows, offset = [], 0
    for gh, gw in grid_sizes:
        for cell in range(gh * gw):
            for ratio in range(3):
                for scale in range(3):
                    rows.append(offset + cell * 9 + scale * 3 + ratio)
        offset += gh * gw * 9
    return torch.tensor(rows)


@pytest.fixture(scope="module")
def weights():
    return random_detectron2_weights()


@pytest.fixture(scope="module")
def files(weights, tmp_path_factory):
    """The same weights as detectron2's model-zoo .pkl, a training .pth (tensors) and a .pth of numpy arrays."""
    d = tmp_path_factory.mktemp("d2")
    with open(d / "model_final.pkl", "wb") as f:
        pickle.dump({"model": weights, "__author__": "Detectron2 Model Zoo", "matching_heuristics": True}, f)
    torch.save({"model": {k: torch.from_numpy(v) for k, v in weights.items()}, "iteration": 90000,
                "scheduler": {"last_epoch": 90000}}, d / "model_final.pth")
    torch.save({"model": weights}, d / "numpy_arrays.pth")
    return {"pkl": d / "model_final.pkl", "pth": d / "model_final.pth", "numpy_pth": d / "numpy_arrays.pth"}


def _write(tmp_path, state, name="model.pkl"):
    path = tmp_path / name
    with open(path, "wb") as f:
        pickle.dump({"model": state}, f)
    return path


def _image() -> np.ndarray:
    return np.random.default_rng(5).integers(0, 256, size=(H, W, 3), dtype=np.uint8)  # RGB, as sadpipe reads images


def test_converted_model_computes_what_detectron2_computes(weights, files):
    ours = load_detector(files["pkl"], source="detectron2", min_size=H, max_size=W)  # no resize at this size
    rgb = _image()
    # detectron2's input: BGR 0-255 minus PIXEL_MEAN, over PIXEL_STD
    bgr = torch.from_numpy(rgb[..., ::-1].astype(np.float32)).permute(2, 0, 1)
    x = ((bgr - torch.tensor(PIXEL_MEAN_BGR)[:, None, None]) / torch.tensor(PIXEL_STD)[:, None, None])[None]
    torch.testing.assert_close(ours.preprocess(rgb)[None], x, rtol=0, atol=1e-4)
    with torch.no_grad():
        d2_cls, d2_deltas, grids = detectron2_forward(weights, x)
        cls, deltas = ours(x)
    rows = detectron2_rows(grids)
    assert cls.shape == d2_cls.shape == (1, ours.layout.num_anchors((H, W)), K)
    torch.testing.assert_close(cls[0], d2_cls[0, rows], rtol=1e-4, atol=1e-4 * float(d2_cls.abs().max()))
    torch.testing.assert_close(deltas[0], d2_deltas[0, rows], rtol=1e-4, atol=1e-4 * float(d2_deltas.abs().max()))

    d2_anchors = detectron2_anchors(grids)
    torch.testing.assert_close(ours.layout.anchors((H, W)), d2_anchors[rows], rtol=0, atol=1e-4)
    d2_boxes = detectron2_apply_deltas(d2_deltas[0], d2_anchors)
    torch.testing.assert_close(decode_boxes(deltas, ours.layout.anchors((H, W)))[0], d2_boxes[rows], rtol=0, atol=1e-3)

    # the same detections from either row order
    levels = ours.layout.anchors_per_level((H, W))
    mine = postprocess(cls, deltas, ours.layout.anchors((H, W)), [(H, W)], levels)[0]
    theirs = postprocess(d2_cls, d2_deltas, d2_anchors, [(H, W)], levels)[0]
    assert len(mine["scores"]) > 20
    assert_same_detections(mine, theirs)


def test_spec_records_detectron2s_conventions(files):
    ours = load_detector(files["pkl"], source="detectron2")
    spec = ours.spec
    assert spec["arch"] == "resnet50" and spec["stride_in_1x1"] is True and spec["fpn_p6_input"] == "c5"
    assert "fpn_relu_before_p7" not in spec  # detectron2 has the ReLU, sadpipe's default
    assert spec["preprocess"]["channel_order"] == "BGR" and spec["preprocess"]["pixel_scale"] == 255.0
    assert spec["preprocess"]["image_mean"] == PIXEL_MEAN_BGR and spec["preprocess"]["image_std"] == PIXEL_STD
    assert spec["layout"]["rounded_anchors"] is False
    assert spec["category_ids"] == list(COCO80_CATEGORY_IDS) and spec["class_names"][0] == "person"
    # and the MSRA stride sits in the 1x1 conv of each stage's first block
    assert ours.backbone.body.layer3[0].conv1.stride == (2, 2) and ours.backbone.body.layer3[0].conv2.stride == (1, 1)


def test_pkl_and_pth_files_give_the_same_model(files):
    models = {kind: load_detector(path, source="detectron2") for kind, path in files.items()}
    states = {kind: m.state_dict() for kind, m in models.items()}
    assert all(models[k].spec == models["pkl"].spec for k in models)
    for key, value in states["pkl"].items():
        assert torch.equal(states["pth"][key], value) and torch.equal(states["numpy_pth"][key], value), key


def test_a_pkl_written_by_numpy_1_reads(weights, tmp_path):
    """Zoo .pkl files predate numpy 2: their arrays name numpy.core.multiarray, not numpy._core.multiarray."""
    data = pickle.dumps({"model": weights}, protocol=2)  # GLOBAL opcodes hold the module name as text
    old = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert old != data and b"numpy._core" not in old
    path = tmp_path / "numpy1.pkl"
    path.write_bytes(old)
    ours = load_detector(path, source="detectron2")
    assert torch.equal(ours.backbone.body.conv1.weight, torch.from_numpy(weights["backbone.bottom_up.stem.conv1.weight"]))


def test_stored_pixel_mean_std_and_cell_anchors(weights, tmp_path):
    """Older detectron2 files keep pixel_mean / pixel_std and the cell anchors as buffers: used and checked."""
    rgb_mean, rgb_std = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]  # a torchvision-initialised model
    extra = {"pixel_mean": np.array(rgb_mean, np.float32).reshape(3, 1, 1),
             "pixel_std": np.array(rgb_std, np.float32).reshape(3, 1, 1)}
    grids = [(1, 1)] * 5
    anchors = detectron2_anchors(grids).numpy()  # one cell per level: that level's 9 cell anchors
    for level in range(5):
        extra[f"anchor_generator.cell_anchors.{level}"] = anchors[level * 9:(level + 1) * 9]
    path = tmp_path / "old.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {**weights, **extra}}, f)
    ours = load_detector(path, source="detectron2", channel_order="RGB", stride_in_1x1=False)
    pre = ours.preprocess
    assert pre.channel_order == "RGB" and pre.pixel_scale == 255.0
    np.testing.assert_allclose(pre.image_mean, rgb_mean, rtol=1e-6)
    np.testing.assert_allclose(pre.image_std, rgb_std, rtol=1e-6)
    assert "stride_in_1x1" not in ours.spec
    # the same numbers given to the converter for a file without the buffers
    given = load_detector(_write(tmp_path, weights), source="detectron2", channel_order="RGB", stride_in_1x1=False,
                          pixel_mean=rgb_mean, pixel_std=rgb_std)
    assert given.preprocess == Preprocess(800, 1333, image_mean=tuple(rgb_mean), image_std=tuple(rgb_std),
                                          pixel_scale=255)

    extra["anchor_generator.cell_anchors.2"] = np.round(extra["anchor_generator.cell_anchors.2"])  # torchvision's
    with open(path, "wb") as f:
        pickle.dump({"model": {**weights, **extra}}, f)
    with pytest.raises(CheckpointError, match=r"cell_anchors\.2 are not detectron2's default"):
        load_detector(path, source="detectron2")


def test_other_kinds_are_refused(weights, tmp_path):
    def write(state):
        return _write(tmp_path, state, "bad.pkl")

    backbone = {k: v for k, v in weights.items() if k.startswith("backbone.")}
    z = np.zeros(1, np.float32)
    faster = {**backbone, "proposal_generator.rpn_head.conv.weight": z, "roi_heads.box_predictor.cls_score.weight": z}
    with pytest.raises(CheckpointError, match="not a detectron2 RetinaNet.*two-stage detector"):
        load_detector(write(faster), source="detectron2")
    missing = {k: v for k, v in weights.items() if k != "backbone.top_block.p7.bias"}
    with pytest.raises(CheckpointError, match=r"missing \['backbone\.top_block\.p7\.bias'\]"):
        load_detector(write(missing), source="detectron2")
    gn_head = {**weights, "head.cls_subnet.1.weight": np.ones(256, np.float32)}
    with pytest.raises(CheckpointError, match=r"no place for: \['head\.cls_subnet\.1\.weight'\]"):
        load_detector(write(gn_head), source="detectron2")
    narrow = {**weights, "head.bbox_subnet.2.weight": np.zeros((128, 256, 3, 3), np.float32)}
    with pytest.raises(CheckpointError, match=r"head\.bbox_subnet\.2\.weight has shape \[128, 256, 3, 3\]"):
        load_detector(write(narrow), source="detectron2")
    caffe2 = tmp_path / "R-50.pkl"  # a Detectron1 / Caffe2 ImageNet backbone file
    with open(caffe2, "wb") as f:
        pickle.dump({"blobs": {"res2_0_branch2a_w": z}}, f)
    with pytest.raises(CheckpointError, match=r"not a detectron2 checkpoint.*found keys \['blobs'\]"):
        load_detector(caffe2, source="detectron2")
