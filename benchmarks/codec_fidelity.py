"""Size / ADL-fidelity curve of the teacher-logit codecs (sadpipe.cache.codec).

Reproduce the table in docs/codec.md with:

    python benchmarks/codec_fidelity.py --inputs 'runs/codec_inputs/*.pt'

(the inputs are written by benchmarks/make_codec_inputs.py)

Each input is a ``torch.save`` dict with ``teacher_logits`` float32 [B, A, K] (exact teacher
logits of B images), ``students`` {name: float32 [B, A, K]} and optionally ``layout`` and
``note``. A file named ``confident_*.pt`` is a more confident teacher: the codecs fitted on the
first (main) input are evaluated on it unchanged, and refitted on it.

Protocol: the images of an input are split in two halves (even / odd index); fitted codecs are
fitted on the even half and every figure is measured on the odd half. Fidelity is the worst over
batches of ``--batch`` images, over the students, and over three ADL settings (paper beta=1
gamma=2, paper beta=0 gamma=2 i.e. FDL, released beta=1 gamma=2); see
sadpipe.cache.fidelity.adl_fidelity. Size is zstd at the codec's level of each image's uint8
code array plus 4 bytes crc32c, as the store writes it (codec_size_report).

Without ``--inputs`` (or ``--synthetic``) the script makes synthetic logits shaped like the weak
toy teachers of the prototype (3069 anchors x 6 classes at 128x128 px; docs/codec.md, section
"Earlier prototype measurements").
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import sys
import time
from pathlib import Path

import numcodecs
import numpy as np
import torch
import torch.nn.functional as F

from sadpipe.cache.codec import BinnedProbabilityCodec, UniformProbabilityCodec, default_codec
from sadpipe.cache.fidelity import adl_fidelity, codec_size_report

ADL_SETTINGS = (
    dict(beta=1.0, gamma=2.0, variant="paper"),
    dict(beta=0.0, gamma=2.0, variant="paper"),
    dict(beta=1.0, gamma=2.0, variant="released"),
)


# ---- synthetic inputs (fallback when the real toy-teacher logits are absent) ---------------

LEVEL_GRIDS, STRIDES, ANCHORS_PER_CELL = (16, 8, 4, 2, 1), (8, 16, 32, 64, 128), 9


def _smooth_field(grid: int, gen: torch.Generator, std: float) -> torch.Tensor:
    coarse = max(1, min(4, grid))
    base = torch.randn(1, 1, coarse, coarse, generator=gen) * std
    return F.interpolate(base, size=(grid, grid), mode="bilinear", align_corners=False)[0, 0]


def synthetic_teacher(num_images: int, *, seed: int, num_classes: int = 6, confident: bool = False) -> torch.Tensor:
    """float32 [B, 3069, K]: background near logit -4.9 with smooth spatial and per-anchor spread,
    a few clutter blobs, 1-6 objects whose anchors (matching position and size) rise to a peak."""
    gen = torch.Generator().manual_seed(seed)
    base = -7.0 if confident else -4.9
    images = []
    for _ in range(num_images):
        objects = []
        for _ in range(int(torch.randint(1, 7, (1,), generator=gen))):
            cls = int(torch.randint(0, num_classes, (1,), generator=gen))
            size = float(torch.empty(1).uniform_(12, 70, generator=gen))
            cx, cy = (float(v) for v in torch.empty(2).uniform_(10, 118, generator=gen))
            peak = float(torch.empty(1).uniform_(-1.5, 2.0, generator=gen)) + (3.0 if confident else 0.0)
            objects.append((cls, size, cx, cy, peak))
        clutter = [tuple(float(v) for v in torch.empty(3).uniform_(0, 1, generator=gen) * torch.tensor([128, 128, 30]) + torch.tensor([0, 0, 10]))
                   for _ in range(int(torch.randint(0, 4, (1,), generator=gen)))]
        anchor_offset = torch.randn(ANCHORS_PER_CELL, num_classes, generator=gen) * 0.25
        levels = []
        for li, (grid, stride) in enumerate(zip(LEVEL_GRIDS, STRIDES)):
            z = base + torch.stack([_smooth_field(grid, gen, 0.4 if confident else 0.5) for _ in range(num_classes)], -1)[:, :, None, :]
            z = z + anchor_offset + torch.randn(grid, grid, ANCHORS_PER_CELL, num_classes, generator=gen) * 0.3
            ys = torch.arange(grid).float() * stride
            yy, xx = torch.meshgrid(ys, ys, indexing="ij")
            for ux, uy, radius in clutter:
                bump = 2.0 * torch.exp(-((xx - ux) ** 2 + (yy - uy) ** 2) / radius**2)
                z = z + bump[..., None, None] * (0.5 + torch.rand(1, 1, ANCHORS_PER_CELL, num_classes, generator=gen))
            anchor_sizes = 32 * 2**li * torch.tensor([1, 2 ** (1 / 3), 2 ** (2 / 3)]).repeat(3)
            for cls, size, cx, cy, peak in objects:
                spatial = torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (0.35 * size) ** 2)
                size_match = torch.exp(-torch.log(anchor_sizes / size) ** 2 / 0.5)
                strength = spatial[..., None] * size_match
                rise = peak - base
                z[..., cls] += strength * rise * (0.7 + 0.3 * torch.rand(grid, grid, ANCHORS_PER_CELL, generator=gen))
                leak = torch.rand(num_classes, generator=gen) * 0.3
                leak[cls] = 0
                z = z + strength[..., None] * rise * leak
            levels.append(z.reshape(-1, num_classes))
        images.append(torch.cat(levels))
    return torch.stack(images)


def synthetic_students(teacher: torch.Tensor, *, seed: int) -> dict:
    """A freshly initialised student (prior logit + small noise) and a partly trained one."""
    gen = torch.Generator().manual_seed(seed)
    prior = -math.log(99.0)
    return {
        "fresh": prior + 0.15 * torch.randn(teacher.shape, generator=gen),
        "partly_trained": 0.6 * teacher + 0.4 * prior + 0.6 * torch.randn(teacher.shape, generator=gen),
    }


def synthetic_inputs() -> list[dict]:
    main = synthetic_teacher(32, seed=10)
    confident = synthetic_teacher(32, seed=11, confident=True)
    return [
        {"name": "synthetic_weak", "teacher_logits": main, "students": synthetic_students(main, seed=1), "note": "synthetic"},
        {"name": "confident_synthetic", "teacher_logits": confident, "students": synthetic_students(confident, seed=2), "note": "synthetic"},
    ]


def load_inputs(patterns: list[str]) -> list[dict]:
    paths = sorted({Path(p) for pattern in patterns for p in glob.glob(pattern)})
    if not paths:
        raise SystemExit(f"no input files match {patterns}; pass --synthetic to use synthetic logits")
    # main (weak) teachers first, then confident ones
    paths.sort(key=lambda p: (p.name.startswith("confident_"), p.name))
    inputs = []
    for path in paths:
        d = torch.load(path, map_location="cpu", weights_only=False)
        for key in ("teacher_logits", "students"):
            if key not in d:
                raise SystemExit(f"{path} has no {key!r}; expected a dict with teacher_logits and students")
        d = dict(d)
        d["name"] = path.stem
        inputs.append(d)
    return inputs


# ---- measurement ---------------------------------------------------------------------------


def worst_fidelity(codec, teacher: torch.Tensor, students: dict, batch: int) -> dict:
    """Worst relative errors and smallest gradient cosine over batches x students x ADL settings.

    ``loss_rel_error`` is the worst over the paper settings (beta 1 and 0); the released variant's
    loss, which adds ADW * T(q) (a term without gradient of its own), is reported separately as
    ``released_loss_rel_error``. Cosines are over all three settings.
    """
    decoded = torch.stack([codec.decode(codec.encode(image)) for image in teacher])
    worst = {"loss_rel_error": 0.0, "released_loss_rel_error": 0.0, "grad_cosine": 1.0, "normalizer_rel_error": 0.0}
    per_student = {}
    for name, student in students.items():
        cos_min = 1.0
        for start in range(0, teacher.shape[0], batch):
            sl = slice(start, start + batch)
            for setting in ADL_SETTINGS:
                f = adl_fidelity(student[sl], teacher[sl], decoded[sl], **setting)
                key = "loss_rel_error" if setting["variant"] == "paper" else "released_loss_rel_error"
                worst[key] = max(worst[key], f["loss_rel_error"])
                worst["normalizer_rel_error"] = max(worst["normalizer_rel_error"], f["normalizer_rel_error"])
                cos_min = min(cos_min, f["grad_cosine"])
        per_student[name] = cos_min
        worst["grad_cosine"] = min(worst["grad_cosine"], cos_min)
    worst["cos_by_student"] = per_student
    return worst


def candidate_codecs(fit_logits: torch.Tensor) -> list[tuple[str, object]]:
    """(label, codec) pairs of the size / fidelity curve; fitted ones are fitted on fit_logits."""
    out = [(f"uniform_probability levels={n}", UniformProbabilityCodec(levels=n)) for n in (256, 128, 64)]
    out.append(("binned floor=0.03 (defaults) unfitted", BinnedProbabilityCodec()))
    out.append(("binned floor=0.03 (defaults) fit, no context", BinnedProbabilityCodec().fit(fit_logits, floor_context=False)))
    # defaults: floor=0.03, log_ratio=0.3, log_until=0.08, step=0.004
    grid = [dict(floor=f) for f in (0.015, 0.02, 0.025, 0.03, 0.035, 0.04, 0.05)]
    grid += [dict(step=0.01), dict(step=0.005), dict(log_ratio=0.6), dict(log_until=0.12),
             dict(log_ratio=0.6, log_until=0.1, step=0.01), dict(floor=0.02, log_ratio=0.6, log_until=0.1, step=0.02)]
    for params in grid:
        label = "binned " + " ".join(f"{k}={v}" for k, v in params.items()) + " fit"
        out.append((label, BinnedProbabilityCodec(**params).fit(fit_logits)))
    out.append(("default_codec()", default_codec()))
    out.append(("default_codec() refit", _refit(default_codec(), fit_logits)))
    return out


def _refit(codec, fit_logits):
    return codec.fit(fit_logits) if hasattr(codec, "fit") else codec


def store_option_bits(codec, teacher: torch.Tensor) -> dict:
    """bits/value of store-side variants: zstd levels and a [K, A] (transposed) code layout."""
    codes = [np.ascontiguousarray(codec.encode(image).numpy()) for image in teacher]
    values = teacher.numel()
    out = {}
    for level in (3, 9, 19):
        zstd = numcodecs.Zstd(level=level)
        for layout, arrays in (("[A,K]", codes), ("[K,A]", [np.ascontiguousarray(c.T) for c in codes])):
            start = time.perf_counter()
            size = sum(len(zstd.encode(c.tobytes())) + 4 for c in arrays)
            ms = 1e3 * (time.perf_counter() - start) / len(arrays)
            out[f"zstd{level} {layout}"] = (8.0 * size / values, ms)
    return out


def row(label, size, fid) -> str:
    return (
        f"| {label} | {size['bits_per_value']:.3f} | {size['ratio_vs_float32']:.1f}x | {fid['loss_rel_error']:.2e} | "
        f"{fid['grad_cosine']:.5f} | {fid['normalizer_rel_error']:.2e} | {fid['released_loss_rel_error']:.2e} | "
        f"{size['encode_ms']:.2f} | {size['decode_ms']:.2f} |"
    )


HEADER = (
    "| scheme | bits/value | vs float32 | loss rel err (max) | grad cosine (min) | normaliser rel err (max) "
    "| released-loss rel err | encode ms/img | decode ms/img |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


def describe(name: str, teacher: torch.Tensor) -> str:
    q = torch.sigmoid(teacher.double())
    return (
        f"{name}: {teacher.shape[0]} images x {teacher.shape[1]} anchors x {teacher.shape[2]} classes; "
        f"q>0.01: {100 * (q > 0.01).double().mean():.1f} %, q>0.001: {100 * (q > 0.001).double().mean():.2f} %, "
        f"q>0.5 per image: {(q > 0.5).double().sum((1, 2)).mean():.1f}, "
        f"sum q^1.8 per image: {(q ** 1.8).sum((1, 2)).mean():.1f}"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", nargs="*", default=None, help="glob(s) of codec_inputs .pt files")
    parser.add_argument("--synthetic", action="store_true", help="use synthetic logits (no inputs needed)")
    parser.add_argument("--batch", type=int, default=8, help="images per fidelity batch (default 8)")
    parser.add_argument("--quick", action="store_true", help="only the baseline and default codecs")
    parser.add_argument("--json", type=Path, default=None, help="also write all results as JSON here")
    parser.add_argument("--sharpen", type=float, default=None, metavar="FACTOR",
                        help="also evaluate an artificially more confident copy of the first input: "
                             "logits scaled by FACTOR around logit(0.1) (when no confident_*.pt exists)")
    parser.add_argument("--fit-default", action="store_true",
                        help="print default_codec() refitted on all images of the first input (JSON) and exit")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    inputs = synthetic_inputs() if args.synthetic or not args.inputs else load_inputs(args.inputs)
    if args.sharpen is not None:
        first = inputs[0]
        # pivot between background and the weak positives: background moves down, positives up
        pivot = -math.log(9.0)
        inputs.append({"name": f"confident_sharpened_x{args.sharpen:g}_{first['name']}",
                       "teacher_logits": pivot + args.sharpen * (first["teacher_logits"].float() - pivot),
                       "students": first["students"],
                       "note": f"{first['name']} logits scaled by {args.sharpen:g} around logit(0.1) (same students)"})
    if args.fit_default:
        print(json.dumps(_refit(default_codec(), inputs[0]["teacher_logits"].float()).to_dict()))
        return 0
    results = []
    main_fit = None
    main_codecs = None
    for data in inputs:
        teacher = data["teacher_logits"].float()
        students = {k: v.float() for k, v in data["students"].items()}
        fit_idx, eval_idx = slice(0, None, 2), slice(1, None, 2)
        fit_logits, eval_teacher = teacher[fit_idx], teacher[eval_idx]
        eval_students = {k: v[eval_idx] for k, v in students.items()}
        print(f"\n## {describe(data['name'], teacher)}")
        if data.get("note"):
            print(f"note: {data['note']}")
        print(f"fit on {fit_logits.shape[0]} images, evaluated on {eval_teacher.shape[0]}; students: {list(students)}\n")
        print(HEADER)
        if main_fit is None:
            main_fit = fit_logits
            codecs = candidate_codecs(fit_logits)
            if args.quick:
                codecs = [c for c in codecs if c[0].startswith(("uniform_probability levels=256", "default"))]
            main_codecs = codecs
        else:
            # the same schemes refitted on this teacher (what a dump of it would store), and the
            # codecs exactly as fitted on the main teacher (what happens if one forgets to refit)
            codecs = [(label + " refit here", _refit(c, fit_logits)) for label, c in main_codecs if label.endswith(" fit")]
            codecs += [("default_codec() refit here", _refit(default_codec(), fit_logits))]
            codecs += [(label + " as fitted on main", c) for label, c in main_codecs
                       if label == "binned floor=0.03 fit"]
            codecs += [("default_codec() as shipped", default_codec())]
        for label, codec in codecs:
            size = codec_size_report(codec, eval_teacher)
            fid = worst_fidelity(codec, eval_teacher, eval_students, args.batch)
            print(row(label, size, fid), flush=True)
            results.append({"input": data["name"], "scheme": label, "codec": codec.to_dict(), **size,
                            **{k: v for k, v in fid.items()}})
        print("\nstore-side options for default_codec() (bits/value, zstd ms per image):")
        for key, (bits, ms) in store_option_bits(default_codec(), eval_teacher).items():
            print(f"  {key}: {bits:.3f} bits/value, {ms:.2f} ms")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
