"""Supervised RetinaNet training (the teacher, or a student without distillation).

Set-up here (model, data, loss of a batch); the loop itself is ``sadpipe.loop.fit``.
Outputs in ``out_dir``: ``config.resolved.toml``, ``metrics.jsonl``, ``train_state.pt``
(everything needed to resume), ``checkpoint_epoch{N}.pt``, ``final.pt`` and ``eval.json``.
"""

from __future__ import annotations

from pathlib import Path

from .backbone_weights import check_pretrained_backbone
from .data.dataset import DetectionDataset, collate, labeled_source, seed_worker
from .labeling import detection_loss
from .loop import RunSpec, Stream, fit
from .models import build_detector, default_spec
from .predict import evaluate_model
from .training import init_distributed, move_to, plan_steps, seed_everything, select_device
from .transforms import geometry_from_config


def build_model_for(cfg: dict, role: str, categories):
    """A fresh detector for ``cfg[role]`` (teacher or student) with its backbone weights, ready to train.

    Raises ``BackboneWeightsError`` for a frozen-BatchNorm backbone without trained weights unless
    ``<role>.model.allow_random_backbone`` (see ``sadpipe.backbone_weights``).
    """
    layout, preprocess = geometry_from_config(cfg)
    mcfg = cfg[role]["model"]
    spec = default_spec(mcfg["arch"], categories.num_classes, layout, preprocess,
                        fpn_channels=mcfg["fpn_channels"], tiny_widths=mcfg["tiny_widths"],
                        backbone_norm=mcfg["backbone_norm"], head_norm=mcfg["head_norm"],
                        category_ids=list(categories.category_ids), class_names=list(categories.names))
    model = build_detector(spec, mcfg["backbone_weights"] or None)
    # every model trained from a config is built here: refuse a frozen-BN backbone without trained weights
    check_pretrained_backbone(model, role, mcfg["backbone_weights"], mcfg["allow_random_backbone"])
    return model


def supervised_loss(model, batch, anchors, tcfg, device):
    """Focal + box loss of one batch; returns (total, dict of float terms)."""
    cls_logits, bbox = model(move_to(batch["images"], device))
    targets = [{"boxes": b.to(device), "labels": l.to(device), "iscrowd": c.to(device)}
               for b, l, c in zip(batch["boxes"], batch["labels"], batch["iscrowd"])]
    losses = detection_loss(cls_logits.float(), bbox.float(), anchors(batch["canvas"]), targets,
                            focal_alpha=tcfg["focal_alpha"], focal_gamma=tcfg["focal_gamma"], box_loss=tcfg["box_loss"])
    total = losses["classification"] + tcfg["box_loss_weight"] * losses["box_regression"]
    return total, {"loss": total.item(), "cls": losses["classification"].item(), "box": losses["box_regression"].item()}




def val_evaluator(cfg: dict, dev, batch_size: int):
    """model, json path (or None) -> COCO metrics on the val split."""
    def evaluate(model, out_json):
        return evaluate_model(model, labeled_source(cfg, "val"), cfg, dev, batch_size=batch_size, out_json=out_json)
    return evaluate


def train_detector(cfg: dict, out_dir: str | Path, *, role: str = "teacher", device: str = "auto",
                   max_steps: int | None = None, resume: bool = False, evaluate: bool = True) -> dict:
    """Train ``cfg[role]`` supervised on the labeled train split. Returns a summary dict."""
    out_dir = Path(out_dir)
    tcfg = cfg[role]["train"]
    dev = select_device(device)
    info = init_distributed(dev)
    seed_everything(tcfg["seed"])

    train_source = labeled_source(cfg, "train")
    model = build_model_for(cfg, role, train_source.categories).to(dev)
    dataset = DetectionDataset(train_source, model.preprocess, hflip=tcfg["hflip"], seed=tcfg["seed"])
    _, total_steps = plan_steps(len(dataset), tcfg, info.world_size, max_steps)
    stream = Stream(dataset, batch_size=tcfg["batch_size"], seed=tcfg["seed"], info=info,
                    loader_kw=dict(collate_fn=collate, num_workers=tcfg["num_workers"], worker_init_fn=seed_worker,
                                   pin_memory=dev.type == "cuda"))

    def loss_fn(net, batch, anchors):
        return supervised_loss(net, batch, anchors, tcfg, dev)

    run = RunSpec(out_dir=out_dir, cfg=cfg, train_cfg=tcfg, streams=[stream], loss_fn=loss_fn,
                  evaluate=val_evaluator(cfg, dev, tcfg["batch_size"]) if evaluate else None,
                  total_steps=total_steps, tag=role, extra={"role": role})
    return fit(model, run, dev, info, resume=resume)
