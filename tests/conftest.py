"""Shared fixtures: a small toy dataset and a tiny CPU pipeline config built on it."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from sadpipe.settings import load_settings
from sadpipe.data.toy import make_toy_dataset

REPO = Path(__file__).resolve().parents[1]

# Tests share the machine with other work; one intra-op thread keeps them predictable.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory) -> Path:
    """A 48/16/32-image toy dataset (train/val/unlabeled), made once per test session."""
    root = tmp_path_factory.mktemp("toy")
    make_toy_dataset(root, seed=0, n_train=48, n_val=16, n_unlabeled=32, workers=1)
    return root


def tiny_overrides(root: Path) -> list[str]:
    """toy.toml shrunk for tests: tiny teacher and student, short runs, no worker processes."""
    return [
        f"data.root={json.dumps(str(root))}",
        'teacher.model.arch="tiny"', "teacher.model.fpn_channels=32", "teacher.model.tiny_widths=[16,32,64,128]",
        "teacher.train.batch_size=8", "teacher.train.max_steps=6", "teacher.train.warmup_steps=2",
        "teacher.train.num_workers=0",
        "student.train.batch_size=8", "student.train.max_steps=6", "student.train.warmup_steps=2",
        "student.train.num_workers=0",
        "dump.images_per_shard=16", "dump.batch_size=8", "dump.num_workers=0",
    ]


@pytest.fixture
def tiny_cfg(toy_root) -> dict:
    return load_settings(REPO / "pipelines" / "toy.toml", tiny_overrides(toy_root))


def make_spread_teacher(cfg: dict, path: Path, seed: int = 0) -> Path:
    """A tiny untrained teacher checkpoint whose cls logits spread over roughly [-7, 0] (many codec bins,
    some detections), for dump and cache tests that need real geometry but no training."""
    from sadpipe.data.dataset import labeled_source
    from sadpipe.models import save_checkpoint
    from sadpipe.tasks.supervised import build_model_for

    torch.manual_seed(seed)
    model = build_model_for(cfg, "teacher", labeled_source(cfg.data, "train").categories)
    with torch.no_grad():
        model.head.classification_head.cls_logits.weight.normal_(0.0, 0.1)
        model.head.classification_head.cls_logits.bias.fill_(-3.5)
    return save_checkpoint(path, model)


def load_benchmark(name: str):
    """A script of benchmarks/ (not a package) imported as a module, for the tests of its helpers."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
