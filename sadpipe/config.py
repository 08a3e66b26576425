"""Pipeline configuration: a TOML file, ``--set key=value`` overrides, the resolved copy.

A config is a nested dict. ``DEFAULTS`` lists every key with its default; a pipeline file
overrides some of them and ``--set`` overrides the file. Unknown keys are an error (a typo
must not silently fall back to a default), and so is a value of another kind than the
default's (an int is accepted for a float). The resolved config is written next to every
output as ``config.resolved.toml``.
"""

from __future__ import annotations

import copy
import json
import tomllib
from pathlib import Path

import tomli_w
from .errors import UserError


class ConfigError(UserError, ValueError):
    pass


_MODEL = {
    "arch": "resnet18",          # tiny | resnet18 | resnet34 | resnet50 | resnet101 | retinanet_resnet50_fpn[_v2]
    "fpn_channels": 64,          # 256 in torchvision / the paper
    "tiny_widths": [32, 64, 128, 256],
    "backbone_norm": "bn",       # bn (trainable, trains from scratch) | frozen_bn (ImageNet fine-tuning, the paper)
    "backbone_weights": "",      # optional local ImageNet state-dict file; nothing is downloaded
    "allow_random_backbone": False,  # frozen_bn without ImageNet backbone_weights is refused unless true
    "head_norm": "group",        # group | none (torchvision v1 head has no norm)
}

_OPTIM = {
    # adamw: cosine schedule, trains best from scratch (docs/method.md, section "Training from scratch (toy task)")
    "optimizer": "adamw",        # adamw | sgd (paper: warm-up + steps)
    "lr": 1e-3,
    "weight_decay": 1e-4,
    "momentum": 0.9,
    "batch_size": 16,
    "epochs": 1,
    "max_steps": 0,              # 0: epochs decide; otherwise stop after this many optimizer steps
    "warmup_steps": 50,
    "lr_milestones": [],         # for sgd: fractions of total steps where lr is multiplied by 0.1
    "grad_clip": 10.0,
    "hflip": True,
    "seed": 0,
    "num_workers": 2,
    "eval_every_epochs": 0,      # 0: evaluate at the end only
    "checkpoint_every_steps": 100,  # besides every epoch end, so a crash loses little
    "keep_epoch_checkpoints": 0,  # checkpoint_epoch{N}.pt files kept, newest first; 0 keeps all
    "focal_alpha": 0.25,
    "focal_gamma": 2.0,
    "box_loss": "l1",            # l1 | smooth_l1 | giou
    "box_loss_weight": 1.0,
    "amp": True,                 # only on CUDA
    "channels_last": True,       # conv weights channels-last: faster on CPU (oneDNN) and CUDA tensor cores
}

DEFAULTS: dict = {
    "name": "pipeline",
    "data": {
        "root": "",
        "train_images": "", "train_annotations": "",
        "val_images": "", "val_annotations": "",
        "unlabeled_images": "", "unlabeled_annotations": "",
        # > 0: hold out this fraction of the labeled train images (chosen by image id) for tuning;
        # training uses the rest and evaluation ("val") uses the held-out images, so loss weights
        # and thresholds are never chosen on val
        "tune_holdout": 0.0,
    },
    "geometry": {
        "min_size": 800,
        "max_size": 1333,
        "pad_divisor": 128,
        "strides": [8, 16, 32, 64, 128],
        "anchor_sizes": [32, 64, 128, 256, 512],
        "aspect_ratios": [0.5, 1.0, 2.0],
        "scales": [1.0, 2 ** (1 / 3), 2 ** (2 / 3)],
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
        # teachers converted from MMDetection / detectron2 (docs/teachers.md): float anchor corners,
        # detectron2's BGR pixels in 0-255
        "rounded_anchors": True,
        "channel_order": "RGB",
        "pixel_scale": 1.0,
    },
    "detect": {"score_thresh": 0.05, "nms_thresh": 0.5, "detections_per_img": 100, "topk_candidates": 1000},
    "teacher": {"model": dict(_MODEL), "train": dict(_OPTIM)},
    "student": {"model": dict(_MODEL, arch="tiny"), "train": dict(_OPTIM)},
    "dump": {
        "views": ["orig"],
        "images_per_shard": 64,
        "batch_size": 8,
        "with_box_regression": False,
        "max_detections": 100,
        "num_workers": 2,
        "codec": {},             # empty: sadpipe.cache.codec.default_codec()
    },
    "distill": {
        "method": "sad",         # none | kd | fdl | adl | sad | data_distillation | weighted_ce
        "loss_weight": 0.5,      # released code's alpha on the distillation term
        "beta": 1.0,             # paper convention (released beta_code = 1 - beta)
        "gamma": 2.0,
        "variant": "paper",      # paper | released
        "temperature": 1.0,      # plain KD only
        "normalizer": "adaptive",  # adaptive (sum q^power) | foreground
        "normalizer_power": 1.8,
        "unlabeled_mix": "alternate",  # alternate labeled / mixed batches (released code) | labeled_only
        "pseudo_labels": False,  # add focal/box losses on unlabeled images against the teacher's detections
        "pseudo_score_thresh": 0.5,
        # Chen et al. 2017 baselines (docs/method.md, section "Chen et al.'s baselines in a sigmoid head"):
        "hard_weight": 0.5,      # weighted_ce: mu in mu * hard + (1 - mu) * soft classification loss
        "background_weight": 1.5,  # weighted_ce: w_0 on the "not this class" side of each entry
        "bounded_regression_weight": 0.0,  # nu of the teacher-bounded regression loss (0: off; Chen: 0.5)
        "bounded_regression_margin": 0.0,  # m: no loss once the student beats the teacher by m
        "online_teacher": "",    # benchmark only: a teacher checkpoint run live every step instead of the cache
        "shard_window": 0,       # 0: random order; W >= 1: mix W cache shards at a time, read ahead (shard_sampler.py)
    },
}


