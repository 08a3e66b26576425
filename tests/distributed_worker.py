"""One rank of the 2-process tests in test_distributed.py (started with RANK/WORLD_SIZE/MASTER_* set).

    python distributed_worker.py fit SCENARIO TOY_ROOT OUT_DIR
        Trains a tiny SAD student for 2 steps with the real ``sadpipe.engine.loop.fit`` (DDP over gloo) on
        fixed hand-made batches that differ per rank (SCENARIOS below). At every optimiser step it
        records the parameters' gradients as DDP left them, and, independently, the gradients this
        rank's batch gives the same weights without DDP (a copy of the model, the plain loss).
        Writes OUT_DIR/rank{r}.pt.

    python distributed_worker.py agree KIND
        A ``fail_together`` block in which one rank raises (KIND: user0, user1 = an ImageReadError
        on rank 0 / 1, bug1 = a KeyError on rank 1, none = nobody); prints what the rank caught.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

torch.set_num_threads(1)

# per rank: the samples of its batch, "L" labeled (GT boxes) or "U" unlabeled (teacher logits only),
# with their padded size; the canvas is the largest
SCENARIOS = {
    "one_rank_unlabeled": [[("L", (128, 128)), ("L", (128, 128))], [("U", (128, 128)), ("U", (128, 128))]],
    "no_rank_targets": [[("U", (128, 128)), ("U", (128, 128))], [("U", (128, 128)), ("U", (128, 128))]],
    # different batch sizes and canvases per rank; rank 1 without box targets
    "uneven": [[("L", (128, 128)), ("U", (128, 256))], [("U", (128, 128))]],
}
STEPS = 2  # the second forward is where DDP reports the first step's missing gradients


def hand_batch(spec: list, layout, num_classes: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    canvas = (max(p[0] for _, p in spec), max(p[1] for _, p in spec))
    boxes, labels = [], []
    for kind, _ in spec:
        if kind == "L":
            boxes.append(torch.tensor([[10.0, 20.0, 60.0, 90.0], [70.0, 5.0, 120.0, 50.0]]))
            labels.append(torch.tensor([1, 4]))
        else:
            boxes.append(torch.zeros(0, 4))
            labels.append(torch.zeros(0, dtype=torch.int64))
    return {"image_id": list(range(len(spec))), "images": torch.randn(len(spec), 3, *canvas, generator=g),
            "canvas": canvas, "padded_size": [p for _, p in spec], "labeled": [k == "L" for k, _ in spec],
            "view": ["orig"] * len(spec), "boxes": boxes, "labels": labels,
            "iscrowd": [torch.zeros(len(b), dtype=torch.bool) for b in boxes],
            "teacher": [compact_targets(torch.randn(layout.num_anchors(p), num_classes, generator=g) * 2.5 - 3.0)
                        for _, p in spec]}


def compact_targets(logits: torch.Tensor):
    """The record a dump would store for these logits (default codec), as the loader hands it over."""
    from sadpipe.cache.codec import default_codec
    from sadpipe.cache.targets import targets_from_codes

    codec = default_codec()
    return targets_from_codes(codec.encode(logits), codec)


class FixedStream:
    """The part of sadpipe.engine.streams.Stream that fit uses, serving fixed batches in turn."""

    def __init__(self, batches: list[dict]):
        self.fixed, self.per_epoch, self.dataset = batches, len(batches), batches
        self.current = None

    def batches(self, consumed: int):
        while True:
            self.current = self.fixed[consumed % len(self.fixed)]
            consumed += 1
            yield self.current


def grads(model) -> dict:
    return {n: None if p.grad is None else p.grad.detach().clone() for n, p in model.named_parameters()
            if p.requires_grad}


def run_fit(scenario: str, toy_root: str, out_dir: str) -> None:
    from conftest import REPO, tiny_overrides

    from sadpipe.cache.codec import default_codec
    from sadpipe.cache.targets import code_table
    from sadpipe.data.dataset import labeled_source
    from sadpipe.engine.device import AnchorCache
    from sadpipe.engine.distributed import init_distributed
    from sadpipe.engine.loop import Hooks, RunSpec, fit
    from sadpipe.settings import load_settings
    from sadpipe.tasks.distill import batch_loss
    from sadpipe.tasks.supervised import build_model_for

    cpu = torch.device("cpu")
    info = init_distributed(cpu)
    cfg = load_settings(REPO / "pipelines" / "toy.toml", tiny_overrides(Path(toy_root)) + [
        "student.model.tiny_widths=[8,16,32,64]", "student.model.fpn_channels=16", "geometry.max_size=256",
        'distill.method="sad"', "student.train.warmup_steps=0"])
    categories = labeled_source(cfg.data, "train").categories
    torch.manual_seed(0)  # the same initial weights on every rank (DDP would broadcast rank 0's anyway)
    model = build_model_for(cfg, "student", categories)
    reference = build_model_for(cfg, "student", categories)
    spec = SCENARIOS[scenario][info.rank]
    stream = FixedStream([hand_batch(spec, model.layout, model.num_classes, seed=100 * info.rank + s)
                          for s in range(STEPS)])
    table = code_table(default_codec())

    def loss_fn(net, batch, anchors):
        return batch_loss(net, batch, anchors, cfg.distill, cfg.student.train, cpu, code_table=table)

    records = []

    def before_update(step, batch, loss, m):
        # the weights are still those of this step's forward: the same batch through a plain
        # copy of them (no DDP, no extra term) gives this rank's own gradients
        reference.load_state_dict(m.state_dict())
        reference.train()
        reference.zero_grad(set_to_none=True)
        local = loss_fn(reference, batch, AnchorCache(m.layout, cpu))
        local.total.backward()
        records.append({"ddp": grads(m), "local": grads(reference), "local_loss": float(local.total),
                        "terms": local.terms})

    run = RunSpec(out_dir=Path(out_dir) / "run", resolved=cfg.resolved, train=cfg.student.train, streams=[stream],
                  loss_fn=loss_fn, evaluate=None, total_steps=STEPS, tag="ddp-test")
    summary = fit(model, run, cpu, info, resume=False, hooks=Hooks(before_update=before_update))
    torch.save({"records": records, "steps": summary["steps"],
                "final": {n: p.detach().clone() for n, p in model.named_parameters()}},
               Path(out_dir) / f"rank{info.rank}.pt")
    print(f"rank {info.rank} finished {summary['steps']} steps", flush=True)


def run_agree(kind: str) -> None:
    from sadpipe.data.images import ImageReadError
    from sadpipe.engine.distributed import fail_together
    from sadpipe.engine.distributed import init_distributed

    info = init_distributed(torch.device("cpu"))
    try:
        with fail_together(info):
            if kind == f"user{info.rank}":
                raise ImageReadError("/data/x.jpg", "file is empty (0 bytes)", "Re-copy it.")
            if kind == f"bug{info.rank}":
                raise KeyError("missing_key")
    except Exception as e:
        print(f"rank {info.rank} caught {type(e).__name__}: {e} | origin {getattr(e, 'origin_rank', None)} "
              f"| path {getattr(e, 'path', None)}", flush=True)
        sys.exit(3)
    dist.barrier()  # the group still works after the block
    print(f"rank {info.rank} passed", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if sys.argv[1] == "fit":
        run_fit(*sys.argv[2:5])
    else:
        run_agree(sys.argv[2])
