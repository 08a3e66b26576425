"""The training loop shared by the teacher trainer (train.py) and student distillation (distill.py).

Read top to bottom: optimiser, schedule and resume; then the loop, in which batches come from
one or more endless streams taking turns (the released SAD code alternates a labeled batch and a
mixed labeled + unlabeled batch), every step is logged, the run state is saved every
``checkpoint_every_steps`` and at every epoch end (so a crash loses little), and the model is
evaluated every ``eval_every_epochs`` epochs and at the end.

Under torchrun (sadpipe.distributed): what rank 0 does alone (refusing an existing run, saving,
evaluating) ends in ``fail_together``, so a failure there stops every rank with its message;
and every output of the model enters the loss through an exact zero, so a rank whose batch has
no box targets still gives the box head a (zero) gradient and DDP keeps going.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from .config import load_config, save_resolved
from .models import Detector, count_parameters, save_checkpoint
from .predict import AnchorCache, autocast
from .distributed import TouchEveryOutput, fail_together
from .training import (DistInfo, MetricsLog, ResumableSampler, Throughput, TrainingError, build_optimizer,
                       load_train_state, lr_factor, progress_bar, save_train_state)


class Stream:
    """An endless, resumable sequence of batches from one dataset (its own epochs and sampler)."""

    def __init__(self, dataset, *, batch_size: int, seed: int, info: DistInfo, loader_kw: dict):
        self.dataset, self.batch_size = dataset, batch_size
        self.sampler = ResumableSampler(len(dataset), seed=seed, rank=info.rank, world_size=info.world_size)
        self.per_epoch = (len(dataset) // info.world_size) // batch_size
        if self.per_epoch < 1:
            raise TrainingError(f"{len(dataset)} images are fewer than one batch of {batch_size} per rank")
        self.loader_kw = loader_kw

    def batches(self, consumed: int):
        """Yield batches forever, starting after ``consumed`` batches (a resumed run skips what it saw)."""
        while True:
            epoch, offset = divmod(consumed, self.per_epoch)
            self.sampler.set_epoch(epoch, offset * self.batch_size)
            self.dataset.set_epoch(epoch)
            for batch in DataLoader(self.dataset, batch_size=self.batch_size, sampler=self.sampler, drop_last=True,
                                    **self.loader_kw):
                consumed += 1
                yield batch
                if consumed % self.per_epoch == 0:
                    break  # the epoch ends here for this rank; the next epoch reshuffles


@dataclass
class RunSpec:
    """What the loop needs besides the model: where, how long, and how to compute a batch's loss.

    ``loss_fn(net, batch, anchors) -> (loss tensor, dict of float terms incl. "loss")``;
    ``evaluate(model) -> metrics dict`` runs on rank 0.
    """

    out_dir: Path
    cfg: dict
    train_cfg: dict
    streams: list[Stream]
    loss_fn: Callable
    evaluate: Callable | None
    total_steps: int
    tag: str
    extra: dict = field(default_factory=dict)  # stored in checkpoints and the summary


# keys a resumed run may change: how long, how often to save/evaluate, worker counts, where the data lives
RESUME_MAY_CHANGE = ("train.max_steps", "train.epochs", "train.num_workers", "train.checkpoint_every_steps",
                     "train.eval_every_epochs", "data.root", "dump.num_workers")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def check_resume_config(out_dir: Path, cfg: dict) -> None:
    """TrainingError if the run in out_dir was started with a config that differs in what it trains."""
    saved_path = out_dir / "config.resolved.toml"
    if not saved_path.is_file():
        return
    saved = _flatten(load_config(saved_path))
    now = _flatten(cfg)
    diffs = [f"{k}: {saved.get(k)!r} (run) vs {now.get(k)!r} (now)" for k in sorted(set(saved) | set(now))
             if saved.get(k) != now.get(k) and not k.endswith(RESUME_MAY_CHANGE)]
    if diffs:
        raise TrainingError(f"--resume: {out_dir} was started with another config:\n  " + "\n  ".join(diffs[:20])
                            + "\nresume with the same settings, or start a new run in another --out")


def fit(model: Detector, run: RunSpec, dev: torch.device, info: DistInfo, *, resume: bool) -> dict:
    """Train ``model`` as ``run`` says; returns a summary (steps, seconds, images/s, metrics)."""
    out_dir, tcfg = run.out_dir, run.train_cfg
    # epochs are counted on the first stream (the labeled one)
    steps_per_epoch = run.streams[0].per_epoch * len(run.streams)

    # -- optimiser, schedule, resume
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, tcfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, run.total_steps, tcfg))
    scaler = torch.amp.GradScaler("cuda", enabled=dev.type == "cuda" and tcfg["amp"])
    step = 0
    state_path = out_dir / "train_state.pt"
    # a refusal (or any failure) here, on any rank, stops every rank with its message
    with fail_together(info):
        if resume:
            state = load_train_state(state_path)
            if state is None:
                raise TrainingError(f"--resume: no {state_path} to resume from; run without --resume to start")
            check_resume_config(out_dir, run.cfg)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            step = state["step"]
            torch.set_rng_state(state["rng"])
        elif state_path.exists() and info.is_main:
            raise TrainingError(f"{out_dir} already holds a run (train_state.pt); pass --resume to continue it, "
                                "or choose another --out")
        if info.is_main:  # only now: a refused start must not overwrite the existing run's config
            save_resolved(run.cfg, out_dir)
        log = MetricsLog(out_dir / "metrics.jsonl", resume_step=step if resume else None, enabled=info.is_main)
    net = DistributedDataParallel(model) if info.enabled else model
    # under DDP every parameter must get a gradient on every rank (see sadpipe.distributed)
    touch = TouchEveryOutput(model, enabled=info.enabled)
    anchors = AnchorCache(model.layout, dev)
    if info.is_main:
        sizes = " + ".join(str(len(s.dataset)) for s in run.streams)
        print(f"[{run.tag}] {model.spec['arch']} {count_parameters(model) / 1e6:.2f}M params, {sizes} images, "
              f"{steps_per_epoch} steps/epoch, {run.total_steps} steps, device {dev}, world {info.world_size}")

    def save_state(tag: str | None):
        if not info.is_main:
            return
        save_train_state(state_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                      "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                                      "step": step, "rng": torch.get_rng_state()})
        if tag:
            save_checkpoint(out_dir / f"{tag}.pt", model, {"step": step, **run.extra})

    # -- the loop: streams take turns; stream k has served len(range(k, step, n)) batches so far
    n = len(run.streams)
    iters = [s.batches(len(range(k, step, n))) for k, s in enumerate(run.streams)]
    images_per_step = tcfg["batch_size"] * info.world_size
    bar = progress_bar(run.total_steps * images_per_step, step * images_per_step, run.tag, enabled=info.is_main)
    speed = Throughput()
    t_start = time.perf_counter()
    net.train()
    while step < run.total_steps:
        batch = next(iters[step % n])
        with autocast(dev, tcfg["amp"]), touch:
            loss, terms = run.loss_fn(net, batch, anchors)
        if touch.enabled:
            loss = loss + touch.zero_term()  # exactly 0, with exactly 0 gradients: only DDP notices it
        if not torch.isfinite(loss):
            raise TrainingError(f"loss became {loss.item()} at step {step}; lower the learning rate "
                                "(or distill.loss_weight) or check the data")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        if tcfg["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg["grad_clip"])
        lr_used = optimizer.param_groups[0]["lr"]  # get_last_lr() after step() is the *next* step's lr
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        step += 1
        speed.add(images_per_step)
        bar.update(images_per_step)
        bar.set_postfix(loss=f"{terms['loss']:.3f}", refresh=False)
        log.write({"step": step, "epoch": (step - 1) // steps_per_epoch, "stream": (step - 1) % n, "lr": lr_used,
                   **terms, "images_per_s": speed.images_per_s})
        # rank 0 saves (and evaluates) while the others wait: a failure there must reach them
        if step % steps_per_epoch == 0:
            epoch = step // steps_per_epoch
            with fail_together(info):
                save_state(f"checkpoint_epoch{epoch}")
                every = tcfg["eval_every_epochs"]
                if every and epoch % every == 0 and step < run.total_steps and run.evaluate and info.is_main:
                    log.write({"step": step, "epoch": epoch, "eval": run.evaluate(model, None)})
                    net.train()
        elif tcfg["checkpoint_every_steps"] and step % tcfg["checkpoint_every_steps"] == 0:
            with fail_together(info):
                save_state(None)
    bar.close()
    train_seconds = time.perf_counter() - t_start
    summary = {"role": run.tag, "arch": model.spec["arch"], "params": count_parameters(model), "steps": step,
               "train_seconds": train_seconds, "images_per_s": speed.images_per_s, **run.extra}
    with fail_together(info):
        save_state(None)
        if info.is_main:
            save_checkpoint(out_dir / "final.pt", model, {"step": step, **run.extra})
            if run.evaluate:
                summary["metrics"] = run.evaluate(model, out_dir / "eval.json")
    return summary
