"""The `sadpipe` command line: thin click commands that parse options and call library functions."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from . import __version__


def _config_options(fn):
    """--config, --set, --device shared by the commands that read a pipeline config."""
    @click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
                  help="Pipeline TOML, or the name of a shipped one (toy, coco_r101_teacher, coco_sad_r50). "
                       "Default: the toy pipeline.")
    @click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                  help="Override a config key, e.g. --set teacher.train.lr=0.01 (repeatable).")
    @click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
                  help="auto uses CUDA when available.")
    @functools.wraps(fn)
    def wrapper(*args, config_path, overrides, **kwargs):
        from .demo import default_pipeline
        from .errors import UserError
        from .settings import load_settings
        try:
            cfg = load_settings(config_path or default_pipeline(), overrides)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        return fn(*args, cfg=cfg, **kwargs)
    return wrapper


class _StoreParam(click.ParamType):
    """A teacher cache: a local directory (a Path) or an fsspec URL such as s3://bucket/prefix/cache.zarr
    (kept a string: click.Path would fold "s3://" into "s3:/")."""

    name = "PATH|URL"

    def convert(self, value, param, ctx):
        from .cache.storage import url_or_path
        return value if isinstance(value, Path) else url_or_path(str(value))


STORE = _StoreParam()


def _friendly_errors(fn):
    """Turn the library's user-facing exceptions into one clear line and exit code 2."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .errors import UserError, credentials_message
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except Exception as e:
            message = credentials_message(e)
            if message is None:
                raise
            click.echo(f"error: {message}", err=True)
            sys.exit(2)
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sadpipe")
def main():
    """sadpipe: distill single-stage detectors with Semi-supervised Adaptive Distillation.

    \b
    Quick start (CPU, toy data, minutes):
      sadpipe demo
    \b
    The pipeline by hand:
      sadpipe make-toy-data data/toy
      sadpipe train-teacher --config pipelines/toy.toml --out runs/teacher
      sadpipe evaluate --config pipelines/toy.toml --checkpoint runs/teacher/final.pt
    """


@main.command("make-toy-data")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--preset", type=click.Choice(["toy", "coco"]), default="toy", show_default=True,
              help="toy: 128 px shapes, 6 classes (pipelines/toy.toml). coco: the same shapes in COCO 2017's layout, "
                   "80 categories and image sizes (pipelines/coco_*.toml).")
@click.option("--train", "n_train", type=int, default=None, help="Labeled train images (toy: 1200, coco: 16).")
@click.option("--val", "n_val", type=int, default=None, help="Labeled val images (toy: 300, coco: 8).")
@click.option("--unlabeled", "n_unlabeled", type=int, default=None, help="Unlabeled images (toy: 2400, coco: 8).")
@_friendly_errors
def make_toy_data_cmd(out, seed, preset, n_train, n_val, n_unlabeled):
    """Write a synthetic dataset (COCO format) to OUT, deterministically.

    \b
    Examples:
      sadpipe make-toy-data data/toy --seed 0
      sadpipe make-toy-data data/coco_like --preset coco --train 16 --val 8 --unlabeled 8
    """
    counts = {k: v for k, v in (("n_train", n_train), ("n_val", n_val), ("n_unlabeled", n_unlabeled)) if v is not None}
    try:
        if preset == "coco":
            from .data.coco_like import make_coco_like_dataset
            summary = make_coco_like_dataset(out, seed=seed, **counts)
        else:
            from .data.toy import make_toy_dataset
            summary = make_toy_dataset(out, seed=seed, **counts)
    except (ValueError, FileExistsError) as e:  # bad counts, or OUT holds something else
        raise click.UsageError(str(e)) from None
    click.echo(json.dumps(summary, indent=2, default=str))


@main.command("make-backbone-weights")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--arch", type=click.Choice(["resnet18", "resnet34", "resnet50", "resnet101"]), required=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batches", type=click.IntRange(min=1), default=4, show_default=True,
              help="Calibration batches of 8 synthetic images.")
@_friendly_errors
def make_backbone_weights_cmd(out, arch, seed, batches):
    """Write STAND-IN ResNet backbone weights for tests and demos. NOT ImageNet weights.

    Real ImageNet weights are needed for real results; these only behave like them under frozen
    BatchNorm (activations of order one, every block alive: BatchNorm statistics calibrated on
    synthetic images, small residual scales), so the COCO pipelines run end to end without a
    download. The file is a torchvision state dict, for --set <role>.model.backbone_weights=OUT.

    \b
    Example:
      sadpipe make-backbone-weights --arch resnet101 runs/standin_resnet101.pth
      sadpipe train-teacher --config pipelines/coco_r101_teacher.toml --out runs/r101 \\
          --set teacher.model.backbone_weights=runs/standin_resnet101.pth
    """
    from .backbone_weights import save_standin_backbone_weights
    path = save_standin_backbone_weights(arch, out, seed=seed, batches=batches)
    click.echo(f"wrote {path}: stand-in {arch} backbone weights (calibrated, NOT ImageNet weights; tests and demos only)")


