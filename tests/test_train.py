"""The supervised trainer: it learns, it resumes bit-exactly, it refuses unsafe starts, it evaluates."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import REPO, tiny_overrides

import sadpipe.tasks.supervised as train_module
from sadpipe.settings import load_settings
from sadpipe.evaluate import METRIC_NAMES
from sadpipe.models import load_detector
from sadpipe.engine.loop import Hooks
from sadpipe.engine.optim import lr_factor
from sadpipe.engine.streams import steps_per_epoch, total_steps
from sadpipe.errors import TrainingError

TOY = REPO / "pipelines" / "toy.toml"


def _cfg(root, *extra):
    return load_settings(TOY, tiny_overrides(root) + list(extra))


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


def _final_state(run_dir) -> dict:
    return torch.load(run_dir / "final.pt", map_location="cpu", weights_only=True)["model"]


def test_short_run_lowers_the_loss(toy_root, tmp_path):
    # 48 fixed (unflipped) train images, batch 8: 6 steps per epoch, 24 steps = 4 passes over them.
    cfg = _cfg(toy_root, "teacher.train.hflip=false", 'teacher.train.optimizer="adamw"', "teacher.train.lr=1e-3",
               "teacher.train.max_steps=24", "teacher.train.warmup_steps=3")
    summary = train_module.train_detector(cfg, tmp_path / "run", device="cpu", evaluate=False)
    assert summary["steps"] == 24
    records = _metrics(tmp_path / "run")
    assert [r["step"] for r in records] == list(range(1, 25))
    first = sum(r["loss"] for r in records[:3]) / 3
    last = sum(r["loss"] for r in records[-3:]) / 3
    # measured: about 1.84 -> 1.1; a trainer that does not update the weights stays at ~1.8
    assert last < 0.8 * first, (first, last)
    assert all(math.isfinite(r["loss"]) and r["loss"] == pytest.approx(r["cls"] + r["box"], rel=1e-5) for r in records)


def test_logged_lr_is_the_lr_the_step_used(toy_root, tmp_path):
    # step s (1-based) runs with factor lr_factor(s - 1): warm-up (s)/warmup, then cosine to the end
    cfg = _cfg(toy_root, "teacher.train.max_steps=5", "teacher.train.warmup_steps=2", "teacher.train.lr=1e-3")
    train_module.train_detector(cfg, tmp_path / "run", device="cpu", evaluate=False)
    tcfg = cfg.teacher.train
    logged = [r["lr"] for r in _metrics(tmp_path / "run")]
    # by hand: warm-up 1/2, 2/2, then cosine over 3 steps: 0.5 * (1 + cos(pi * k / 3)), k = 0, 1, 2
    by_hand = [0.5, 1.0, 1.0, 0.75, 0.25]
    assert logged == pytest.approx([1e-3 * f for f in by_hand])
    assert logged == pytest.approx([1e-3 * lr_factor(s - 1, 5, tcfg) for s in range(1, 6)])


def test_plan_steps_and_schedule_arithmetic(toy_root):
    tcfg = _cfg(toy_root, "teacher.train.warmup_steps=4", 'teacher.train.optimizer="sgd"',
                "teacher.train.lr_milestones=[0.5, 0.75]").teacher.train

    class Stream:  # what total_steps reads of a stream
        def __init__(self, per_epoch):
            self.per_epoch = per_epoch

    assert steps_per_epoch(50, 8, 1) == 6                  # 50 // 8 = 6 full batches
    assert steps_per_epoch(50, 8, 2) == 3                  # 25 per rank -> 3 batches
    assert total_steps([Stream(6)], 3, 0) == 18            # 3 epochs
    assert total_steps([Stream(6), Stream(10)], 3, 0) == 36  # two streams take turns: an epoch is 12 steps
    assert total_steps([Stream(6)], 3, 7) == 7             # train.max_steps
    assert total_steps([Stream(6)], 3, 7, 2) == 2          # CLI --max-steps wins
    with pytest.raises(TrainingError, match="fewer than one batch"):
        steps_per_epoch(7, 8, 1)
    # sgd: warm-up 1/4..4/4, then x0.1 from step 50 (0.5 * 100) and x0.01 from step 75
    assert [lr_factor(s, 100, tcfg) for s in (0, 3, 4, 49, 50, 74, 75, 99)] == pytest.approx(
        [0.25, 1.0, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01])


class _Interrupt(Exception):
    pass


def _run_crashing_in_step(step: int, cfg, out) -> None:
    """Train into ``out`` and interrupt it in its ``step``-th step, once the batch is there, before the loss."""
    calls = {"n": 0}

    def crashing(done, batch):
        calls["n"] += 1
        assert done == calls["n"] - 1  # the hook sees every step, in order
        if calls["n"] == step:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train_module.train_detector(cfg, out, device="cpu", evaluate=False, hooks=Hooks(on_batch=crashing))


@pytest.mark.parametrize("workers", [0, 1])
def test_resume_is_bit_exact(toy_root, tmp_path, workers):
    """10 steps straight vs. 5 steps (state saved at 4), a crash, then --resume: identical weights, buffers and losses.

    6 steps per epoch (48 images / 8): the crash and the state saved at step 4 are mid-epoch,
    and the resumed run crosses the epoch boundary at step 6. Flips are on, so the resumed run
    must also reproduce the per-epoch flip decisions and sample order.
    """
    extra = ("teacher.train.max_steps=10", "teacher.train.checkpoint_every_steps=4", "teacher.train.hflip=true",
             f"teacher.train.num_workers={workers}", 'teacher.train.optimizer="adamw"')
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    train_module.train_detector(_cfg(toy_root, *extra), straight, device="cpu", evaluate=False)

    # steps 1-5 done and logged, state saved at step 4 (checkpoint_every_steps): step 5 is lost
    _run_crashing_in_step(6, _cfg(toy_root, *extra), crashed)
    assert not (crashed / "final.pt").exists()
    assert [r["step"] for r in _metrics(crashed)] == [1, 2, 3, 4, 5]
    assert torch.load(crashed / "train_state.pt", weights_only=False)["step"] == 4

    summary = train_module.train_detector(_cfg(toy_root, *extra), crashed, device="cpu", resume=True, evaluate=False)
    assert summary["steps"] == 10

    a, b = _final_state(straight), _final_state(crashed)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ after resume: {different[:5]}"
    # metrics: one line per step, the resumed part identical to the straight run
    ma, mb = _metrics(straight), _metrics(crashed)
    assert [r["step"] for r in mb] == list(range(1, 11))
    assert [(r["loss"], r["lr"], r["epoch"]) for r in ma] == [(r["loss"], r["lr"], r["epoch"]) for r in mb]


def test_resume_after_epoch_end_checkpoint(toy_root, tmp_path):
    # state saved only at the epoch end (step 6); crash in step 7; resume continues with epoch 1
    extra = ("teacher.train.max_steps=8", "teacher.train.checkpoint_every_steps=0")
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    train_module.train_detector(_cfg(toy_root, *extra), straight, device="cpu", evaluate=False)
    _run_crashing_in_step(7, _cfg(toy_root, *extra), crashed)
    assert (crashed / "checkpoint_epoch1.pt").is_file()
    train_module.train_detector(_cfg(toy_root, *extra), crashed, device="cpu", resume=True, evaluate=False)
    a, b = _final_state(straight), _final_state(crashed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_without_state_is_a_clear_error(toy_root, tmp_path):
    out = tmp_path / "never_started"
    with pytest.raises(TrainingError, match=r"--resume: no .*train_state\.pt.*without --resume"):
        train_module.train_detector(_cfg(toy_root), out, device="cpu", resume=True, evaluate=False)


def test_starting_over_an_existing_run_is_refused_and_leaves_it_intact(toy_root, tmp_path):
    out = tmp_path / "run"
    train_module.train_detector(_cfg(toy_root, "teacher.train.max_steps=2"), out, device="cpu", evaluate=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(TrainingError, match=r"already holds a run.*--resume"):
        # a different config: it must not overwrite the existing run's resolved config either
        train_module.train_detector(_cfg(toy_root, "teacher.train.max_steps=3", "teacher.train.lr=0.5"), out,
                                    device="cpu", evaluate=False)
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert after == before


def test_final_evaluation_writes_eval_json(toy_root, tmp_path):
    out = tmp_path / "run"
    summary = train_module.train_detector(_cfg(toy_root, "teacher.train.max_steps=2"), out, device="cpu")
    report = json.loads((out / "eval.json").read_text())
    assert set(METRIC_NAMES) <= set(report["metrics"])
    assert report["metrics"].keys() == summary["metrics"].keys()
    for name in METRIC_NAMES:  # nan (no GT of that size) or a fraction; json writes nan as NaN
        v = report["metrics"][name]
        assert math.isnan(v) or 0.0 <= v <= 1.0
    assert report["num_detections"] >= 0
    # the final checkpoint is self-describing and holds the trained step
    model = load_detector(out / "final.pt")
    assert model.spec["arch"] == "tiny" and model.num_classes == 6
    assert torch.load(out / "final.pt", weights_only=True)["extra"] == {"step": 2, "role": "teacher"}


def test_resume_with_a_changed_config_is_refused(toy_root, tmp_path):
    """Resuming must not silently continue with other training settings; the run length may change."""
    from sadpipe.tasks.supervised import train_detector
    overrides = tiny_overrides(toy_root) + ["teacher.train.max_steps=2"]
    train_detector(load_settings(REPO / "pipelines" / "toy.toml", overrides), tmp_path, device="cpu", evaluate=False)
    changed = load_settings(REPO / "pipelines" / "toy.toml", overrides + ["teacher.train.lr=0.5"])
    with pytest.raises(TrainingError, match=r"teacher\.train\.lr: 0\.001 \(run\) vs 0\.5 \(now\)"):
        train_detector(changed, tmp_path, device="cpu", resume=True, evaluate=False)
    longer = load_settings(REPO / "pipelines" / "toy.toml", overrides + ["teacher.train.max_steps=3"])
    assert train_detector(longer, tmp_path, device="cpu", resume=True, evaluate=False)["steps"] == 3


def test_periodic_evaluation_and_epoch_checkpoints(toy_root, tmp_path):
    """48 images / batch 8 = 6 steps per epoch; 12 steps with eval every epoch -> one mid-run eval at step 6
    (the last epoch's is the final eval.json) and a checkpoint per epoch."""
    from sadpipe.tasks.supervised import train_detector
    overrides = tiny_overrides(toy_root) + ["teacher.train.max_steps=12", "teacher.train.eval_every_epochs=1"]
    train_detector(load_settings(REPO / "pipelines" / "toy.toml", overrides), tmp_path, device="cpu")
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval" in r]
    assert [r["step"] for r in evals] == [6]
    assert set(evals[0]["eval"]) >= set(METRIC_NAMES)
    assert (tmp_path / "checkpoint_epoch1.pt").is_file() and (tmp_path / "checkpoint_epoch2.pt").is_file()
    assert load_detector(tmp_path / "checkpoint_epoch1.pt").spec["arch"] == "tiny"


def test_keep_epoch_checkpoints_keeps_the_newest(toy_root, tmp_path):
    """6 steps per epoch (as above), 18 steps -> epochs 1, 2, 3; keep 2 -> epochs 2 and 3 remain."""
    from sadpipe.tasks.supervised import train_detector
    overrides = tiny_overrides(toy_root) + ["teacher.train.max_steps=18", "teacher.train.keep_epoch_checkpoints=2"]
    train_detector(load_settings(REPO / "pipelines" / "toy.toml", overrides), tmp_path, device="cpu", evaluate=False)
    assert sorted(p.name for p in tmp_path.glob("checkpoint_epoch*.pt")) == ["checkpoint_epoch2.pt",
                                                                             "checkpoint_epoch3.pt"]


def test_prune_epoch_checkpoints_orders_by_epoch_number(tmp_path):
    """Epoch 10 is newer than epoch 9 (a name sort would say otherwise); other files are left alone."""
    from sadpipe.engine.loop import prune_epoch_checkpoints
    for n in (1, 2, 9, 10, 11):
        (tmp_path / f"checkpoint_epoch{n}.pt").write_bytes(b"x")
    (tmp_path / "checkpoint_epoch_old.pt").write_bytes(b"x")
    (tmp_path / "final.pt").write_bytes(b"x")
    assert prune_epoch_checkpoints(tmp_path, 0) == []
    deleted = prune_epoch_checkpoints(tmp_path, 2)
    assert sorted(p.name for p in deleted) == ["checkpoint_epoch1.pt", "checkpoint_epoch2.pt", "checkpoint_epoch9.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_epoch10.pt", "checkpoint_epoch11.pt",
                                                          "checkpoint_epoch_old.pt", "final.pt"]
