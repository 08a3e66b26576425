"""Two ranks (gloo, CPU) that must stay in step: DDP steps where a rank has no box targets, and
refusals or failures on one rank that must stop every rank with the message.

Every rank is a separate process started here with RANK / WORLD_SIZE / MASTER_* set (what
torchrun sets), each with its own output and a deadline: a rank that hangs fails the test
instead of hanging it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import REPO, make_spread_teacher, tiny_overrides

from sadpipe.settings import load_settings
from sadpipe.data.images import ImageReadError
from sadpipe.engine.distributed import PeerRankError, TouchEveryOutput, error_report, rebuild_error
from sadpipe.tasks.dump import dump_teacher

WORKER = Path(__file__).resolve().parent / "distributed_worker.py"
TOY = REPO / "pipelines" / "toy.toml"
WORLD = 2


@dataclass
class RankResult:
    rank: int
    returncode: int
    stdout: str
    stderr: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(args: list[str], tmp_path: Path, *, timeout: float = 240.0) -> list[RankResult]:
    """Start ``python ARGS`` as ranks 0..WORLD-1 of one job and wait for all of them.

    Fails the test (after killing the ranks still running) if any rank has not exited within
    ``timeout`` seconds: that is the hang these tests are about.
    """
    port = _free_port()
    procs, files = [], []
    for rank in range(WORLD):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                   LOCAL_WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        out, err = (open(tmp_path / f"rank{rank}.{s}", "w+") for s in ("out", "err"))
        files.append((out, err))
        procs.append(subprocess.Popen([sys.executable, *args], env=env, stdout=out, stderr=err, cwd=tmp_path))
    deadline = time.monotonic() + timeout
    hung = []
    for rank, proc in enumerate(procs):
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            hung.append(rank)
    for rank in hung:
        procs[rank].kill()
        procs[rank].wait()
    results = []
    for rank, (proc, (out, err)) in enumerate(zip(procs, files)):
        out.seek(0)
        err.seek(0)
        results.append(RankResult(rank, proc.returncode, out.read(), err.read()))
        out.close()
        err.close()
    if hung:
        pytest.fail(f"rank(s) {hung} still running after {timeout:.0f} s (hang); outputs:\n"
                    + "\n".join(f"--- rank {r.rank} (rc {r.returncode})\n{r.stdout[-1500:]}\n{r.stderr[-3000:]}"
                                for r in results))
    return results


def _outputs(results: list[RankResult]) -> str:
    return "\n".join(f"--- rank {r.rank} rc {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}" for r in results)


# ---------------------------------------------------------------------------------------------
# DDP steps where some rank's batch has no box targets


def _box_head(name: str) -> bool:
    return name.startswith("head.regression_head.")


@pytest.mark.parametrize("scenario", ["one_rank_unlabeled", "no_rank_targets", "uneven"])
def test_ddp_step_without_box_targets_completes_with_the_average_gradient(toy_root, tmp_path, scenario):
    results = run_ranks([str(WORKER), "fit", scenario, str(toy_root), str(tmp_path)], tmp_path)
    assert all(r.returncode == 0 for r in results), _outputs(results)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    assert [rk["steps"] for rk in ranks] == [2, 2]
    for step in range(2):
        local = [rk["records"][step]["local"] for rk in ranks]
        # the scenario really is one without box targets on rank 1 (on both ranks for no_rank_targets):
        # the plain loss leaves the box head without gradients there, and only there
        for r in range(WORLD):
            missing = {n for n, g in local[r].items() if g is None}
            has_targets = scenario != "no_rank_targets" and r == 0
            assert missing == (set() if has_targets else {n for n in local[r] if _box_head(n)}), (r, missing)
        for name in local[0]:
            # independent computation: the mean over ranks of each rank's own gradient (none = 0)
            per_rank = [g[name] if g[name] is not None else torch.zeros_like(ranks[0]["final"][name]) for g in local]
            expected = sum(per_rank) / WORLD
            for r in range(WORLD):
                got = ranks[r]["records"][step]["ddp"][name]
                assert got is not None, (r, name)  # every parameter got a gradient on every rank
                scale = max(float(expected.abs().max()), 1e-30)
                assert float((got - expected).abs().max()) <= 1e-6 * scale, (scenario, step, r, name)
            if scenario == "no_rank_targets" and _box_head(name):
                assert all(float(ranks[r]["records"][step]["ddp"][name].abs().max()) == 0.0 for r in range(WORLD))
        assert any(float(g.abs().max()) > 0 for n, g in local[0].items() if g is not None)
    # both ranks end with the same weights
    for name, p in ranks[0]["final"].items():
        assert torch.equal(p, ranks[1]["final"][name]), name


@pytest.mark.parametrize("length,world", [(7, 2), (11, 3), (80, 8), (81, 8)])
def test_every_rank_gets_the_same_number_of_batches_when_the_images_do_not_divide(length, world):
    # the collectives of a step (DDP's reduction, the epoch-end agreement) pair up only if every
    # rank runs the same steps: each rank takes length // world images, none twice
    from sadpipe.engine.distributed import DistInfo
    from sadpipe.engine.streams import ResumableSampler, Stream

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return length

    seen = []
    for rank in range(world):
        sampler = ResumableSampler(length, seed=3, rank=rank, world_size=world)
        sampler.set_epoch(1)
        seen.append(list(sampler))
        stream = Stream(Images(), batch_size=2, seed=3, info=DistInfo(rank, world), loader_kw={})
        assert stream.per_epoch == (length // world) // 2
    assert [len(s) for s in seen] == [length // world] * world
    flat = [i for s in seen for i in s]
    assert len(set(flat)) == len(flat) and set(flat) <= set(range(length))


def test_the_zero_term_changes_no_loss_value_and_no_gradient():
    torch.manual_seed(0)

    class TwoHeads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk, self.a, self.b = torch.nn.Linear(4, 6), torch.nn.Linear(6, 3), torch.nn.Linear(6, 2)

        def forward(self, x):
            h = self.trunk(x)
            return self.a(h), self.b(h)

    model = TwoHeads()
    x = torch.randn(5, 4)
    a, _ = model(x)
    plain = (a ** 2).sum()  # head b unused
    plain.backward()
    plain_grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    assert plain_grads["b.weight"] is None
    model.zero_grad(set_to_none=True)

    with TouchEveryOutput(model, enabled=True) as touch:
        a, _ = model(x)
        loss = (a ** 2).sum()
    touched = loss + touch.zero_term()
    assert touched.item() == plain.item()  # bit for bit
    touched.backward()
    for n, p in model.named_parameters():
        if plain_grads[n] is None:
            assert p.grad is not None and float(p.grad.abs().max()) == 0.0, n
        else:
            assert torch.equal(p.grad, plain_grads[n]), n
    # the hook is gone after the block, and an inf output does not turn the loss into NaN
    model(x)
    assert touch.outputs == []
    with torch.no_grad():
        model.b.bias.fill_(float("inf"))
    with TouchEveryOutput(model, enabled=True) as touch:
        a, _ = model(x)
        loss = (a ** 2).sum()
    assert (loss + touch.zero_term()).item() == loss.item()
    with TouchEveryOutput(model, enabled=False) as touch:
        model(x)
    assert touch.zero_term() is None


# ---------------------------------------------------------------------------------------------
# fail_together: a failure on one rank stops every rank with its message


@pytest.mark.parametrize("kind", ["user0", "user1", "bug1", "none"])
def test_a_failure_on_one_rank_reaches_every_rank(tmp_path, kind):
    results = run_ranks([str(WORKER), "agree", kind], tmp_path, timeout=120)
    if kind == "none":
        assert [r.returncode for r in results] == [0, 0] and all("passed" in r.stdout for r in results)
        return
    assert [r.returncode for r in results] == [3, 3], _outputs(results)
    for r in results:
        if kind.startswith("user"):  # the same class, message and attributes on every rank
            assert ("caught ImageReadError: cannot read image '/data/x.jpg': file is empty (0 bytes). Re-copy it."
                    in r.stdout), r.stdout
            origin = int(kind[-1])
            assert f"origin {None if r.rank == origin else origin} | path /data/x.jpg" in r.stdout, r.stdout
        elif r.rank == 1:
            assert "caught KeyError: 'missing_key'" in r.stdout, r.stdout
        else:  # a bug elsewhere is not dressed up as this rank's own error
            assert "caught PeerRankError: rank 1 failed with KeyError: 'missing_key'" in r.stdout, r.stdout


def test_rebuilt_errors_keep_class_message_and_attributes():
    original = ImageReadError("/data/y.png", "not an image", "Remove it.")
    rebuilt = rebuild_error(error_report(0, original))
    assert type(rebuilt) is ImageReadError and str(rebuilt) == str(original)
    assert rebuilt.path == original.path and rebuilt.origin_rank == 0
    bug = rebuild_error(error_report(1, ZeroDivisionError("division by zero")))
    assert isinstance(bug, PeerRankError) and "rank 1 failed with ZeroDivisionError: division by zero" in str(bug)


# ---------------------------------------------------------------------------------------------
# the CLI's refusals under two ranks


def _cli(command: str, *args: str, overrides: list[str]) -> list[str]:
    argv = ["-m", "sadpipe", command, "--config", str(TOY), "--device", "cpu", *args]
    for o in overrides:
        argv += ["--set", o]
    return argv


def _assert_every_rank_refuses(results: list[RankResult], message: str) -> None:
    assert [r.returncode for r in results] == [2] * WORLD, _outputs(results)
    for r in results:
        assert "error: " in r.stderr and message in r.stderr, _outputs(results)


def test_training_into_a_directory_that_holds_a_run_stops_every_rank(toy_root, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "train_state.pt").write_bytes(b"an earlier run")  # refused before it is read
    results = run_ranks(_cli("train-teacher", "--out", str(out), "--max-steps", "1",
                             overrides=tiny_overrides(toy_root)), tmp_path, timeout=180)
    _assert_every_rank_refuses(results, "already holds a run (train_state.pt)")
    assert (out / "train_state.pt").read_bytes() == b"an earlier run"


def test_a_failing_final_evaluation_on_rank_0_stops_every_rank(toy_root, tmp_path):
    # the val split lists an image that does not exist: only rank 0 evaluates, at the end of training
    ann = json.loads((toy_root / "val" / "annotations.json").read_text())
    ann["images"][0]["file_name"] = "missing.png"
    (tmp_path / "val.json").write_text(json.dumps(ann))
    overrides = tiny_overrides(toy_root) + [f"data.val_annotations={json.dumps(str(tmp_path / 'val.json'))}"]
    results = run_ranks(_cli("train-teacher", "--out", str(tmp_path / "run"), "--max-steps", "1",
                             overrides=overrides), tmp_path, timeout=240)
    _assert_every_rank_refuses(results, "missing.png")


@pytest.fixture(scope="module")
def small_store(toy_root, tmp_path_factory):
    """A spread tiny teacher and a single-process store of its first 4 plan images."""
    base = tmp_path_factory.mktemp("ddp_dump")
    cfg = load_settings(TOY, tiny_overrides(toy_root))
    teacher = make_spread_teacher(cfg, base / "teacher.pt")
    store = base / "store.zarr"
    dump_teacher(cfg, teacher, store, device="cpu", limit=4, log=lambda *a: None)
    return {"teacher": teacher, "store": store}


def test_dumping_into_a_store_of_another_config_stops_every_rank(toy_root, small_store, tmp_path):
    overrides = tiny_overrides(toy_root) + ["detect.score_thresh=0.2"]
    results = run_ranks(_cli("dump-teacher", "--teacher", str(small_store["teacher"]), "--out",
                             str(small_store["store"]), "--limit", "4", overrides=overrides), tmp_path)
    _assert_every_rank_refuses(results, "score_thresh")


def test_dumping_into_a_directory_that_is_not_a_store_stops_every_rank(toy_root, small_store, tmp_path):
    out = tmp_path / "notastore"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    results = run_ranks(_cli("dump-teacher", "--teacher", str(small_store["teacher"]), "--out", str(out),
                             "--limit", "4", overrides=tiny_overrides(toy_root)), tmp_path)
    _assert_every_rank_refuses(results, "is not a sadpipe teacher cache")
    assert (out / "notes.txt").read_text() == "mine"


def test_an_image_strict_refuses_on_rank_1_stops_every_rank(toy_root, small_store, tmp_path):
    # plan positions 0..3 in shards of 2: shard 0 is rank 0's, shard 1 (positions 2, 3) rank 1's;
    # position 2 is an unreadable file, so only rank 1 meets it, inside its shard loop
    ann = json.loads((toy_root / "train" / "annotations.json").read_text())
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"not a png at all")
    ann["images"][2]["file_name"] = str(bad)
    (tmp_path / "train.json").write_text(json.dumps(ann))
    overrides = tiny_overrides(toy_root) + [f"data.train_annotations={json.dumps(str(tmp_path / 'train.json'))}",
                                            "dump.images_per_shard=2"]
    results = run_ranks(_cli("dump-teacher", "--teacher", str(small_store["teacher"]), "--out",
                             str(tmp_path / "strict.zarr"), "--limit", "4", "--strict", overrides=overrides), tmp_path)
    _assert_every_rank_refuses(results, "corrupt.png")
