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

from .errors import MissingInputError
from .config import shipped_pipelines
from .settings import PipelineConfig, load_settings


def default_pipeline() -> Path:
    """The toy pipeline shipped inside the package (works from any folder, installed or not)."""
    path = shipped_pipelines().get("toy")
    if path is None:
        raise MissingInputError("the shipped pipeline sadpipe/pipelines/toy.toml is missing from this install; "
                                "reinstall sadpipe or pass --config")
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


def run_stage(workdir: Path, name: str, title: str, fn) -> dict:
    """Run ``fn(stage_dir) -> summary`` unless the stage is done; record its duration."""
    s = Stage(workdir, name)
    if s.done:
        print(f"== {title}: done already ({s.dir})")
        return s.summary()
    print(f"== {title}")
    t = time.perf_counter()
    summary = fn(s.dir)
    summary["stage_seconds"] = time.perf_counter() - t
    return s.finish(summary)


def has_state(run_dir: Path) -> bool:
    """An interrupted training run left a state to resume from."""
    return (run_dir / "train_state.pt").exists()


def toy_config(workdir: Path, overrides=(), pipeline: Path | None = None) -> PipelineConfig:
    return load_settings(pipeline or default_pipeline(), [f"data.root={json.dumps(str(workdir / 'data'))}", *overrides])


def prepare_teacher_and_cache(workdir: Path, cfg: PipelineConfig, device: str) -> tuple[dict, Path, Path]:
    """Stages 1-3: toy data, teacher, teacher cache. Returns (teacher summary, checkpoint, store)."""
    from .cache.store_report import store_info
    from .data.toy import make_toy_dataset
    from .tasks.dump import dump_teacher
    from .tasks.supervised import train_detector

    run_stage(workdir, "data", "stage 1/5: toy dataset", lambda d: make_toy_dataset(workdir / "data", seed=0))
    teacher = run_stage(workdir, "teacher", "stage 2/5: train the teacher",
                        lambda d: train_detector(cfg, d, role="teacher", device=device, resume=has_state(d)))
    teacher_ckpt = workdir / "teacher" / "final.pt"
    cache_path = workdir / "cache.zarr"

    def dump(d: Path) -> dict:
        summary = dump_teacher(cfg, teacher_ckpt, cache_path, device=device)
        summary["store"] = {k: v for k, v in store_info(cache_path).items() if not isinstance(v, (dict, list))}
        return summary
    run_stage(workdir, "cache", "stage 3/5: dump the teacher cache (labeled + unlabeled, views orig + hflip)", dump)
    return teacher, teacher_ckpt, cache_path


def run_demo(workdir: str | Path, *, overrides=(), device: str = "auto", fresh: bool = False) -> dict:
    """data -> teacher -> teacher cache -> student alone and student with SAD -> table, report.md, plots."""
    from .tasks.distill import train_student
    from .evaluate import format_metrics_table
    from .report import markdown_table, plot_losses, plot_map

    workdir = Path(workdir)
    if fresh and workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cfg = toy_config(workdir, overrides)
    teacher, _, cache_path = prepare_teacher_and_cache(workdir, cfg, device)
    alone_cfg = toy_config(workdir, [*overrides, 'distill.method="none"'])
    alone = run_stage(workdir, "student_alone", "stage 4/5: train the student alone (no distillation)",
                      lambda d: train_student(alone_cfg, None, d, device=device, resume=has_state(d)))
    sad = run_stage(workdir, "student_sad", "stage 5/5: train the student with SAD from the cache",
                    lambda d: train_student(cfg, cache_path, d, device=device, resume=has_state(d)))

    rows = {f"teacher ({teacher['arch']})": teacher, f"student alone ({alone['arch']})": alone,
            f"student + SAD ({sad['arch']})": sad}
    print(format_metrics_table({k: v["metrics"] for k, v in rows.items()}))
    wall = time.perf_counter() - t0
    plot_map(rows, workdir / "map.png")
    plot_losses({"teacher": workdir / "teacher", "student alone": workdir / "student_alone",
                 "student + SAD": workdir / "student_sad"}, workdir / "losses.png")
    (workdir / "report.md").write_text(
        "# sadpipe demo report\n\n" + markdown_table(rows) + "\n\n"
        f"Teacher cache: {cache_path} — see `sadpipe cache info {cache_path}`.\n\n"
        "![mAP per run](map.png)\n\n![loss curves](losses.png)\n\n"
        f"Wall time of this invocation: {wall:.0f} s (stages already done are skipped).\n")
    print(f"demo finished in {wall:.0f} s; report {workdir / 'report.md'}")
    return {"rows": rows, "wall_seconds": wall}
