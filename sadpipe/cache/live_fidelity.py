"""`sadpipe cache fidelity`: a finished store against its teacher run live.

A sample of ok images (seeded, from both splits) is recomputed with the teacher, each image
padded alone as the dump does. For every stored view it reports

- how many stored codes differ from ``codec.encode`` of the live logits (nonzero only from
  float differences between the dump's batches and the image alone, or from a damaged or
  mismatched store: zarr recomputes checksums on write, so ``verify`` cannot see codes
  rewritten through zarr, this can);
- the max / mean absolute error in q = sigmoid(logit) of the decoded store logits;
- the fidelity of the training signal (``sadpipe.cache.fidelity.distill_fidelity``) for each soft
  loss a store feeds (ADL, plain KD, Chen et al.'s weighted soft cross-entropy): decoded logits
  against the exact ones, for a freshly initialised student and optionally a trained student
  checkpoint, over the whole sample as one batch, plus the worst single image. A trained student
  matters: its background p sits near the teacher's q, where the codec's background bin (one
  value per image below its floor) moves plain KD's gradient most;
- bits per value of the stored codes (``store_info``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sadpipe.cache.fidelity import distill_fidelity, distillation_losses
from sadpipe.cache.format import StoreMismatchError
from sadpipe.cache.store_report import store_info
from sadpipe.cache.reader import TeacherCache

FRESH_STUDENT = "fresh student"


def sample_image_ids(cache: TeacherCache, images: int, seed: int) -> list[int]:
    """Up to ``images`` ok ids: half from each split (the other split fills a short one)."""
    rng = np.random.default_rng(seed)
    pools = {s: cache.ok_image_ids(s) for s in ("labeled", "unlabeled")}
    if not any(pools.values()):
        raise StoreMismatchError(f"teacher cache {cache.path} has no ok image to compare")
    want = {"labeled": images // 2 + images % 2, "unlabeled": images // 2}
    for a, b in (("labeled", "unlabeled"), ("unlabeled", "labeled")):
        spare = max(0, want[a] - len(pools[a]))
        want[a] -= spare
        want[b] += spare
    chosen = []
    for split, pool in pools.items():
        n = min(want[split], len(pool))
        chosen += [pool[i] for i in sorted(rng.choice(len(pool), size=n, replace=False).tolist())]
    return chosen


def fresh_student_spec(teacher_spec: dict, cfg) -> dict:
    """The teacher's spec (store's anchors, preprocessing, classes) with the student's architecture
    (``cfg.student.model``; the teacher's own when ``cfg`` is None)."""
    from sadpipe.geometry import AnchorLayout
    from sadpipe.models import model_spec
    from sadpipe.transforms import Preprocess

    if cfg is None:
        return dict(teacher_spec)
    return model_spec(cfg.student.model, teacher_spec["num_classes"], AnchorLayout.from_dict(teacher_spec["layout"]),
                      Preprocess.from_dict(teacher_spec["preprocess"]), category_ids=teacher_spec["category_ids"],
                      class_names=teacher_spec["class_names"])


def store_fidelity(store_path, teacher_path, cfg=None, *, images: int = 16,
                   student_path=None, device: str = "cpu", seed: int = 0) -> dict:
    """Compare a store with its teacher recomputed live on ``images`` sampled ok images.

    Args:
        store_path: a finished teacher cache. teacher_path: the checkpoint it was dumped from
            (its sha256 must be the one in the store).
        cfg: a ``settings.PipelineConfig`` or None; gives the fresh student's architecture
            (``student.model``) and the loss settings (``distill.beta/gamma/variant/normalizer_power/
            background_weight``); None: the paper's.
        images: sample size; seed: sample and fresh-student seed.
        student_path: optional trained student checkpoint (must match the store's anchors/classes).

    Returns:
        dict: ``store``, ``teacher``, ``image_ids``, ``adl`` and ``background_weight`` (settings used) and per view
        ``views[v]`` = {``entries``, ``code_mismatch_fraction``, ``max_abs_q_error``,
        ``mean_abs_q_error``, ``bits_per_value``, ``students``: {student name: {loss name
        (``adl``, ``kd``, ``weighted_ce``): distill_fidelity dict + ``worst_image_grad_cosine``,
        ``worst_image_id``}}}.
    """
    from sadpipe.data.images import read_image
    from sadpipe.engine.device import select_device
    from sadpipe.inference import logits_alone
    from sadpipe.models import build_detector, file_sha256, load_detector
    from sadpipe.transforms import Preprocess

    dev = select_device(device)
    cache = TeacherCache(store_path)
    meta = cache.metadata
    teacher_path = Path(teacher_path)
    sha = file_sha256(teacher_path)
    if sha != meta["teacher"].get("checkpoint_sha256"):
        raise StoreMismatchError(
            f"teacher {teacher_path} (sha256 {sha[:12]}...) is not the teacher of {cache.path} "
            f"({meta['teacher'].get('checkpoint')}, sha256 {str(meta['teacher'].get('checkpoint_sha256'))[:12]}...); "
            "pass the checkpoint the store was dumped from")
    teacher = load_detector(teacher_path).to(dev).eval()
    preprocess = Preprocess.from_dict(meta["preprocessing"])
    torch.manual_seed(seed)
    students = {FRESH_STUDENT: build_detector(fresh_student_spec(teacher.spec, cfg)).to(dev).eval()}
    if student_path is not None:
        student = load_detector(student_path).to(dev).eval()
        cache.check_compatible(layout=student.layout.to_dict(), category_ids=student.spec["category_ids"],
                               preprocessing=student.preprocess.to_dict())
        students[Path(student_path).name] = student
    if cfg is None:  # the paper's settings (Chen et al.'s w0 = 1.5)
        adl = {"beta": 1.0, "gamma": 2.0, "variant": "paper", "power": 1.8}
        background_weight = 1.5
    else:
        d = cfg.distill
        adl = {"beta": d.beta, "gamma": d.gamma, "variant": d.variant, "power": d.normalizer_power}
        background_weight = d.background_weight
    loss_fns = distillation_losses(beta=adl["beta"], gamma=adl["gamma"], variant=adl["variant"],
                                   background_weight=background_weight)

    # images are found under this run's data root when a config is given, else under the dump's
    data_root = (cfg.data.root if cfg is not None else "") or None
    ids = sample_image_ids(cache, images, seed)
    info = store_info(cache.path)
    out = {"store": str(cache.path), "teacher": str(teacher_path), "image_ids": ids, "adl": adl,
           "background_weight": background_weight, "views": {}}
    for view in cache.views:
        exact, decoded, student_logits = [], [], {name: [] for name in students}
        mismatched = entries = 0
        for image_id in ids:
            image = read_image(cache.image_file(image_id, data_root))
            if view == "hflip":
                image = image[:, ::-1].copy()
            live = logits_alone(teacher, preprocess, image, dev)
            codes = cache.get_codes(image_id, view)
            if codes.shape != tuple(live.shape):
                raise StoreMismatchError(f"{cache.path}: image {image_id} has {codes.shape[0]} stored anchors but the "
                                         f"teacher gives {live.shape[0]}; the store's preprocessing is not the teacher's")
            mismatched += int((cache.codec.encode(live).numpy() != codes).sum())
            entries += codes.size
            exact.append(live)
            decoded.append(cache.codec.decode(codes).float())
            for name, model in students.items():
                student_logits[name].append(logits_alone(model, preprocess, image, dev))
        q_err = (torch.sigmoid(torch.cat(decoded).double()) - torch.sigmoid(torch.cat(exact).double())).abs()
        per_student = {}
        for name, logits in student_logits.items():
            per_student[name] = {}
            for loss_name, loss_fn in loss_fns.items():
                f = distill_fidelity(torch.cat(logits), torch.cat(exact), torch.cat(decoded), loss_fn, power=adl["power"])
                worst = min(((distill_fidelity(s, e, q, loss_fn, power=adl["power"])["grad_cosine"], i)
                             for s, e, q, i in zip(logits, exact, decoded, ids)), key=lambda t: t[0])
                per_student[name][loss_name] = {**f, "worst_image_grad_cosine": worst[0], "worst_image_id": worst[1]}
        out["views"][view] = {
            "entries": entries, "code_mismatch_fraction": mismatched / max(1, entries),
            "max_abs_q_error": float(q_err.max()), "mean_abs_q_error": float(q_err.mean()),
            "bits_per_value": info["views"][view]["bits_per_value"], "students": per_student,
        }
    return out


def format_fidelity(d: dict) -> str:
    """Human-readable table of a store_fidelity() dict."""
    n = len(d["image_ids"])
    adl = d["adl"]
    lines = [f"teacher cache {d['store']} vs teacher {d['teacher']} recomputed live on {n} images",
             f"ADL beta={adl['beta']} gamma={adl['gamma']} variant={adl['variant']} normaliser power={adl['power']}; "
             f"KD at temperature 1; weighted soft CE with background weight {d['background_weight']}",
             "",
             "| view | bits/value | codes differing | max abs q error | mean abs q error | student | loss "
             "| loss rel err | grad cosine | grad rel err | worst image cosine | normaliser rel err |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for view, v in d["views"].items():
        bits = "n/a" if v["bits_per_value"] is None else f"{v['bits_per_value']:.3f}"
        for name, per_loss in v["students"].items():
            for loss_name, s in per_loss.items():
                lines.append(
                    f"| {view} | {bits} | {100 * v['code_mismatch_fraction']:.4f} % | {v['max_abs_q_error']:.4f} "
                    f"| {v['mean_abs_q_error']:.2e} | {name} | {loss_name} | {s['loss_rel_error']:.2e} "
                    f"| {s['grad_cosine']:.6f} | {s['grad_rel_error']:.2e} "
                    f"| {s['worst_image_grad_cosine']:.6f} (id {s['worst_image_id']}) | {s['normalizer_rel_error']:.2e} |")
    return "\n".join(lines)
