"""A training run's files in its output folder, and the one way they are written.

- every file is written atomically (:func:`atomic_save`: a temporary file, then a rename), so a
  crash mid-write leaves the previous version intact; checkpoints (``models.save_checkpoint``)
  use the same function;
- ``train_state.pt`` holds everything a resume needs (:class:`RunState`);
- ``config.resolved.toml`` is the config the run was started with: a new run refuses a folder
  that already holds a run, and ``--resume`` refuses a config that differs in what it trains;
- ``metrics.jsonl`` is one JSON object per line (:class:`MetricsLog`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import config_differences, load_config, save_resolved
from ..errors import TrainingError

STATE_FILE = "train_state.pt"
# keys a resumed run may change: how long, how often to save/evaluate, worker counts, where the data lives
RESUME_MAY_CHANGE = ("train.max_steps", "train.epochs", "train.num_workers", "train.checkpoint_every_steps",
                     "train.keep_epoch_checkpoints",
                     "train.eval_every_epochs", "data.root", "dump.num_workers")


def atomic_save(obj, path: str | Path) -> Path:
    """``torch.save`` to ``path`` through ``<path>.tmp`` and a rename: readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)
    return path


def check_resume_config(out_dir: Path, resolved: dict) -> None:
    """TrainingError if the run in out_dir was started with a config that differs in what it trains."""
    saved_path = out_dir / "config.resolved.toml"
    if not saved_path.is_file():
        return
    diffs = config_differences(load_config(saved_path), resolved, "run", "now",
                               ignore=lambda key: key.endswith(RESUME_MAY_CHANGE))
    if diffs:
        raise TrainingError(f"--resume: {out_dir} was started with another config:\n  " + "\n  ".join(diffs[:20])
                            + "\nresume with the same settings, or start a new run in another --out")


class RunState:
    """The resumable state of a run: model, optimiser, schedule, AMP scaler, step and torch RNG."""

    def __init__(self, out_dir: Path, model, optimizer, scheduler, scaler):
        self.path = Path(out_dir) / STATE_FILE
        self.model, self.optimizer, self.scheduler, self.scaler = model, optimizer, scheduler, scaler

    def save(self, step: int) -> None:
        atomic_save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                     "step": step, "rng": torch.get_rng_state()}, self.path)

    def restore(self) -> int:
        """Load the saved state into the model, optimiser, ...; returns the step it was saved at."""
        if not self.path.is_file():
            raise TrainingError(f"--resume: no {self.path} to resume from; run without --resume to start")
        state = torch.load(self.path, map_location="cpu", weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])
        return state["step"]

    def start(self, resolved: dict, *, resume: bool, is_main: bool) -> int:
        """Resume (checking the config) or start afresh (refusing a folder that holds a run);
        rank 0 then saves the resolved config. Returns the step to start at."""
        out_dir = self.path.parent
        step = 0
        if resume:
            step = self.restore()
            check_resume_config(out_dir, resolved)
        elif self.path.exists() and is_main:
            raise TrainingError(f"{out_dir} already holds a run ({STATE_FILE}); pass --resume to continue it, "
                                "or choose another --out")
        if is_main:  # only now: a refused start must not overwrite the existing run's config
            save_resolved(resolved, out_dir)
        return step


class MetricsLog:
    """Appends one JSON object per line; a resumed run drops lines past its resume step."""

    def __init__(self, path: Path, resume_step: int | None = None, enabled: bool = True):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            path.write_text("")
        elif path.exists():
            kept = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= resume_step]
            path.write_text("".join(ln + "\n" for ln in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
