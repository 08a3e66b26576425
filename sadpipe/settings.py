"""Typed, checked settings: frozen dataclasses built once from a resolved config dict.

``sadpipe.config`` keeps the dict layer (DEFAULTS, the pipeline TOML, ``--set``, the saved
``config.resolved.toml``); :func:`settings_from_dict` turns a resolved dict into a
:class:`PipelineConfig`, checking every allowed value here, in one place, with a one-line
``ConfigError`` that names the key. Library functions take these dataclasses, not the dict.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from .config import ConfigError, load_config
from .geometry import AnchorLayout
from .models import ARCHS
from .transforms import Preprocess, geometry_from_config

BACKBONE_NORMS = ("bn", "frozen_bn")
HEAD_NORMS = ("group", "none")
OPTIMIZERS = ("adamw", "sgd")
BOX_LOSSES = ("l1", "smooth_l1", "giou")
METHODS = ("none", "kd", "fdl", "adl", "sad", "data_distillation", "weighted_ce")
NORMALIZERS = ("adaptive", "foreground")
VARIANTS = ("paper", "released")
UNLABELED_MIXES = ("alternate", "labeled_only")
VIEWS = ("orig", "hflip")


# ---- checks: each raises a one-line ConfigError naming the key -------------------------------

def one_of(key: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(map(str, choices))}, got {value!r}")


def at_least(key: str, value, low) -> None:
    if not value >= low:
        raise ConfigError(f"{key} must be >= {low}, got {value!r}")


def above(key: str, value, low) -> None:
    if not value > low:
        raise ConfigError(f"{key} must be > {low}, got {value!r}")


def between(key: str, value, low, high, *, high_open: bool = False) -> None:
    if not (low <= value < high if high_open else low <= value <= high):
        raise ConfigError(f"{key} must be in [{low}, {high}{')' if high_open else ']'}, got {value!r}")


def _tuples(section: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in section.items()}


def _make(cls, section: dict):
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in _tuples(section).items() if k in names})


# ---- the sections ------------------------------------------------------------------------------

@dataclass(frozen=True)
class DataConfig:
    """[data]: where the images and annotations are; relative paths resolve against ``root``."""

    root: str
    train_images: str
    train_annotations: str
    val_images: str
    val_annotations: str
    unlabeled_images: str
    unlabeled_annotations: str
    tune_holdout: float = 0.0

    def path(self, key: str) -> Path | None:
        """The path of data key ``key`` (e.g. 'train_images'), resolved against root; None if unset."""
        value = getattr(self, key)
        if not value:
            return None
        p = Path(value).expanduser()
        return p if p.is_absolute() or not self.root else Path(self.root).expanduser() / p

    def key_of(self, path: str | Path) -> str:
        """``path`` relative to root (POSIX form), as the teacher cache records an image, so a cache
        made on one machine matches the same files under another root; a path outside root stays whole."""
        p = Path(path).expanduser()
        if self.root:
            try:
                return p.relative_to(Path(self.root).expanduser()).as_posix()
            except ValueError:
                pass
        return p.as_posix()


@dataclass(frozen=True)
class GeometryConfig:
    """[geometry], built: the anchor layout and the preprocessing every model and store shares."""

    layout: AnchorLayout
    preprocess: Preprocess


@dataclass(frozen=True)
class DetectConfig:
    """[detect]: postprocessing of head outputs into detections."""

    score_thresh: float
    nms_thresh: float
    detections_per_img: int
    topk_candidates: int


@dataclass(frozen=True)
class ModelConfig:
    """[teacher.model] / [student.model]."""

    arch: str
    fpn_channels: int
    tiny_widths: tuple[int, ...]
    backbone_norm: str
    backbone_weights: str
    allow_random_backbone: bool
    head_norm: str


@dataclass(frozen=True)
class TrainConfig:
    """[teacher.train] / [student.train]."""

    optimizer: str
    lr: float
    weight_decay: float
    momentum: float
    batch_size: int
    epochs: int
    max_steps: int
    warmup_steps: int
    lr_milestones: tuple[float, ...]
    grad_clip: float
    hflip: bool
    seed: int
    num_workers: int
    eval_every_epochs: int
    checkpoint_every_steps: int
    keep_epoch_checkpoints: int
    focal_alpha: float
    focal_gamma: float
    box_loss: str
    box_loss_weight: float
    amp: bool
    channels_last: bool


@dataclass(frozen=True)
class RoleConfig:
    """A model to train, the teacher or the student: ``model`` is its [<role>.model] table,
    ``train`` its [<role>.train] table."""

    model: ModelConfig
    train: TrainConfig


@dataclass(frozen=True)
class DumpConfig:
    """[dump]: the teacher cache; ``codec`` is free-form (sadpipe.cache.codec)."""

    views: tuple[str, ...]
    images_per_shard: int
    batch_size: int
    with_box_regression: bool
    max_detections: int
    num_workers: int
    codec: dict


@dataclass(frozen=True)
class DistillConfig:
    """[distill]: the method and its losses (docs/method.md)."""

    method: str
    loss_weight: float
    beta: float
    gamma: float
    variant: str
    temperature: float
    normalizer: str
    normalizer_power: float
    unlabeled_mix: str
    pseudo_labels: bool
    pseudo_score_thresh: float
    hard_weight: float
    background_weight: float
    bounded_regression_weight: float
    bounded_regression_margin: float
    online_teacher: str
    shard_window: int


@dataclass(frozen=True, eq=False)
class PipelineConfig:
    """A whole pipeline. ``resolved`` is the dict it was built from: saved as config.resolved.toml,
    compared on resume, and (its dump-relevant part) stored in a teacher cache."""

    name: str
    data: DataConfig
    geometry: GeometryConfig
    detect: DetectConfig
    teacher: RoleConfig
    student: RoleConfig
    dump: DumpConfig
    distill: DistillConfig
    resolved: dict

    def role(self, name: str) -> RoleConfig:
        one_of("role", name, ("teacher", "student"))
        return getattr(self, name)


# ---- building and checking -------------------------------------------------------------------

def _model(cfg: dict, where: str) -> ModelConfig:
    m = _make(ModelConfig, cfg)
    one_of(f"{where}.arch", m.arch, ARCHS)
    one_of(f"{where}.backbone_norm", m.backbone_norm, BACKBONE_NORMS)
    one_of(f"{where}.head_norm", m.head_norm, HEAD_NORMS)
    at_least(f"{where}.fpn_channels", m.fpn_channels, 1)
    if len(m.tiny_widths) != 4 or not all(isinstance(w, int) and w >= 1 for w in m.tiny_widths):
        raise ConfigError(f"{where}.tiny_widths must be 4 positive integers, got {list(m.tiny_widths)!r}")
    return m


def _train(cfg: dict, where: str) -> TrainConfig:
    t = _make(TrainConfig, cfg)
    one_of(f"{where}.optimizer", t.optimizer, OPTIMIZERS)
    one_of(f"{where}.box_loss", t.box_loss, BOX_LOSSES)
    above(f"{where}.lr", t.lr, 0)
    at_least(f"{where}.batch_size", t.batch_size, 1)
    at_least(f"{where}.epochs", t.epochs, 1)
    for key in ("weight_decay", "max_steps", "warmup_steps", "grad_clip", "num_workers", "eval_every_epochs",
                "checkpoint_every_steps", "keep_epoch_checkpoints", "focal_gamma", "box_loss_weight"):
        at_least(f"{where}.{key}", getattr(t, key), 0)
    between(f"{where}.momentum", t.momentum, 0, 1, high_open=True)
    between(f"{where}.focal_alpha", t.focal_alpha, 0, 1)
    for m in t.lr_milestones:
        between(f"{where}.lr_milestones", m, 0, 1)
    return t


def _distill(cfg: dict) -> DistillConfig:
    d = _make(DistillConfig, cfg)
    one_of("distill.method", d.method, METHODS)
    one_of("distill.normalizer", d.normalizer, NORMALIZERS)
    one_of("distill.variant", d.variant, VARIANTS)
    one_of("distill.unlabeled_mix", d.unlabeled_mix, UNLABELED_MIXES)
    above("distill.temperature", d.temperature, 0)
    above("distill.normalizer_power", d.normalizer_power, 0)
    for key in ("loss_weight", "gamma", "background_weight", "bounded_regression_weight",
                "bounded_regression_margin", "shard_window"):
        at_least(f"distill.{key}", getattr(d, key), 0)
    for key in ("beta", "pseudo_score_thresh", "hard_weight"):
        between(f"distill.{key}", getattr(d, key), 0, 1)
    return d


def _dump(cfg: dict) -> DumpConfig:
    d = _make(DumpConfig, cfg)
    if not d.views or any(v not in VIEWS for v in d.views):
        raise ConfigError(f"dump.views must be a non-empty list of {', '.join(VIEWS)}, got {list(d.views)!r}")
    for key in ("images_per_shard", "batch_size", "max_detections"):
        at_least(f"dump.{key}", getattr(d, key), 1)
    at_least("dump.num_workers", d.num_workers, 0)
    return d


def _detect(cfg: dict) -> DetectConfig:
    d = _make(DetectConfig, cfg)
    between("detect.score_thresh", d.score_thresh, 0, 1)
    between("detect.nms_thresh", d.nms_thresh, 0, 1)
    at_least("detect.detections_per_img", d.detections_per_img, 1)
    at_least("detect.topk_candidates", d.topk_candidates, 1)
    return d


def settings_from_dict(cfg: dict) -> PipelineConfig:
    """The PipelineConfig of a resolved config dict (``sadpipe.config.load_config``); ConfigError
    (one line, naming the key) for any value outside what sadpipe accepts."""
    data = _make(DataConfig, cfg["data"])
    between("data.tune_holdout", data.tune_holdout, 0, 1, high_open=True)
    layout, preprocess = geometry_from_config(cfg)  # ConfigError for an inconsistent [geometry]
    return PipelineConfig(
        name=cfg["name"], data=data, geometry=GeometryConfig(layout, preprocess), detect=_detect(cfg["detect"]),
        teacher=RoleConfig(_model(cfg["teacher"]["model"], "teacher.model"),
                           _train(cfg["teacher"]["train"], "teacher.train")),
        student=RoleConfig(_model(cfg["student"]["model"], "student.model"),
                           _train(cfg["student"]["train"], "student.train")),
        dump=_dump(cfg["dump"]), distill=_distill(cfg["distill"]), resolved=cfg)


def load_settings(path: str | Path | None = None, overrides=()) -> PipelineConfig:
    """``settings_from_dict(load_config(path, overrides))``: a pipeline file (or a shipped name) with ``--set`` overrides."""
    return settings_from_dict(load_config(path, overrides))
