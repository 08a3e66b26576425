"""The one training loop, shared by supervised training and distillation (``sadpipe.tasks``).

Read top to bottom: optimiser, schedule and resume; then the loop, in which batches come from
one or more endless streams taking turns (the released SAD code alternates a labeled batch and a
mixed labeled + unlabeled batch), every step is logged, the run state is saved every
``checkpoint_every_steps`` and at every epoch end (so a crash loses little), and the model is
evaluated every ``eval_every_epochs`` epochs and at the end.

A task gives the loop a :class:`RunSpec` (where, how long, the streams, the loss of one batch,
the evaluation); :class:`Hooks` let a caller (tests, benchmarks) observe or interrupt the loop
at a batch, before the weights update, after a step, an evaluation or an epoch.

Under torchrun (``sadpipe.engine.distributed``): what rank 0 does alone (refusing an existing
run, saving, evaluating) ends in ``fail_together``, so a failure there stops every rank with its
message; and every output of the model enters the loss through an exact zero, so a rank whose
batch has no box targets still gives the box head a (zero) gradient and DDP keeps going.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.nn.parallel import DistributedDataParallel

from ..errors import TrainingError
from ..models import Detector, count_parameters, save_checkpoint
from .device import AnchorCache, autocast
from .distributed import DistInfo, TouchEveryOutput, fail_together
from .optim import build_optimizer, lr_factor
from .progress import Throughput, progress_bar
from .run_state import MetricsLog, RunState


@dataclass
class BatchLoss:
    """What a task's loss function returns for one batch.

    total: the scalar loss (float32, with its graph). terms: floats for the log, incl. "loss".
    hard_targets: the targets of the hard (ground-truth or pseudo-label) loss, one dict
    (boxes, labels, iscrowd on the device) per sample that has any; None when the task has none.
    """

    total: torch.Tensor
    terms: dict
    hard_targets: list[dict] | None = None


@dataclass
class Hooks:
    """Callbacks into the loop (all optional); an exception raised in one stops the run there.

    on_batch(step, batch)                   a batch arrived; ``step`` optimiser steps are done
    before_update(step, batch, loss, model) gradients are computed (as DDP reduced them, clipped),
                                            the weights not yet updated (``loss``: BatchLoss)
    on_step(record, batch, loss, model)     the step is done; ``record`` is its metrics line
    on_eval(step, epoch, metrics, model)    a periodic (mid-run) evaluation on rank 0
    on_epoch(epoch, step, model)            an epoch ended and its checkpoint is saved
    ``model`` is the bare model (not the DDP wrapper).
    """

    on_batch: Callable | None = None
    before_update: Callable | None = None
    on_step: Callable | None = None
    on_eval: Callable | None = None
    on_epoch: Callable | None = None

    def call(self, name: str, *args) -> None:
        fn = getattr(self, name)
        if fn is not None:
            fn(*args)


@dataclass
class RunSpec:
    """What the loop needs besides the model: where, how long, and how to compute a batch's loss.

    ``loss_fn(net, batch, anchors) -> BatchLoss``; ``evaluate(model, out_json or None) -> metrics
    dict`` runs on rank 0. ``resolved``: the resolved config dict (saved, compared on resume).
    ``train``: the task's ``settings.TrainConfig``.
    """

    out_dir: Path
    resolved: dict
    train: object
    streams: list
    loss_fn: Callable
    evaluate: Callable | None
    total_steps: int
    tag: str
    extra: dict = field(default_factory=dict)  # stored in checkpoints and the summary


def prune_epoch_checkpoints(out_dir: Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest ``checkpoint_epoch{N}.pt`` in ``out_dir`` (0 keeps all);
    returns the deleted paths. Resuming needs only ``train_state.pt``, so nothing here is lost
    for a crash; at COCO scale each file is a whole model (~150 MB for a ResNet-50 RetinaNet)."""
    if keep <= 0:
        return []
    found = []
    for path in out_dir.glob("checkpoint_epoch*.pt"):
        number = path.stem.removeprefix("checkpoint_epoch")
        if number.isdigit():
            found.append((int(number), path))
    old = [path for _, path in sorted(found)[:-keep]]
    for path in old:
        path.unlink(missing_ok=True)
    return old