@main.command("train-teacher")
@_config_options
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Run directory.")
@click.option("--max-steps", type=int, default=None, help="Stop after N optimizer steps (overrides train.max_steps).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last saved state.")
@click.option("--role", type=click.Choice(["teacher", "student"]), default="teacher", show_default=True,
              help="Which [*.model]/[*.train] tables to use; 'student' trains the student alone (no distillation).")
@_friendly_errors
def train_teacher_cmd(cfg, out, max_steps, resume, role, device):
    """Train a RetinaNet supervised on the labeled train split, then evaluate on val.

    \b
    Examples:
      sadpipe train-teacher --config pipelines/toy.toml --out runs/teacher
      sadpipe train-teacher --config pipelines/toy.toml --out runs/teacher --resume
      sadpipe train-teacher --config pipelines/coco_r101_teacher.toml --out runs/r101 --set data.root=/data/coco
    """
    from .evaluate import format_metrics_table
    from .tasks.supervised import train_detector
    summary = train_detector(cfg, out, role=role, device=device, max_steps=max_steps, resume=resume)
    if "metrics" in summary:
        click.echo(format_metrics_table({f"{role} ({summary['arch']})": summary["metrics"]}))
    click.echo(f"{summary['steps']} steps in {summary['train_seconds']:.0f} s, {summary['images_per_s']:.1f} images/s; "
               f"checkpoint {out / 'final.pt'}")


@main.command("evaluate")
@_config_options
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="JSON file for the metrics (default: next to the checkpoint).")
@click.option("--per-iou", is_flag=True, help="Also report AP at each IoU threshold 0.50 ... 0.95.")
@_friendly_errors
def evaluate_cmd(cfg, checkpoint, out, device, per_iou):
    """COCO metrics (AP, AP50, AP75, APs, APm, APl) of a checkpoint on the config's val split.

    \b
    Example:
      sadpipe evaluate --config pipelines/toy.toml --checkpoint runs/teacher/final.pt
    """
    from .config import save_resolved
    from .data.dataset import labeled_source
    from .engine.device import select_device
    from .evaluate import format_metrics_table
    from .inference import evaluate_model
    from .models import load_detector
    dev = select_device(device)
    model = load_detector(checkpoint).to(dev)
    out = out or checkpoint.with_name(checkpoint.stem + "_eval.json")
    metrics = evaluate_model(model, labeled_source(cfg.data, "val"), cfg.detect, dev, out_json=out, per_iou=per_iou)
    save_resolved(cfg.resolved, out.parent, name=f"{out.stem}.config.resolved.toml")
    click.echo(format_metrics_table({checkpoint.name: metrics}))
    click.echo(f"wrote {out}")


