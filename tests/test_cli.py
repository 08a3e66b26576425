"""The command line (click's CliRunner on sadpipe.cli.main): help, train-teacher, evaluate, user errors."""

from __future__ import annotations

import json
import math

import click
import pytest
from click.testing import CliRunner
from conftest import REPO, tiny_overrides

from sadpipe.cli import main
from sadpipe.evaluate import METRIC_NAMES

TOY = str(REPO / "pipelines" / "toy.toml")


def _leaf_commands(group: click.Group, prefix=()):
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from _leaf_commands(cmd, prefix + (name,))
        else:
            yield prefix + (name,)


def _sets(root, *extra) -> list[str]:
    args = []
    for assignment in tiny_overrides(root) + list(extra):
        args += ["--set", assignment]
    return args


def _run(args):
    # result.stdout: tables and summaries; result.stderr: the one-line errors (and progress bars)
    return CliRunner().invoke(main, args, catch_exceptions=True)


def _error_lines(result) -> list[str]:
    return [ln for ln in result.stderr.splitlines() if ln.strip()]


def _table_row(output: str, name: str) -> dict:
    """Parse format_metrics_table's text: header 'name AP AP50 ...', values in percent or '-'."""
    lines = output.splitlines()
    header_at = next(i for i, ln in enumerate(lines) if ln.split()[:2] == ["name", "AP"])
    header = lines[header_at].split()[1:]
    row = next(ln for ln in lines[header_at + 2:] if ln.startswith(name))
    cells = row[len(name):].split()
    return {k: (math.nan if v == "-" else float(v)) for k, v in zip(header, cells)}


COMMANDS = sorted(_leaf_commands(main))


def test_every_command_is_listed():
    # guards the parametrisation below: a command added without help examples must show up here
    assert {("make-toy-data",), ("train-teacher",), ("evaluate",), ("demo",), ("cache", "info")} <= set(COMMANDS)