def fit(model: Detector, run: RunSpec, dev: torch.device, info: DistInfo, *, resume: bool,
        hooks: Hooks | None = None) -> dict:
    """Train ``model`` as ``run`` says; returns a summary (steps, seconds, images/s, metrics)."""
    hooks = hooks or Hooks()
    out_dir, tcfg = Path(run.out_dir), run.train
    # epochs are counted on the first stream (the labeled one)
    steps_per_epoch = run.streams[0].per_epoch * len(run.streams)

    # -- optimiser, schedule, resume
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, tcfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, run.total_steps, tcfg))
    scaler = torch.amp.GradScaler("cuda", enabled=dev.type == "cuda" and tcfg.amp)
    state = RunState(out_dir, model, optimizer, scheduler, scaler)
    # a refusal (or any failure) here, on any rank, stops every rank with its message
    with fail_together(info):
        step = state.start(run.resolved, resume=resume, is_main=info.is_main)
        log = MetricsLog(out_dir / "metrics.jsonl", resume_step=step if resume else None, enabled=info.is_main)
    net = DistributedDataParallel(model) if info.enabled else model
    # under DDP every parameter must get a gradient on every rank (see sadpipe.engine.distributed)
    touch = TouchEveryOutput(model, enabled=info.enabled)
    anchors = AnchorCache(model.layout, dev)
    if info.is_main:
        sizes = " + ".join(str(len(s.dataset)) for s in run.streams)
        print(f"[{run.tag}] {model.spec['arch']} {count_parameters(model) / 1e6:.2f}M params, {sizes} images, "
              f"{steps_per_epoch} steps/epoch, {run.total_steps} steps, device {dev}, world {info.world_size}")

    def save(checkpoint_name: str | None):
        if info.is_main:
            state.save(step)
            if checkpoint_name:
                save_checkpoint(out_dir / f"{checkpoint_name}.pt", model, {"step": step, **run.extra})
                prune_epoch_checkpoints(out_dir, tcfg.keep_epoch_checkpoints)

    # -- the loop: streams take turns; stream k has served len(range(k, step, n)) batches so far
    n = len(run.streams)
    iters = [s.batches(len(range(k, step, n))) for k, s in enumerate(run.streams)]
    images_per_step = tcfg.batch_size * info.world_size
    bar = progress_bar(run.total_steps * images_per_step, step * images_per_step, run.tag, enabled=info.is_main)
    speed = Throughput()
    t_start = time.perf_counter()
    net.train()
    while step < run.total_steps:
        batch = next(iters[step % n])
        hooks.call("on_batch", step, batch)
        with autocast(dev, tcfg.amp), touch:
            out = run.loss_fn(net, batch, anchors)
        loss = out.total
        if touch.enabled:
            loss = loss + touch.zero_term()  # exactly 0, with exactly 0 gradients: only DDP notices it
        if not torch.isfinite(loss):
            raise TrainingError(f"loss became {loss.item()} at step {step}; lower the learning rate "
                                "(or distill.loss_weight) or check the data")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        if tcfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        hooks.call("before_update", step, batch, out, model)
        lr_used = optimizer.param_groups[0]["lr"]  # get_last_lr() after step() is the *next* step's lr
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        step += 1
        speed.add(images_per_step)
        bar.update(images_per_step)
        bar.set_postfix(loss=f"{out.terms['loss']:.3f}", refresh=False)
        record = {"step": step, "epoch": (step - 1) // steps_per_epoch, "stream": (step - 1) % n, "lr": lr_used,
                  **out.terms, "images_per_s": speed.images_per_s}
        log.write(record)
        hooks.call("on_step", record, batch, out, model)
        # rank 0 saves (and evaluates) while the others wait: a failure there must reach them
        if step % steps_per_epoch == 0:
            epoch = step // steps_per_epoch
            with fail_together(info):
                save(f"checkpoint_epoch{epoch}")
                every = tcfg.eval_every_epochs
                if every and epoch % every == 0 and step < run.total_steps and run.evaluate and info.is_main:
                    metrics = run.evaluate(model, None)
                    log.write({"step": step, "epoch": epoch, "eval": metrics})
                    hooks.call("on_eval", step, epoch, metrics, model)
                    net.train()
            hooks.call("on_epoch", epoch, step, model)
        elif tcfg.checkpoint_every_steps and step % tcfg.checkpoint_every_steps == 0:
            with fail_together(info):
                save(None)
    bar.close()
    train_seconds = time.perf_counter() - t_start
    summary = {"role": run.tag, "arch": model.spec["arch"], "params": count_parameters(model), "steps": step,
               "train_seconds": train_seconds, "images_per_s": speed.images_per_s, **run.extra}
    with fail_together(info):
        save(None)
        if info.is_main:
            save_checkpoint(out_dir / "final.pt", model, {"step": step, **run.extra})
            if run.evaluate:
                summary["metrics"] = run.evaluate(model, out_dir / "eval.json")
    return summary