@main.command("dump-teacher")
@_config_options
@click.option("--teacher", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Teacher checkpoint (sadpipe checkpoint, self-describing).")
@click.option("--out", type=STORE, required=True,
              help="The Zarr store to write: a directory or a URL such as s3://bucket/prefix/cache.zarr.")
@click.option("--views", default=None, help="Comma-separated views to store: orig, hflip (default: dump.views).")
@click.option("--with-box-regression", is_flag=True, default=None, help="Also store per-anchor box regression (float16).")
@click.option("--overwrite", is_flag=True, help="Replace an existing store made with other settings.")
@click.option("--strict", is_flag=True, help="Stop at the first unreadable image instead of recording it as failed.")
@click.option("--limit", type=int, default=None, help="Dump only the first N images of the plan (smoke runs).")
@_friendly_errors
def dump_teacher_cmd(cfg, teacher, out, views, with_box_regression, overwrite, strict, limit, device):
    """Run the teacher over the labeled train and unlabeled images; write the teacher cache.

    Rerunning the same command resumes an interrupted dump without redoing finished shards.
    Several processes split the shards: torchrun --nproc-per-node N -m sadpipe dump-teacher ...

    \b
    Examples:
      sadpipe dump-teacher --config pipelines/toy.toml --teacher runs/teacher/final.pt --out runs/cache.zarr
      torchrun --nproc-per-node 8 -m sadpipe dump-teacher --config pipelines/coco_sad_r50.toml \\
          --teacher r101.pt --out /data/cache.zarr
    """
    from .tasks.dump import dump_teacher
    summary = dump_teacher(cfg, teacher, out, device=device, views=tuple(views.split(",")) if views else None,
                           with_box_regression=with_box_regression, overwrite=overwrite, strict=strict,
                           limit=limit)
    click.echo(f"rank {summary['rank']}: {summary['images']} images in {summary['seconds']:.0f} s "
               f"({summary['images_per_s']:.1f} images/s), {summary['failed']} failed")
    if "completion" in summary:
        click.echo(f"store complete: {out}")


@main.group("cache")
def cache_group():
    """Inspect a teacher cache: info, verify, fidelity."""


@cache_group.command("info")
@click.argument("store", type=STORE)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_friendly_errors
def cache_info_cmd(store, as_json):
    """Images per split and view, size on disk, bytes per image, ratio to dense float32, teacher, codec.

    \b
    Example:
      sadpipe cache info runs/demo/cache.zarr
    """
    from .cache.store_report import format_store_info, store_info
    info = store_info(store)
    click.echo(json.dumps(info, indent=2, default=str) if as_json else format_store_info(info))


@cache_group.command("verify")
@click.argument("store", type=STORE)
@_friendly_errors
def cache_verify_cmd(store):
    """Check completeness, every chunk's checksum and the metadata; exit 1 if anything is wrong.

    \b
    Example:
      sadpipe cache verify runs/demo/cache.zarr
    """
    from .cache.store_report import verify_store
    report = verify_store(store)
    click.echo(str(report))
    sys.exit(0 if report.ok else 1)


@main.command("train-student")
@_config_options
@click.option("--cache", type=STORE, default=None,
              help="Teacher cache made by dump-teacher, a directory or a URL such as s3://bucket/prefix/cache.zarr "
                   "(not needed for --set distill.method=none).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Run directory.")
@click.option("--method", type=click.Choice(["none", "kd", "fdl", "adl", "sad", "data_distillation"]), default=None,
              help="Shortcut for --set distill.method=... (default: the config's, sad).")
@click.option("--max-steps", type=int, default=None, help="Stop after N optimizer steps (overrides train.max_steps).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last saved state.")
@_friendly_errors
def train_student_cmd(cfg, cache, out, method, max_steps, resume, device):
    """Distill the config's student from a teacher cache (SAD by default), then evaluate on val.

    The teacher is never loaded: soft targets stream from the cache, joined to images by id.
    Several GPUs or nodes: torchrun --nproc-per-node N -m sadpipe train-student ...

    \b
    Examples:
      sadpipe train-student --config pipelines/toy.toml --cache runs/cache.zarr --out runs/sad
      sadpipe train-student --config pipelines/toy.toml --cache runs/cache.zarr --out runs/kd --method kd
      torchrun --nproc-per-node 8 -m sadpipe train-student --config pipelines/coco_sad_r50.toml \\
          --cache /data/cache.zarr --out runs/r50_sad
    """
    from .config import apply_override
    from .evaluate import format_metrics_table
    from .settings import settings_from_dict
    from .tasks.distill import train_student
    if method:
        cfg = settings_from_dict(apply_override(cfg.resolved, f'distill.method="{method}"'))
    summary = train_student(cfg, cache, out, device=device, max_steps=max_steps, resume=resume)
    if "metrics" in summary:
        click.echo(format_metrics_table({f"student {summary['method']} ({summary['arch']})": summary["metrics"]}))
    click.echo(f"{summary['steps']} steps in {summary['train_seconds']:.0f} s, {summary['images_per_s']:.1f} images/s; "
               f"checkpoint {out / 'final.pt'}")


@cache_group.command("fidelity")
@click.argument("store", type=STORE)
@click.option("--teacher", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The teacher checkpoint the store was dumped from.")
@click.option("--images", type=int, default=16, show_default=True, help="How many stored images to recompute live.")
@click.option("--student", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also measure against this (partly trained) student checkpoint.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Pipeline TOML: its [student.model] builds the fresh student, [distill] sets beta/gamma "
                   "and the background weight (default: the teacher's architecture and the paper's settings).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a --config key.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the image sample and the fresh student.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_friendly_errors
def cache_fidelity_cmd(store, teacher, images, student, config_path, overrides, seed, device, as_json):
    """Recompute a sample of images with the teacher and compare the training signal of decoded vs exact logits.

    For ADL, plain KD and the weighted soft cross-entropy it prints the loss relative error, the
    gradient cosine and relative error and the normaliser error, for a fresh student and
    optionally a trained one, and the fraction of stored codes that differ from a fresh encoding.

    \b
    Example:
      sadpipe cache fidelity runs/demo/cache.zarr --teacher runs/demo/teacher/final.pt --images 32
    """
    from .cache.live_fidelity import format_fidelity, store_fidelity
    from .engine.device import select_device
    from .settings import load_settings
    cfg = load_settings(config_path, overrides) if config_path else None
    result = store_fidelity(store, teacher, cfg, images=images, student_path=student,
                            device=str(select_device(device)), seed=seed)
    click.echo(json.dumps(result, indent=2, default=str) if as_json else format_fidelity(result))


@main.command("import-checkpoint")
@click.argument("src", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("dst", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--from", "source", type=click.Choice(["torchvision", "mmdet", "detectron2"]), default="torchvision",
              show_default=True, help="Framework that wrote SRC (docs/teachers.md).")
@click.option("--arch", type=click.Choice(["retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2", "tiny", "resnet18",
                                          "resnet34", "resnet50", "resnet101"]), default=None,
              help="torchvision only (required there): the state dict's architecture.")
@click.option("--num-classes", type=int, default=None,
              help="torchvision only (required there): output channels of the head (91 for COCO).")
@click.option("--coco91-to-80", is_flag=True, help="torchvision only: keep the 80 used COCO categories of a 91-channel head.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="torchvision: anchor layout and preprocessing from this pipeline (default: torchvision's 800/1333, "
                   "32-512). mmdet/detectron2: only min_size, max_size, pad_divisor (default 800, 1333, 128); anchors "
                   "and normalisation are the framework's.")
@click.option("--categories", "categories_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="mmdet/detectron2: a COCO annotation file whose categories the model was trained on "
                   "(default: COCO's 80).")
@_friendly_errors
def import_checkpoint_cmd(src, dst, source, arch, num_classes, coco91_to_80, config_path, categories_path):
    """Turn a torchvision, MMDetection or detectron2 RetinaNet into a self-describing sadpipe checkpoint.

    The result works everywhere a checkpoint is taken (--teacher, evaluate, load_detector). For
    mmdet and detectron2 the command prints the [geometry] settings a pipeline needs to dump this
    teacher and train students from its cache.

    \b
    Examples:
      sadpipe import-checkpoint retinanet_resnet50_fpn_coco.pth r50_tv.pt --arch retinanet_resnet50_fpn \\
          --num-classes 91 --coco91-to-80 --config pipelines/coco_sad_r50.toml
      sadpipe import-checkpoint --from mmdet retinanet_r101_fpn_2x_coco.pth r101_mmdet.pt
      sadpipe import-checkpoint --from detectron2 model_final_971ab9.pkl r101_d2.pt --config pipelines/coco_sad_r50.toml
    """
    from .config import ConfigError
    from .models import load_detector, save_checkpoint
    from .settings import load_settings
    cfg = load_settings(config_path) if config_path else None
    if source == "torchvision":
        if arch is None or num_classes is None:
            raise ConfigError("--from torchvision needs --arch and --num-classes")
        if categories_path:
            raise ConfigError("--categories is for --from mmdet / detectron2; use --coco91-to-80 for torchvision")
        layout = preprocess = None
        if cfg:
            layout, preprocess = cfg.geometry.layout, cfg.geometry.preprocess
        model = load_detector(src, arch=arch, num_classes=num_classes, layout=layout, preprocess=preprocess,
                              coco91_to_80=coco91_to_80)
        save_checkpoint(dst, model, {"imported_from": str(src)})
        click.echo(f"wrote {dst}: {arch}, {model.num_classes} classes")
        return
    from .convert import categories_from_file, convert_with_provenance, geometry_settings
    if arch or num_classes or coco91_to_80:
        raise ConfigError(f"--arch, --num-classes and --coco91-to-80 are for torchvision; a checkpoint from {source} "
                          "brings its own")
    options = {}
    if cfg:
        options = {k: getattr(cfg.geometry.preprocess, k) for k in ("min_size", "max_size", "pad_divisor")}
    if categories_path:
        options["categories"] = categories_from_file(categories_path)
    model, provenance = convert_with_provenance(src, source, **options)
    save_checkpoint(dst, model, {"imported_from": str(src), "conversion": provenance})
    click.echo(f"wrote {dst}: {source} {model.spec['arch']} RetinaNet, {model.num_classes} classes "
               f"({provenance['classes']})")
    click.echo("a pipeline that dumps this teacher (and its students) needs in [geometry]:")
    click.echo(geometry_settings(model))


@main.command("demo")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/demo"),
              show_default=True, help="Every stage writes here; a rerun skips finished stages.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a toy.toml key.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--fresh", is_flag=True, help="Delete the work directory first.")
@_friendly_errors
def demo_cmd(workdir, overrides, device, fresh):
    """Run the whole toy pipeline on CPU: data, teacher, evaluation (and the later stages).

    \b
    Example:
      sadpipe demo --workdir runs/demo
    """
    from .demo import run_demo
    run_demo(workdir, overrides=overrides, device=device, fresh=fresh)


if __name__ == "__main__":  # pragma: no cover
    main()
