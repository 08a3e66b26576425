"""Stand-in backbone weights, and the refusal of frozen-BatchNorm backbones without trained weights."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import REPO, tiny_overrides
from torchvision.models import resnet18, resnet50
from torchvision.ops import FrozenBatchNorm2d

from sadpipe.backbone_weights import (BackboneWeightsError, calibration_batch, has_identity_bn_statistics,
                                      make_standin_backbone_weights)
from sadpipe.cli import main
from sadpipe.settings import load_settings
from sadpipe.data.coco_like import make_coco_like_dataset
from sadpipe.data.dataset import labeled_source
from sadpipe.models import load_detector, save_checkpoint
from sadpipe.tasks.supervised import build_model_for

SMALL_CALIBRATION = dict(batches=2, batch_size=4, image_size=96)


def _frozen_resnet(factory, state: dict) -> torch.nn.Module:
    model = factory(weights=None, norm_layer=FrozenBatchNorm2d)
    missing, unexpected = model.load_state_dict({k: v for k, v in state.items() if "num_batches" not in k},
                                                strict=False)
    assert not missing and not unexpected
    return model.eval()


def _stage_std(model, x) -> dict[str, float]:
    out = {}
    with torch.no_grad():
        h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        for name in ("layer1", "layer2", "layer3", "layer4"):
            h = getattr(model, name)(h)
            out[name] = float(h.std())
    return out


def test_standin_bn_statistics_are_thecalibration_batches_statistics():
    state = make_standin_backbone_weights("resnet18", seed=3, **SMALL_CALIBRATION)
    # second implementation of the stem BatchNorm's statistics: conv1 on the same images, per-batch
    # mean and unbiased variance over (N, H, W), averaged over the batches (momentum None)
    means, variances = [], []
    for index in range(SMALL_CALIBRATION["batches"]):
        x = calibration_batch(3, index, SMALL_CALIBRATION["batch_size"], SMALL_CALIBRATION["image_size"])
        y = torch.nn.functional.conv2d(x, state["conv1.weight"], stride=2, padding=3)
        means.append(y.mean(dim=(0, 2, 3)))
        variances.append(y.var(dim=(0, 2, 3), unbiased=True))
    torch.testing.assert_close(state["bn1.running_mean"], torch.stack(means).mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(state["bn1.running_var"], torch.stack(variances).mean(0), rtol=1e-4, atol=1e-5)
    # the last BatchNorm of every residual branch carries the small residual scale, the others 1
    assert torch.all(state["layer3.1.bn2.weight"] == 0.2) and torch.all(state["layer3.1.bn1.weight"] == 1)
    assert torch.all(state["layer2.0.downsample.1.weight"] == 1)
    # the deepest statistics are calibrated too (a fresh ResNet has exactly 0 / 1 everywhere)
    assert not torch.all(state["layer4.1.bn2.running_var"] == 1)
    assert not has_identity_bn_statistics(_frozen_resnet(resnet18, state))
    assert has_identity_bn_statistics(_frozen_resnet(resnet18, resnet18(weights=None).state_dict()))


def test_standin_is_deterministic_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = make_standin_backbone_weights("resnet18", seed=0, **SMALL_CALIBRATION)
    assert torch.equal(torch.rand(3), expected_next)
    b = make_standin_backbone_weights("resnet18", seed=0, **SMALL_CALIBRATION)
    c = make_standin_backbone_weights("resnet18", seed=1, **SMALL_CALIBRATION)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv1.weight"], c["conv1.weight"])
    with pytest.raises(ValueError, match="unknown arch"):
        make_standin_backbone_weights("resnet9000")


def test_standin_keeps_a_frozen_bn_bottleneck_resnet_at_unit_scale():
    """The failure the stand-in exists for: a fresh ResNet-50 under frozen BN grows stage after stage."""
    torch.manual_seed(0)
    identity = _frozen_resnet(resnet50, resnet50(weights=None).state_dict())
    standin = _frozen_resnet(resnet50, make_standin_backbone_weights("resnet50", **SMALL_CALIBRATION))
    x = torch.nn.functional.interpolate(calibration_batch(7, 0, 2, 96), size=(160, 192))
    fresh, ours = _stage_std(identity, x), _stage_std(standin, x)
    # measured: fresh 0.22 / 0.95 / 6.3 / 11.3, stand-in ~0.5 at every stage
    assert fresh["layer4"] > 10 * fresh["layer1"]
    assert all(0.1 < s < 3 for s in ours.values()), ours
    assert fresh["layer4"] > 5 * ours["layer4"]


# ---------------------------------------------------------------------------- refusal

@pytest.fixture(scope="module")
def coco_like_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco_like")
    make_coco_like_dataset(root, n_train=2, n_val=1, n_unlabeled=1, workers=1)
    return root


def _coco_cfg(root, *extra):
    """coco_sad_r50.toml with a ResNet-18 student and teacher (cheap to build), frozen BN as shipped."""
    return load_settings(REPO / "pipelines" / "coco_sad_r50.toml",
                       [f"data.root={json.dumps(str(root))}", 'student.model.arch="resnet18"',
                        'teacher.model.arch="resnet18"', "student.model.fpn_channels=32",
                        "teacher.model.fpn_channels=32", *extra])


def test_frozen_bn_without_weights_is_refused_with_the_fix(coco_like_root):
    for role in ("student", "teacher"):
        cfg = _coco_cfg(coco_like_root)
        with pytest.raises(BackboneWeightsError) as info:
            build_model_for(cfg, role, labeled_source(cfg.data, "train").categories)
        message = str(info.value)
        assert f"{role}.model: arch resnet18" in message and "no backbone_weights" in message
        assert f"--set {role}.model.backbone_weights=/path/resnet18.pth" in message
        assert f"--set {role}.model.allow_random_backbone=true" in message
        assert "sadpipe make-backbone-weights --arch resnet18" in message


def test_weights_with_identity_bn_statistics_are_refused(coco_like_root, tmp_path):
    fresh = tmp_path / "fresh_resnet18.pth"
    torch.save(resnet18(weights=None).state_dict(), fresh)  # what torchvision's resnet18() gives without weights
    cfg = _coco_cfg(coco_like_root, f"student.model.backbone_weights={json.dumps(str(fresh))}")
    with pytest.raises(BackboneWeightsError) as info:
        build_model_for(cfg, "student", labeled_source(cfg.data, "train").categories)
    message = str(info.value)
    assert "fresh_resnet18.pth" in message and "running mean 0 and variance 1" in message
    assert "not ImageNet weights" in message and "--set student.model.allow_random_backbone=true" in message


def test_what_is_not_refused(coco_like_root, tmp_path, tiny_cfg):
    categories = labeled_source(_coco_cfg(coco_like_root).data, "train").categories
    # the explicit opt-in
    cfg = _coco_cfg(coco_like_root, "student.model.allow_random_backbone=true")
    random_model = build_model_for(cfg, "student", categories)
    assert has_identity_bn_statistics(random_model.backbone.body)
    # trained-looking weights (the stand-in): loaded, and no longer identity
    standin = tmp_path / "standin_resnet18.pth"
    torch.save(make_standin_backbone_weights("resnet18", **SMALL_CALIBRATION), standin)
    cfg = _coco_cfg(coco_like_root, f"student.model.backbone_weights={json.dumps(str(standin))}")
    model = build_model_for(cfg, "student", categories)
    assert torch.equal(model.backbone.body.bn1.running_var, torch.load(standin)["bn1.running_var"])
    # trainable BatchNorm (toy pipeline: the teacher is a ResNet-18 with bn, the student tiny)
    toy = load_settings(REPO / "pipelines" / "toy.toml", tiny_overrides(tiny_cfg.data.root) +
                      ['teacher.model.arch="resnet18"'])
    assert toy.teacher.model.backbone_norm == "bn" and not toy.teacher.model.backbone_weights
    for role in ("teacher", "student"):
        build_model_for(toy, role, labeled_source(toy.data, "train").categories)
    # a trained sadpipe checkpoint is loaded as it is, whatever its BatchNorm statistics
    path = save_checkpoint(tmp_path / "random_frozen.pt", random_model)
    loaded = load_detector(path)
    assert has_identity_bn_statistics(loaded.backbone.body)


def test_cli_refuses_the_shipped_coco_pipelines_without_weights(coco_like_root, tmp_path):
    runner = CliRunner()
    root = ["--set", f"data.root={json.dumps(str(coco_like_root))}"]
    teacher = runner.invoke(main, ["train-teacher", "--config", str(REPO / "pipelines" / "coco_r101_teacher.toml"),
                                   *root, "--out", str(tmp_path / "t"), "--device", "cpu"])
    assert teacher.exit_code == 2, teacher.output
    assert "error: teacher.model: arch resnet101" in teacher.stderr
    assert "--set teacher.model.backbone_weights=/path/resnet101.pth" in teacher.stderr
    student = runner.invoke(main, ["train-student", "--config", str(REPO / "pipelines" / "coco_sad_r50.toml"), *root,
                                   "--method", "none", "--out", str(tmp_path / "s"), "--device", "cpu"])
    assert student.exit_code == 2, student.output
    assert "error: student.model: arch resnet50" in student.stderr
    assert "--set student.model.allow_random_backbone=true" in student.stderr
    assert not (tmp_path / "t" / "final.pt").exists() and not (tmp_path / "s" / "final.pt").exists()


def test_cli_make_backbone_weights(tmp_path):
    out = tmp_path / "w" / "standin_resnet18.pth"
    result = CliRunner().invoke(main, ["make-backbone-weights", "--arch", "resnet18", str(out), "--batches", "1"])
    assert result.exit_code == 0, result.output
    assert "NOT ImageNet weights" in result.stdout
    state = torch.load(out, weights_only=True)
    expected = make_standin_backbone_weights("resnet18", batches=1)
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)
