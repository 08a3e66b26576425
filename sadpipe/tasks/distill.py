"""`sadpipe train-student`: distill a student from the teacher cache (ADL, SAD and baselines).

Read top to bottom: set-up and the cache check, the two data streams, the loss of one batch,
the loop. The teacher is never built here (unless ``distill.online_teacher`` asks for the
online-distillation benchmark): soft targets come from ``TeacherCache`` records joined to the
images by image id inside the DataLoader workers.

Methods (``distill.method``):
  none               focal + box loss on labeled images only (the student alone)
  kd                 + plain binary KD  KL(q_T || p_T) T^2
  fdl                + focal-style distillation (ADL with beta = 0)
  adl                + ADL on labeled images
  sad                + ADL on labeled and unlabeled images (the paper's SAD)
  data_distillation  hard pseudo-labels (teacher detections above a score) on unlabeled images
  weighted_ce        Chen et al. 2017: mu * focal + (1 - mu) * class-weighted soft cross-entropy

``distill.bounded_regression_weight`` > 0 adds Chen et al.'s teacher-bounded regression loss
(any method; the cache must hold the teacher's box regression: dump with --with-box-regression).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from .. import losses
from ..cache.reader import TeacherCache
from ..cache.targets import decode as decode_targets
from ..data.dataset import DetectionDataset, collate, labeled_source, seed_worker, unlabeled_source
from ..engine.device import autocast, model_to, move_to, seed_everything, select_device
from ..engine.distributed import init_distributed
from ..engine.loop import BatchLoss, Hooks, RunSpec, fit
from ..engine.streams import ConcatWithEpoch, Stream, total_steps
from ..errors import TrainingError
from ..geometry import image_to_batch_index
from ..labeling import IGNORED, detection_loss, foreground_box_targets
from ..models import load_detector
from ..settings import DataConfig, DistillConfig, PipelineConfig, TrainConfig
from ..shard_sampler import use_shard_order
from .supervised import build_model_for, hard_targets, val_evaluator

SOFT_LOSS = {"kd", "fdl", "adl", "sad", "weighted_ce"}
USES_UNLABELED = {"sad", "data_distillation"}


class WithTeacher(Dataset):
    """A DetectionDataset whose samples also carry the cached teacher targets of the same view.

    Adds ``teacher``: :class:`~sadpipe.cache.targets.CompactTargets` (the stored entries above the
    background bin; decoded on the training device in :func:`batch_loss`), or None when the cache
    has no record for the sample (an image the dump lacks or failed, or a flipped image and no
    hflip view: distillation is then off for that sample). With ``pseudo_thresh``, unlabeled
    samples get the teacher's stored detections above it as their boxes and labels.
    """

    def __init__(self, base: DetectionDataset, cache: TeacherCache | None, pseudo_thresh: float | None,
                 cached_ids: set[int] | None = None, box_regression: bool = False):
        self.base, self.cache, self.pseudo_thresh = base, cache, pseudo_thresh
        self.box_regression = box_regression
        self.cached_ids = cached_ids if cached_ids is not None else (
            set(cache.ok_image_ids()) if cache is not None else set())

    def __len__(self) -> int:
        return len(self.base)

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def __getitem__(self, index: int) -> dict:
        sample = self.base[index]
        sample["teacher"] = None
        sample["teacher_box"] = None
        image_id, view = sample["image_id"], sample["view"]
        if self.cache is None or view not in self.cache.views or image_id not in self.cached_ids:
            return sample
        facts = self.cache.image_facts(image_id)
        if facts["padded_size"] != tuple(sample["padded_size"]):
            raise TrainingError(f"image {image_id} ({sample['path']}): cached padded size {facts['padded_size']} "
                                f"differs from this run's {sample['padded_size']}; the image file changed since the dump")
        sample["teacher"] = self.cache.get_compact(image_id, view)
        if self.box_regression:  # float16 [A_img, 4], the teacher's deltas in the image's anchor order
            sample["teacher_box"] = self.cache.get_box_regression(image_id, view)
        if self.pseudo_thresh is not None and not sample["labeled"]:
            boxes, scores, labels = self.cache.get_detections(image_id, view)
            keep = scores >= self.pseudo_thresh
            sample["boxes"], sample["labels"] = boxes[keep], labels[keep]
            sample["iscrowd"] = torch.zeros(int(keep.sum()), dtype=torch.bool)
        return sample


def join_cache(data: DataConfig, records, cache: TeacherCache | None, stream: str, *, keep_missing: bool,
               log=print) -> list[int]:
    """The image ids a stream trains on, after joining the config's images to the cache by id.

    Every image the cache holds must be the same file: its stored path (relative to the data
    root at dump time) must equal this run's, else TrainingError with both paths. Images the cache
    lacks, or whose dump failed, stay in the stream with ``keep_missing`` (labeled images: they
    still train on their ground truth, without distillation) and are dropped otherwise
    (unlabeled images have nothing else to learn from). Prints the counts.
    """
    ids = [r.image_id for r in records]
    if cache is None:
        return ids
    ok = set(cache.ok_image_ids())
    failed = set(cache.failed_images)
    mismatched = []
    for r in records:
        if r.image_id in cache:
            stored, ours = cache.image_facts(r.image_id)["path"], data.key_of(r.path)
            if stored != ours:
                mismatched.append(f"image id {r.image_id}: cache {stored!r} vs this run {ours!r}")
    if mismatched:
        raise TrainingError(
            f"teacher cache {cache.path} was dumped from other files than the {stream} images of this config "
            f"({len(mismatched)} of {len(ids)} ids disagree), e.g.\n  " + "\n  ".join(mismatched[:5])
            + "\nPoint --cache to the cache dumped from these images, or re-dump the teacher for them.")
    in_cache = [i for i in ids if i in ok]
    n_failed = sum(i in failed for i in ids)
    n_missing = len(ids) - len(in_cache) - n_failed
    other_split = sum(cache.split_of(i) != ("labeled" if stream == "labeled" else "unlabeled") for i in in_cache)
    kept = ids if keep_missing else in_cache
    fate = "train without distillation" if keep_missing else "are left out"
    log(f"{stream} stream: {len(ids)} images in the config, {len(in_cache)} with teacher targets, {n_failed} failed "
        f"in the dump and {n_missing} missing from the cache ({n_failed + n_missing} {fate})"
        + (f"; {other_split} stored under the other split (same files, used as they are)" if other_split else ""))
    if not in_cache:
        raise TrainingError(f"none of the {len(ids)} {stream} images of the config is in the teacher cache "
                            f"{cache.path}; was it dumped from another dataset?")
    return kept


def batch_loss(student, batch, anchors, dcfg: DistillConfig, tcfg: TrainConfig, device, teacher=None,
               code_table=None) -> BatchLoss:
    """Total loss of one batch, its terms (floats) for the log and the hard targets it used.

    GT (or pseudo-GT) focal + box losses on the samples that have targets, plus
    ``loss_weight * sum(distillation) / normaliser`` over every sample with teacher targets,
    gathered at the sample's own anchors inside the batch canvas. Cached targets arrive compact
    (``batch["teacher"]``) and are decoded here on ``device`` with ``code_table`` (float32 [256],
    the cache's ``code_table`` on the device); ``teacher`` instead runs a live teacher.
    ``dcfg``: the [distill] settings; ``tcfg``: the student's [train] settings (focal and box loss).
    """
    method = dcfg.method
    canvas = batch["canvas"]
    cls_logits, bbox = student(move_to(batch["images"], device))
    cls_logits, bbox = cls_logits.float(), bbox.float()
    terms: dict = {}
    total = cls_logits.new_zeros(())

    # -- hard targets: GT on labeled samples, pseudo-GT on unlabeled ones when they carry boxes
    has_targets = [bool(lab) or uses_pseudo_labels(dcfg) for lab in batch["labeled"]]
    sel = [i for i, h in enumerate(has_targets) if h]
    matched = targets = None
    if sel:
        targets = hard_targets(batch, sel, device)
        det = detection_loss(cls_logits[sel], bbox[sel], anchors(canvas), targets, focal_alpha=tcfg.focal_alpha,
                             focal_gamma=tcfg.focal_gamma, box_loss=tcfg.box_loss)
        cls_weight = dcfg.hard_weight if method == "weighted_ce" else 1.0  # Chen et al.'s mu
        hard = cls_weight * det["classification"] + tcfg.box_loss_weight * det["box_regression"]
        total = total + hard * len(sel) / len(has_targets)  # an unlabeled sample without targets adds no hard loss
        terms.update(cls=det["classification"].item(), box=det["box_regression"].item())
        matched = dict(zip(sel, det["matched_idxs"]))

    t_canvas = t_box_canvas = None
    if teacher is not None and (method in SOFT_LOSS or dcfg.bounded_regression_weight > 0):
        # online distillation (benchmark): the teacher sees the same canvas
        with torch.no_grad(), autocast(device, True):
            t_canvas, t_box_canvas = (t.float() for t in teacher(move_to(batch["images"], device)))
    if dcfg.bounded_regression_weight > 0 and matched:
        bounded = bounded_regression(bbox, batch, anchors(canvas), matched, t_box_canvas, student_layout(student),
                                     dcfg.bounded_regression_margin, device)
        if bounded is not None:
            total = total + dcfg.bounded_regression_weight * bounded
            terms["bounded"] = bounded.item()

    # -- soft targets from the teacher
    if method in SOFT_LOSS:
        s_parts, t_parts, m_parts = [], [], []
        for i in range(len(batch["image_id"])):
            if teacher is None and batch["teacher"][i] is None:
                continue  # e.g. a flipped image and a cache without the hflip view
            idx = image_to_batch_index(student_layout(student), batch["padded_size"][i], canvas).to(device)
            s_parts.append(cls_logits[i, idx])
            if teacher is not None:
                t_parts.append(t_canvas[i, idx])
            else:  # decoded on the training device from the compact record: [A_img, K] in the image's anchor order
                t_parts.append(decode_targets(batch["teacher"][i].to(device, non_blocking=device.type == "cuda"),
                                             code_table))
            # anchors the GT matcher ignores (IoU in [0.4, 0.5)) are excluded on labeled images
            # (docs/method.md, section "Ignored anchors")
            keep = (matched[i][idx] != IGNORED) if (matched is not None and i in matched and batch["labeled"][i]) \
                else torch.ones(idx.numel(), dtype=torch.bool, device=device)
            m_parts.append(keep)
        if s_parts:
            s, t, m = torch.cat(s_parts), torch.cat(t_parts), torch.cat(m_parts)[:, None]
            if method == "kd":
                per_entry = losses.binary_kd_loss(s, t, temperature=dcfg.temperature)
            elif method == "weighted_ce":
                per_entry = losses.weighted_soft_cross_entropy(s, t, background_weight=dcfg.background_weight)
            else:
                beta = 0.0 if method == "fdl" else dcfg.beta
                per_entry = losses.adaptive_distillation_loss(s, t, beta=beta, gamma=dcfg.gamma, variant=dcfg.variant)
            if dcfg.normalizer == "adaptive":
                norm = losses.adaptive_normalizer(t, power=dcfg.normalizer_power, mask=m)
            else:
                fg = sum(int((matched[i] >= 0).sum()) for i in matched) if matched else 0
                norm = losses.foreground_normalizer(fg)
            soft = (per_entry * m).sum() / norm
            # weighted_ce mixes hard and soft classification as Chen et al. do: (1 - mu) on the soft part
            soft_weight = (1.0 - dcfg.hard_weight) if method == "weighted_ce" else dcfg.loss_weight
            total = total + soft_weight * soft
            terms.update(distill=soft.item(), normalizer=float(norm))
    terms["loss"] = total.item()
    return BatchLoss(total, terms, targets)


def uses_pseudo_labels(dcfg: DistillConfig) -> bool:
    """Unlabeled samples carry the teacher's stored detections as boxes (data distillation, or pseudo_labels)."""
    return dcfg.method == "data_distillation" or dcfg.pseudo_labels


def bounded_regression(bbox, batch, anchors, matched: dict, t_box_canvas, layout, margin: float, device):
    """Chen et al.'s teacher-bounded regression term of a batch: the sum over the foreground
    anchors of the samples with targets (``matched``: sample index -> int64 [A_canvas]) of
    :func:`losses.teacher_bounded_regression_loss`, divided by their number. The teacher's deltas
    come from the live teacher (``t_box_canvas`` [B, A_canvas, 4]) or from the cache records
    (``batch["teacher_box"]``, the image's anchor order); anchors without a teacher value are
    left out. Returns None when no foreground anchor has one."""
    s_parts, t_parts, y_parts = [], [], []
    for i, m in matched.items():
        if t_box_canvas is not None:
            t_box = t_box_canvas[i]
        elif batch["teacher_box"][i] is not None:
            idx = image_to_batch_index(layout, batch["padded_size"][i], batch["canvas"]).to(device)
            t_box = torch.full((m.numel(), 4), float("nan"), device=device)
            t_box[idx] = batch["teacher_box"][i].to(device).float()
        else:
            continue
        fg, y = foreground_box_targets(anchors, batch["boxes"][i].to(device), m)
        t_fg = t_box[fg]
        known = torch.isfinite(t_fg).all(dim=1)
        s_parts.append(bbox[i, fg[known]])
        t_parts.append(t_fg[known])
        y_parts.append(y[known])
    n = sum(len(p) for p in s_parts)
    if n == 0:
        return None
    per_box = losses.teacher_bounded_regression_loss(torch.cat(s_parts), torch.cat(t_parts), torch.cat(y_parts),
                                                     margin=margin)
    return per_box.sum() / n


def student_layout(student):
    return (student.module if hasattr(student, "module") else student).layout


def open_cache(cache, student) -> TeacherCache:
    """``cache`` (a path, a URL or an open TeacherCache) opened and checked against the student's
    anchors, classes and preprocessing (CacheMismatchError otherwise)."""
    cache = cache if isinstance(cache, TeacherCache) else TeacherCache(cache)
    cache.check_compatible(layout=student.layout.to_dict(), category_ids=student.spec["category_ids"],
                           class_names=student.spec["class_names"], preprocessing=student.preprocess.to_dict())
    return cache


def train_student(cfg: PipelineConfig, cache: str | Path | TeacherCache | None, out_dir: str | Path, *,
                  device: str = "auto", max_steps: int | None = None, resume: bool = False, evaluate: bool = True,
                  hooks: Hooks | None = None) -> dict:
    """Train ``cfg.student`` with ``cfg.distill``; returns a summary dict (metrics included).

    ``cache``: the teacher cache (a path or URL, or an open ``TeacherCache``), None for
    ``distill.method = "none"``. ``hooks``: callbacks into the loop (``sadpipe.engine.loop.Hooks``).
    """
    out_dir = Path(out_dir)
    dcfg, tcfg = cfg.distill, cfg.student.train
    method = dcfg.method
    dev = select_device(device)
    info = init_distributed(dev)
    seed_everything(tcfg.seed)
    log = print if info.is_main else (lambda *_: None)

    # -- the student, and the cache it must fit
    train_src = labeled_source(cfg.data, "train")
    student = model_to(build_model_for(cfg, "student", train_src.categories), dev, cfg.student.train.channels_last)
    bounded = dcfg.bounded_regression_weight > 0
    needs_cache = method != "none" or bounded
    online = bool(dcfg.online_teacher) and (method in SOFT_LOSS or bounded)
    if needs_cache and not online:
        if cache is None:
            raise TrainingError(f"distill.method={method}" + (" with distill.bounded_regression_weight > 0" if bounded else "")
                                + " needs a teacher cache: pass --cache STORE (made by sadpipe dump-teacher), "
                                "or --set distill.method=none")
        cache = open_cache(cache, student)
        if bounded and not cache.metadata["with_box_regression"]:
            raise TrainingError(f"distill.bounded_regression_weight > 0 needs the teacher's box regression, which "
                                f"the cache {cache.path} does not keep: re-dump with `sadpipe dump-teacher "
                                "--with-box-regression`, or set distill.bounded_regression_weight=0")
        floor = getattr(cache.codec, "floor", 0.0)
        if method == "kd" and floor >= 0.01:
            # plain KD weighs every background entry, and the codec stores those as one value per image;
            # with an under-confident teacher that shifted KD's result (docs/codec.md, docs/results.md)
            log(f"note: plain KD through a cache whose codec rounds every q below {floor} to one value per image; "
                "with a weak teacher (background q near the floor) dump with --set 'dump.codec={name=\"binned_probability\", "
                "floor=0.003}' to store the background finer (about 5x the bits)")
    else:
        cache = None
    teacher = model_to(load_detector(dcfg.online_teacher), dev, cfg.student.train.channels_last).eval() if online else None

    # -- data: a labeled stream and (SAD, data distillation) a mixed labeled + unlabeled stream
    flip = tcfg.hflip
    if cache is not None and flip and "hflip" not in cache.views:
        print("note: the cache has no hflip view; flipped images train without distillation")
    pseudo = dcfg.pseudo_score_thresh if uses_pseudo_labels(dcfg) else None
    labeled_ids = join_cache(cfg.data, train_src.images, cache, "labeled", keep_missing=True, log=log)

    def labeled_dataset() -> WithTeacher:
        # one instance per stream: a stream's set_epoch (flip decisions) must not reach the other stream
        return WithTeacher(DetectionDataset(train_src, student.preprocess, image_ids=labeled_ids, hflip=flip,
                                            seed=tcfg.seed), cache, pseudo, box_regression=bounded)

    loader_kw = dict(collate_fn=collate, num_workers=tcfg.num_workers, worker_init_fn=seed_worker,
                     pin_memory=dev.type == "cuda")
    streams = [Stream(labeled_dataset(), batch_size=tcfg.batch_size, seed=tcfg.seed, info=info, loader_kw=loader_kw)]
    if method in USES_UNLABELED and dcfg.unlabeled_mix == "alternate":
        unl_src = unlabeled_source(cfg.data)
        if unl_src is None:
            raise TrainingError(f"distill.method={method} needs unlabeled images: set data.unlabeled_images")
        unl_ids = join_cache(cfg.data, unl_src.images, cache, "unlabeled", keep_missing=False, log=log)
        # unlabeled images are flipped only when the cache has their flipped view (they have nothing else to learn)
        unl_flip = flip and (cache is None or "hflip" in cache.views)
        unlabeled = WithTeacher(DetectionDataset(unl_src, student.preprocess, image_ids=unl_ids, hflip=unl_flip,
                                                 seed=tcfg.seed), cache, pseudo, box_regression=bounded)
        streams.append(Stream(ConcatWithEpoch([labeled_dataset(), unlabeled]), batch_size=tcfg.batch_size,
                              seed=tcfg.seed + 1, info=info, loader_kw=loader_kw))
    if dcfg.shard_window and cache is not None:  # shard-local order, whole cache shards read ahead
        for stream in streams:
            use_shard_order(stream, cache, window=dcfg.shard_window, info=info)

    code_table = cache.code_table.to(dev) if cache is not None else None

    def loss_fn(net, batch, anchors):
        return batch_loss(net, batch, anchors, dcfg, tcfg, dev, teacher, code_table)

    run = RunSpec(out_dir=out_dir, resolved=cfg.resolved, train=tcfg, streams=streams, loss_fn=loss_fn,
                  evaluate=val_evaluator(cfg, dev, tcfg.batch_size) if evaluate else None,
                  total_steps=total_steps(streams, tcfg.epochs, tcfg.max_steps, max_steps), tag=f"student/{method}",
                  extra={"role": "student", "method": method})
    return fit(student, run, dev, info, resume=resume, hooks=hooks)
