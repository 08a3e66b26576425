"""A non-editable install in a fresh virtual environment works from any folder: the pipelines
ship inside the package, nothing is looked up through the repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, tiny_overrides

from sadpipe.config import shipped_pipelines


def test_the_checkout_pipelines_are_the_shipped_ones():
    # pipelines/ in a checkout links to the files the package ships: one source
    shipped = shipped_pipelines()
    assert set(shipped) == {"toy", "toy_paper_regime", "coco_r101_teacher", "coco_sad_r50"}
    for name, path in shipped.items():
        assert (REPO / "pipelines" / f"{name}.toml").resolve() == path.resolve()


def test_the_paper_regime_pipeline_differs_from_the_toy_one_only_where_it_says():
    from sadpipe.config import load_config
    toy, paper = load_config("toy"), load_config("toy_paper_regime")
    assert paper["data"] == toy["data"] and paper["geometry"] == toy["geometry"]
    assert paper["teacher"]["model"] == toy["teacher"]["model"]  # the same ResNet-18, trained longer
    assert paper["teacher"]["train"]["max_steps"] == 4000 and toy["teacher"]["train"]["max_steps"] == 500
    assert paper["student"]["model"]["tiny_widths"] == [32, 64, 128, 256]
    assert paper["dump"]["with_box_regression"] and paper["distill"]["loss_weight"] == 0.5  # the paper's weight


@pytest.mark.slow
def test_a_non_editable_install_runs_the_shipped_toy_pipeline_from_another_folder(toy_root, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(REPO, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", "runs", "toy", "__pycache__", "*.egg-info", "build", ".pytest_cache"))
    venv = tmp_path / "venv"
    # system site packages: torch and friends come from the machine (nothing is downloaded); sadpipe
    # itself is installed into the venv, which comes first on sys.path
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    py, exe = venv / "bin" / "python", venv / "bin" / "sadpipe"
    run = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(src)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"

    where = subprocess.run([str(py), "-c", "import sadpipe; print(sadpipe.__file__)"], cwd=elsewhere, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(str(venv)), where  # the installed copy, not the checkout
    assert subprocess.run([str(exe), "demo", "--help"], cwd=elsewhere, env=env, capture_output=True,
                          text=True).returncode == 0
    cmd = [str(exe), "train-teacher", "--config", "toy", "--out", "run", "--max-steps", "2", "--device", "cpu"]
    for o in tiny_overrides(toy_root):
        cmd += ["--set", o]
    train = subprocess.run(cmd, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=900)
    assert train.returncode == 0, train.stderr[-3000:]
    metrics = [json.loads(line) for line in (elsewhere / "run" / "metrics.jsonl").read_text().splitlines() if line]
    assert [m["step"] for m in metrics if "step" in m and "eval" not in m] == [1, 2]
    assert (elsewhere / "run" / "final.pt").is_file()
    # the saved resolved config is the shipped toy pipeline's (its name) with the overrides
    assert 'name = "toy"' in (elsewhere / "run" / "config.resolved.toml").read_text()