def _parse_value(text: str):
    """TOML value syntax for --set (numbers, booleans, lists, quoted strings); bare words are strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _checked_value(path: str, default, value):
    """``value`` for a key whose default is ``default``: same kind (an int is fine for a float), else ConfigError."""
    def fail(kind: str):
        raise ConfigError(f"config key '{path}' expects {kind}, got {value!r}")
    if isinstance(default, bool):
        return value if isinstance(value, bool) else fail("true or false")
    if isinstance(default, int):
        return value if isinstance(value, int) and not isinstance(value, bool) else fail("an integer")
    if isinstance(default, float):
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else fail("a number")
    if isinstance(default, str):
        return value if isinstance(value, str) else fail('a string (quote it: "...")')
    if isinstance(default, list):
        return value if isinstance(value, list) else fail("a list, e.g. [1, 2]")
    return value


# tables whose keys another module checks (the codec's parameters: sadpipe.cache.codec)
FREE_FORM = {"dump.codec"}


def _merge(base: dict, override: dict, where: str) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        path = f"{where}.{key}" if where else key
        if key not in base:
            raise ConfigError(f"unknown config key '{path}'; known keys here: {', '.join(sorted(base))}")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{path}' is a table, got {value!r}")
            if path in FREE_FORM:  # its keys belong to another module; merged key by key, unchecked here
                out[key] = {**base[key], **copy.deepcopy(value)}
            else:
                out[key] = _merge(base[key], value, path)
        else:
            out[key] = _checked_value(path, base[key], value)
    return out


def _default_at(cfg: dict, parts: list[str]):
    node = cfg
    for part in parts:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def apply_override(cfg: dict, assignment: str) -> dict:
    """Apply one ``a.b.c=value`` override; returns a new dict."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects key=value, got {assignment!r}")
    key, text = assignment.split("=", 1)
    nested: dict = {}
    node = nested
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    value = _parse_value(text.strip())
    if isinstance(_default_at(cfg, parts), str) and not isinstance(value, str):
        value = text.strip()  # a string key takes the text as written: data.root=2024 is the folder "2024"
    node[parts[-1]] = value
    return _merge(cfg, nested, "")


def shipped_pipelines() -> dict[str, Path]:
    """The pipelines installed with sadpipe (sadpipe/pipelines/*.toml): name -> file."""
    folder = Path(__file__).resolve().parent / "pipelines"
    return {p.stem: p for p in sorted(folder.glob("*.toml"))}


def pipeline_path(path: str | Path) -> Path:
    """A pipeline file: ``path`` itself when it exists, else a shipped pipeline of that name
    (``toy``, ``toy.toml`` or ``pipelines/toy.toml`` from any folder)."""
    path = Path(path)
    shipped = shipped_pipelines()
    if not path.exists() and path.stem in shipped and path.suffix in ("", ".toml"):
        return shipped[path.stem]
    return path


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """DEFAULTS <- pipeline file <- overrides. Relative data paths resolve against data.root.
    ``path`` may name a shipped pipeline (see :func:`pipeline_path`)."""
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        path = pipeline_path(path)
        try:
            loaded = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML: {e}") from None
        try:
            cfg = _merge(cfg, loaded, "")
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    for assignment in overrides:
        cfg = apply_override(cfg, assignment)
    return cfg


def flatten(value, prefix: str = "") -> dict:
    """Nested dicts -> {"a.b.c": leaf}; lists stay leaves (compared whole); an empty table is a leaf {}."""
    if isinstance(value, dict):
        out: dict = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        if not value and prefix:
            out[prefix] = {}
        return out
    return {prefix: value}


def short_repr(value, limit: int = 80) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def config_differences(a: dict, b: dict, a_name: str, b_name: str, ignore=lambda key: False) -> list[str]:
    """Human lines "key: <a> (a_name) vs <b> (b_name)" for every leaf that differs, except keys ``ignore`` accepts."""
    fa, fb = flatten(a), flatten(b)
    lines = []
    for key in sorted(set(fa) | set(fb)):
        if ignore(key):
            continue
        va, vb = fa.get(key, "<missing>"), fb.get(key, "<missing>")
        if va != vb:
            lines.append(f"{key}: {short_repr(va)} ({a_name}) vs {short_repr(vb)} ({b_name})")
    return lines


def save_resolved(cfg: dict, out_dir: str | Path, name: str = "config.resolved.toml") -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / name
    target.write_text(tomli_w.dumps(cfg))
    return target