@pytest.mark.parametrize("path", COMMANDS, ids=["-".join(p) for p in COMMANDS])
def test_help_of_every_command_shows_an_example(path):
    result = _run([*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example" in result.output
    # the example is a real invocation of this very command
    assert f"sadpipe {' '.join(path)}" in result.output


def test_top_level_help_shows_the_quick_start():
    result = _run(["--help"])
    assert result.exit_code == 0
    assert "sadpipe demo" in result.output and "sadpipe train-teacher" in result.output


def test_train_teacher_then_evaluate(toy_root, tmp_path):
    out = tmp_path / "teacher"
    result = _run(["train-teacher", "--config", TOY, *_sets(toy_root), "--max-steps", "2", "--device", "cpu",
                   "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "final.pt").is_file() and (out / "config.resolved.toml").is_file()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2       # --max-steps 2 beat train.max_steps=6
    assert "2 steps in" in result.stdout and str(out / "final.pt") in result.stdout
    # the printed table shows the metrics of eval.json, in percent with one decimal
    saved = json.loads((out / "eval.json").read_text())["metrics"]
    printed = _table_row(result.stdout, "teacher (tiny)")
    assert set(METRIC_NAMES) <= set(printed)
    for name in METRIC_NAMES:
        if math.isnan(saved[name]):
            assert math.isnan(printed[name])
        else:
            assert printed[name] == pytest.approx(100 * saved[name], abs=0.051)

    # evaluate the checkpoint alone: the same model on the same val split gives the same metrics
    result = _run(["evaluate", "--config", TOY, *_sets(toy_root), "--device", "cpu", "--checkpoint", str(out / "final.pt")])
    assert result.exit_code == 0, result.output
    written = out / "final_eval.json"
    assert f"wrote {written}" in result.stdout
    evaluated = json.loads(written.read_text())["metrics"]
    for name in METRIC_NAMES:
        assert (math.isnan(evaluated[name]) and math.isnan(saved[name])) or evaluated[name] == pytest.approx(saved[name], abs=1e-6)
    assert _table_row(result.stdout, "final.pt")["AP"] == pytest.approx(100 * saved["AP"], abs=0.051)


def test_bad_set_key_is_a_one_line_error(toy_root, tmp_path):
    result = _run(["train-teacher", "--config", TOY, *_sets(toy_root, "teacher.train.lrr=0.1"), "--device", "cpu",
                   "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    lines = _error_lines(result)
    assert len(lines) == 1 and lines[0].startswith("error:") and "teacher.train.lrr" in lines[0], result.output
    assert result.stdout == ""
    assert not (tmp_path / "run").exists()


def test_missing_annotations_file_is_a_one_line_error(toy_root, tmp_path):
    missing = tmp_path / "nowhere" / "instances_val.json"
    result = _run(["evaluate", "--config", TOY, *_sets(toy_root, f"data.val_annotations={json.dumps(str(missing))}"),
                   "--device", "cpu", "--checkpoint", str(_tiny_checkpoint(tmp_path))])
    assert result.exit_code == 2, result.output
    lines = _error_lines(result)
    assert len(lines) == 1 and lines[0].startswith("error:") and str(missing) in lines[0], result.output


def test_missing_checkpoint_is_a_one_line_error(toy_root, tmp_path):
    result = _run(["evaluate", "--config", TOY, *_sets(toy_root), "--device", "cpu",
                   "--checkpoint", str(tmp_path / "absent.pt")])
    assert result.exit_code == 2, result.output
    assert _error_lines(result) == [f"error: checkpoint not found: {tmp_path / 'absent.pt'}"]


def test_resume_without_state_is_a_one_line_error(toy_root, tmp_path):
    result = _run(["train-teacher", "--config", TOY, *_sets(toy_root), "--device", "cpu", "--resume",
                   "--out", str(tmp_path / "fresh")])
    assert result.exit_code == 2, result.output
    lines = _error_lines(result)
    assert len(lines) == 1 and lines[0].startswith("error: --resume: no") and "train_state.pt" in lines[0]


def _tiny_checkpoint(tmp_path):
    from sadpipe.geometry import AnchorLayout
    from sadpipe.models import build_detector, default_spec, save_checkpoint
    from sadpipe.transforms import Preprocess
    spec = default_spec("tiny", 6, AnchorLayout(sizes=(16, 32, 64, 128, 256)), Preprocess(128, 128),
                        fpn_channels=16, tiny_widths=[8, 16, 32, 64])
    return save_checkpoint(tmp_path / "tiny.pt", build_detector(spec))


@pytest.mark.slow
def test_make_toy_data(toy_root, tmp_path):
    """The full default toy set (~25-70 s). Same seed: images identical to the library-made fixture's, by id."""
    out = tmp_path / "toy"
    result = _run(["make-toy-data", str(out), "--seed", "0"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    for split, ann in (("train", "annotations.json"), ("val", "annotations.json"), ("unlabeled", "image_info.json")):
        coco = json.loads((out / split / ann).read_text())
        files = sorted((out / split / "images").iterdir())
        assert len(files) == len(coco["images"]) > len(list((toy_root / split / "images").iterdir()))
        for reference in sorted((toy_root / split / "images").iterdir())[:3]:
            assert (out / split / "images" / reference.name).read_bytes() == reference.read_bytes()
    # stdout is the summary file's content plus where it went
    assert summary.pop("out_dir") == str(out)
    assert json.loads((out / "toy_dataset.json").read_text()) == summary


def test_import_checkpoint_makes_a_self_describing_torchvision_teacher(tmp_path):
    """A plain torchvision state dict becomes a sadpipe checkpoint with the COCO-80 classes and the pipeline's geometry."""
    import torch
    import torchvision

    from sadpipe.models import load_detector

    tv = torchvision.models.detection.retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    src = tmp_path / "tv.pth"
    torch.save(tv.state_dict(), src)
    dst = tmp_path / "teacher.pt"
    result = _run(["import-checkpoint", str(src), str(dst), "--arch", "retinanet_resnet50_fpn", "--num-classes", "91",
                   "--coco91-to-80", "--config", str(REPO / "pipelines" / "coco_sad_r50.toml")])
    assert result.exit_code == 0, result.output
    model = load_detector(dst)  # the file alone is enough now
    assert model.num_classes == 80
    # category id 1 is "person" and 90 "toothbrush" in COCO; 12 is an N/A slot and must be gone
    assert model.spec["class_names"][0] == "person" and model.spec["class_names"][-1] == "toothbrush"
    assert 12 not in model.spec["category_ids"]
    assert model.preprocess.min_size == 600 and model.preprocess.max_size == 1000
    # the kept channels are the 91-model's channels of those category ids (anchor 0: channel = category id)
    w91 = tv.state_dict()["head.classification_head.cls_logits.weight"]
    w80 = model.state_dict()["head.classification_head.cls_logits.weight"]
    assert torch.equal(w80[0], w91[1]) and torch.equal(w80[79], w91[90])


def test_import_checkpoint_from_mmdet(tmp_path):
    """An MMDetection checkpoint (COCO classes in its meta) becomes a sadpipe checkpoint with COCO ids and names."""
    import torch
    from foreign_files import mmdet_style_model, write_mmdet_checkpoint
    from torchvision.models.detection import RetinaNet_ResNet50_FPN_Weights

    from sadpipe.models import load_detector

    names91 = RetinaNet_ResNet50_FPN_Weights.COCO_V1.meta["categories"]
    coco_ids = [i for i, n in enumerate(names91) if i > 0 and n != "N/A"]
    source = mmdet_style_model(80)
    src = write_mmdet_checkpoint(tmp_path / "retinanet_r18_fpn_1x_coco.pth", source, [names91[i] for i in coco_ids])
    dst = tmp_path / "teacher.pt"
    result = _run(["import-checkpoint", "--from", "mmdet", str(src), str(dst),
                   "--config", str(REPO / "pipelines" / "coco_sad_r50.toml")])
    assert result.exit_code == 0, result.output
    assert "rounded_anchors = false" in result.stdout  # the [geometry] a pipeline needs
    model = load_detector(dst)
    assert model.spec["category_ids"] == coco_ids and model.spec["class_names"][-1] == "toothbrush"
    assert model.preprocess.min_size == 600 and model.preprocess.max_size == 1000  # sizes from the pipeline
    assert model.spec["fpn_relu_before_p7"] is False and model.layout.rounded_anchors is False
    x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x)[0], source(x)[0])

    result = _run(["import-checkpoint", "--from", "torchvision", str(src), str(dst)])
    assert result.exit_code == 2 and "--from torchvision needs --arch and --num-classes" in result.stderr
    result = _run(["import-checkpoint", "--from", "mmdet", str(src), str(dst), "--arch", "resnet50"])
    assert result.exit_code == 2 and "a checkpoint from mmdet brings its own" in result.stderr


def test_every_user_error_shares_one_base_the_cli_catches():
    """One base class, no hand-kept list: each module's user errors are UserErrors (and still the
    builtin they refine), and the CLI catches exactly that base."""
    import inspect as _inspect

    import sadpipe.cli as cli_module
    from sadpipe.cache.format import CacheStoreError, CacheMismatchError
    from sadpipe.config import ConfigError
    from sadpipe.data.coco import CocoFormatError
    from sadpipe.data.dataset import DataConfigError
    from sadpipe.data.images import ImageReadError
    from sadpipe.tasks.dump import DumpError
    from sadpipe.errors import MissingInputError, UserError
    from sadpipe.models import CheckpointError
    from sadpipe.errors import TrainingError

    for cls in (ConfigError, CocoFormatError, DataConfigError, ImageReadError, CheckpointError, TrainingError,
                CacheStoreError, CacheMismatchError, DumpError, MissingInputError):
        assert issubclass(cls, UserError), cls
    assert issubclass(ConfigError, ValueError) and issubclass(TrainingError, RuntimeError)
    assert issubclass(MissingInputError, FileNotFoundError)
    assert not issubclass(FileNotFoundError, UserError)  # a bug's missing file keeps its traceback
    source = _inspect.getsource(cli_module)
    assert "except UserError" in source and "USER_ERRORS" not in source
