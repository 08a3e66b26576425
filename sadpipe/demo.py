"""`sadpipe demo`: the toy pipeline as a chain of stages in one work directory.

Each stage writes its outputs under the work directory and a ``.done`` marker last; a rerun
skips finished stages and resumes an interrupted training stage, so the demo itself is
resumable.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from .config import load_config

REPO_ROOT = Path(__file__).resolve().parents[1]


def default_pipeline() -> Path:
    path = REPO_ROOT / "pipelines" / "toy.toml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run sadpipe from a checkout (pip install -e .) or pass --config")
    return path


class Stage:
    """A named step with a done-marker file; ``run`` executes it unless already done."""

    def __init__(self, workdir: Path, name: str):
        self.dir = workdir / name
        self.marker = self.dir / ".done"
        self.name = name

    @property
    def done(self) -> bool:
        return self.marker.is_file()

    def finish(self, summary: dict) -> dict:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        self.marker.write_text(time.strftime("%Y-%m-%dT%H:%M:%S"))
        return summary

    def summary(self) -> dict:
        return json.loads((self.dir / "summary.json").read_text())


def run_demo(workdir: str | Path, *, overrides=(), device: str = "auto", fresh: bool = False) -> dict:
    from .data.toy import make_toy_dataset
    from .evaluate import format_metrics_table
    from .train import train_detector

    workdir = Path(workdir)
    if fresh and workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cfg = load_config(default_pipeline(), [f"data.root={json.dumps(str(workdir / 'data'))}", *overrides])

    data = Stage(workdir, "data")
    if not data.done:
        print("== stage 1: toy dataset")
        data.finish(make_toy_dataset(workdir / "data", seed=0))

    teacher = Stage(workdir, "teacher")
    if not teacher.done:
        print("== stage 2: train the teacher")
        resume = (teacher.dir / "train_state.pt").exists()
        teacher.finish(train_detector(cfg, teacher.dir, role="teacher", device=device, resume=resume))

    student = Stage(workdir, "student_alone")
    if not student.done:
        print("== stage 3: train the student alone (no distillation)")
        resume = (student.dir / "train_state.pt").exists()
        student.finish(train_detector(cfg, student.dir, role="student", device=device, resume=resume))

    rows = {f"teacher ({teacher.summary()['arch']})": teacher.summary()["metrics"],
            f"student alone ({student.summary()['arch']})": student.summary()["metrics"]}
    print(format_metrics_table(rows))
    wall = time.perf_counter() - t0
    print(f"demo finished in {wall:.0f} s; outputs in {workdir}")
    return {"rows": rows, "wall_seconds": wall}
