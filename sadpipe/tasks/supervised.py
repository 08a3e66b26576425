"""Supervised RetinaNet training (the teacher, or a student without distillation), on the engine.

Set-up here (model, data, loss of a batch); the loop itself is ``sadpipe.engine.loop.fit``.
Outputs in ``out_dir``: ``config.resolved.toml``, ``metrics.jsonl``, ``train_state.pt``
(everything needed to resume), ``checkpoint_epoch{N}.pt``, ``final.pt`` and ``eval.json``.
"""

from __future__ import annotations

from pathlib import Path

from ..backbone_weights import check_pretrained_backbone
from ..data.dataset import DetectionDataset, collate, labeled_source, seed_worker
from ..engine.device import model_to, move_to, seed_everything, select_device
from ..engine.distributed import init_distributed
from ..engine.loop import BatchLoss, Hooks, RunSpec, fit
from ..engine.streams import Stream, total_steps
from ..inference import evaluate_model
from ..labeling import detection_loss
from ..models import build_detector, model_spec
from ..settings import PipelineConfig


def build_model_for(cfg: PipelineConfig, role: str, categories):
    """A fresh detector for ``cfg.<role>`` (teacher or student) with its backbone weights, ready to train.

    Raises ``BackboneWeightsError`` for a frozen-BatchNorm backbone without trained weights unless
    ``<role>.model.allow_random_backbone`` (see ``sadpipe.backbone_weights``).
    """
    mcfg = cfg.role(role).model
    spec = model_spec(mcfg, categories.num_classes, cfg.geometry.layout, cfg.geometry.preprocess,
                      category_ids=list(categories.category_ids), class_names=list(categories.names))
    model = build_detector(spec, mcfg.backbone_weights or None)
    # every model trained from a config is built here: refuse a frozen-BN backbone without trained weights
    check_pretrained_backbone(model, role, mcfg.backbone_weights, mcfg.allow_random_backbone)
    return model


def hard_targets(batch: dict, samples, device) -> list[dict]:
    """The ground-truth (or pseudo-label) targets of the given sample indices, on ``device``."""
    return [{"boxes": batch["boxes"][i].to(device), "labels": batch["labels"][i].to(device),
             "iscrowd": batch["iscrowd"][i].to(device)} for i in samples]


def supervised_loss(model, batch, anchors, tcfg, device) -> BatchLoss:
    """Focal + box loss of one batch (``tcfg``: a ``settings.TrainConfig``)."""
    cls_logits, bbox = model(move_to(batch["images"], device))
    targets = hard_targets(batch, range(len(batch["boxes"])), device)
    losses = detection_loss(cls_logits.float(), bbox.float(), anchors(batch["canvas"]), targets,
                            focal_alpha=tcfg.focal_alpha, focal_gamma=tcfg.focal_gamma, box_loss=tcfg.box_loss)
    total = losses["classification"] + tcfg.box_loss_weight * losses["box_regression"]
    return BatchLoss(total, {"loss": total.item(), "cls": losses["classification"].item(),
                             "box": losses["box_regression"].item()}, targets)


def val_evaluator(cfg: PipelineConfig, dev, batch_size: int):
    """model, json path (or None) -> COCO metrics on the val split."""
    def evaluate(model, out_json):
        return evaluate_model(model, labeled_source(cfg.data, "val"), cfg.detect, dev, batch_size=batch_size,
                              out_json=out_json)
    return evaluate


def train_detector(cfg: PipelineConfig, out_dir: str | Path, *, role: str = "teacher", device: str = "auto",
                   max_steps: int | None = None, resume: bool = False, evaluate: bool = True,
                   hooks: Hooks | None = None) -> dict:
    """Train ``cfg.<role>`` supervised on the labeled train split. Returns a summary dict.

    ``hooks``: callbacks into the loop (``sadpipe.engine.loop.Hooks``)."""
    out_dir = Path(out_dir)
    tcfg = cfg.role(role).train
    dev = select_device(device)
    info = init_distributed(dev)
    seed_everything(tcfg.seed)

    train_source = labeled_source(cfg.data, "train")
    model = model_to(build_model_for(cfg, role, train_source.categories), dev, tcfg.channels_last)
    dataset = DetectionDataset(train_source, model.preprocess, hflip=tcfg.hflip, seed=tcfg.seed)
    stream = Stream(dataset, batch_size=tcfg.batch_size, seed=tcfg.seed, info=info,
                    loader_kw=dict(collate_fn=collate, num_workers=tcfg.num_workers, worker_init_fn=seed_worker,
                                   pin_memory=dev.type == "cuda"))

    def loss_fn(net, batch, anchors):
        return supervised_loss(net, batch, anchors, tcfg, dev)

    run = RunSpec(out_dir=out_dir, resolved=cfg.resolved, train=tcfg, streams=[stream], loss_fn=loss_fn,
                  evaluate=val_evaluator(cfg, dev, tcfg.batch_size) if evaluate else None,
                  total_steps=total_steps([stream], tcfg.epochs, tcfg.max_steps, max_steps), tag=role,
                  extra={"role": role})
    return fit(model, run, dev, info, resume=resume, hooks=hooks)
