"""Supervised RetinaNet training (the teacher, or a student without distillation).

Read top to bottom: set-up, model, data, optimiser, resume, the loop, evaluation.
Outputs in ``out_dir``: ``config.resolved.toml``, ``metrics.jsonl``, ``train_state.pt``
(everything needed to resume), ``checkpoint_epoch{N}.pt``, ``final.pt`` and ``eval.json``.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from .config import save_resolved
from .data.dataset import DetectionDataset, collate, labeled_source, seed_worker
from .labeling import detection_loss
from .models import build_detector, count_parameters, default_spec, save_checkpoint
from .predict import AnchorCache, autocast, evaluate_model
from .training import (MetricsLog, ResumableSampler, Throughput, TrainingError, barrier, build_optimizer,
                       init_distributed, load_train_state, lr_factor, move_to, plan_steps, progress_bar,
                       save_train_state, seed_everything, select_device)
from .transforms import geometry_from_config


def build_model_for(cfg: dict, role: str, categories):
    layout, preprocess = geometry_from_config(cfg)
    mcfg = cfg[role]["model"]
    spec = default_spec(mcfg["arch"], categories.num_classes, layout, preprocess,
                        fpn_channels=mcfg["fpn_channels"], tiny_widths=mcfg["tiny_widths"],
                        backbone_norm=mcfg["backbone_norm"], head_norm=mcfg["head_norm"],
                        category_ids=list(categories.category_ids), class_names=list(categories.names))
    return build_detector(spec, mcfg["backbone_weights"] or None)


def supervised_loss(model, batch, anchors, tcfg, device):
    """Focal + box loss of one batch; returns (total, dict of float terms)."""
    cls_logits, bbox = model(move_to(batch["images"], device))
    targets = [{"boxes": b.to(device), "labels": l.to(device), "iscrowd": c.to(device)}
               for b, l, c in zip(batch["boxes"], batch["labels"], batch["iscrowd"])]
    losses = detection_loss(cls_logits.float(), bbox.float(), anchors(batch["canvas"]), targets,
                            focal_alpha=tcfg["focal_alpha"], focal_gamma=tcfg["focal_gamma"], box_loss=tcfg["box_loss"])
    total = losses["classification"] + tcfg["box_loss_weight"] * losses["box_regression"]
    return total, {"loss": total.item(), "cls": losses["classification"].item(), "box": losses["box_regression"].item()}


def train_detector(cfg: dict, out_dir: str | Path, *, role: str = "teacher", device: str = "auto",
                   max_steps: int | None = None, resume: bool = False, evaluate: bool = True) -> dict:
    """Train ``cfg[role]`` supervised on the labeled train split. Returns a summary dict."""
    out_dir = Path(out_dir)
    tcfg = cfg[role]["train"]
    dev = select_device(device)
    info = init_distributed(dev)
    seed_everything(tcfg["seed"])

    # -- data
    train_source = labeled_source(cfg, "train")
    model = build_model_for(cfg, role, train_source.categories).to(dev)
    dataset = DetectionDataset(train_source, model.preprocess, hflip=tcfg["hflip"], seed=tcfg["seed"])
    steps_per_epoch, total_steps = plan_steps(len(dataset), tcfg, info.world_size, max_steps)
    sampler = ResumableSampler(len(dataset), seed=tcfg["seed"], rank=info.rank, world_size=info.world_size)
    loader_kw = dict(batch_size=tcfg["batch_size"], sampler=sampler, drop_last=True, collate_fn=collate,
                     num_workers=tcfg["num_workers"], worker_init_fn=seed_worker, pin_memory=dev.type == "cuda",
                     persistent_workers=False)

    # -- model, optimiser, resume
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, tcfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, tcfg))
    scaler = torch.amp.GradScaler("cuda", enabled=dev.type == "cuda" and tcfg["amp"])
    step = 0
    state_path = out_dir / "train_state.pt"
    if resume:
        state = load_train_state(state_path)
        if state is None:
            raise TrainingError(f"--resume: no {state_path} to resume from; run without --resume to start")
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
        save_resolved(cfg, out_dir)
    barrier(info)
    net = DistributedDataParallel(model) if info.enabled else model
    anchors = AnchorCache(model.layout, dev)
    log = MetricsLog(out_dir / "metrics.jsonl", resume_step=step if resume else None, enabled=info.is_main)
    if info.is_main:
        print(f"[{role}] {model.spec['arch']} {count_parameters(model) / 1e6:.2f}M params, {len(dataset)} images, "
              f"{steps_per_epoch} steps/epoch, {total_steps} steps, device {dev}, world {info.world_size}")

    def checkpoint(tag: str | None):
        if not info.is_main:
            return
        save_train_state(state_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                      "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                                      "step": step, "rng": torch.get_rng_state()})
        if tag:
            save_checkpoint(out_dir / f"{tag}.pt", model, {"step": step, "role": role})

    # -- the loop
    images_per_step = tcfg["batch_size"] * info.world_size
    bar = progress_bar(total_steps * images_per_step, step * images_per_step, role, enabled=info.is_main)
    speed = Throughput()
    t_start = time.perf_counter()
    net.train()
    while step < total_steps:
        epoch, offset = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch, offset * tcfg["batch_size"])
        dataset.set_epoch(epoch)
        for batch in DataLoader(dataset, **loader_kw):
            with autocast(dev, tcfg["amp"]):
                loss, terms = supervised_loss(net, batch, anchors, tcfg, dev)
            if not torch.isfinite(loss):
                raise TrainingError(f"loss became {loss.item()} at step {step}; lower train.lr or check the data")
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
            log.write({"step": step, "epoch": epoch, "lr": lr_used, **terms,
                       "images_per_s": speed.images_per_s})
            if step % steps_per_epoch == 0:
                checkpoint(f"checkpoint_epoch{step // steps_per_epoch}")
            elif tcfg["checkpoint_every_steps"] and step % tcfg["checkpoint_every_steps"] == 0:
                checkpoint(None)
            if step >= total_steps:
                break
    bar.close()
    train_seconds = time.perf_counter() - t_start
    checkpoint(None)
    summary = {"role": role, "arch": model.spec["arch"], "params": count_parameters(model), "steps": step,
               "train_seconds": train_seconds, "images_per_s": speed.images_per_s}
    if info.is_main:
        save_checkpoint(out_dir / "final.pt", model, {"step": step, "role": role})
        if evaluate:
            summary["metrics"] = evaluate_model(model, labeled_source(cfg, "val"), cfg, dev,
                                                batch_size=tcfg["batch_size"], out_json=out_dir / "eval.json")
    barrier(info)
    return summary
