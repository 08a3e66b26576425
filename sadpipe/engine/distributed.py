"""The ranks of a torchrun job: joining the process group (``init_distributed``, ``DistInfo``), and
what keeps them in step when something goes wrong.

Two problems, two tools:

``fail_together(info)``
    A block of rank-local work (often rank 0's: refusing an existing run, creating the store)
    that ends in a collective instead of a bare barrier. If the block raises on any rank, every
    rank raises at its end: the failed rank its own exception, the others the same user error
    (same class and message) or, for a bug, ``PeerRankError`` naming the rank. Without it a
    refusal on rank 0 leaves the other ranks at the barrier until the process-group timeout.
    The block itself must not run collectives (they would pair up with the agreement's).

``TouchEveryOutput(model, enabled)``
    DistributedDataParallel reduces every parameter's gradient each step and waits for all of
    them; a parameter that got no gradient on one rank (the box head of a rank whose batch has
    no box targets: SAD batches of unlabeled images only) stops the job ("Expected to have
    finished reduction in the prior iteration"). The loop adds a term that is exactly 0 and
    whose gradient is exactly 0 for each output of the model, so every parameter receives a
    gradient on every rank and nothing any loss computes changes.

Not covered: a rank that fails between two agreements while the others are in another
collective (a batch it cannot read or a non-finite loss inside the DDP step loop; the dump's
shard loop runs no collective, so it is one agreement block and an image ``--strict`` refuses on
any rank stops them all). Its message is in its own output; the others fail at
once with gloo ("Connection closed by peer"), and with NCCL wait until torchrun stops them
(torchrun ends every worker of a node when one exits) or the process-group timeout.
"""

from __future__ import annotations

import atexit
import importlib
import os
import pickle
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import UserError


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> DistInfo:
    """Join the torchrun process group if launched by torchrun (WORLD_SIZE > 1); NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        if backend == "gloo":
            # not for NCCL: destroying a communicator with a collective still pending can block, and
            # a rank that never exits is a rank torchrun never sees fail
            atexit.register(_leave_process_group)
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def _leave_process_group() -> None:
    """Destroy the process group before the interpreter tears down: left to the destructors, a
    rank leaving after an error (while its peers leave too) can die in gloo's teardown with
    "terminate called without an active exception" (SIGABRT), after its message was printed."""
    if dist.is_initialized():
        dist.destroy_process_group()


class PeerRankError(RuntimeError):
    """Raised on the other ranks when one rank failed with a bug (not a user error)."""


def error_report(rank: int, error: BaseException) -> dict:
    """What the other ranks need to raise the same error: class, message and (if it pickles) attributes."""
    try:
        state = pickle.loads(pickle.dumps(dict(vars(error))))
    except Exception:  # an attribute that does not pickle: the class and message still travel
        state = {}
    cls = type(error)
    return {"rank": rank, "module": cls.__module__, "qualname": cls.__qualname__, "message": str(error),
            "state": state}


def rebuild_error(report: dict) -> Exception:
    """The failed rank's user error as the same class and message, else a PeerRankError."""

    summary = f"{report['qualname']}: {report['message']}"
    try:
        cls = importlib.import_module(report["module"])
        for name in report["qualname"].split("."):
            cls = getattr(cls, name)
    except (ImportError, AttributeError):
        cls = None
    if isinstance(cls, type) and issubclass(cls, UserError) and issubclass(cls, Exception):
        # bypass the class's own __init__ (its arguments, e.g. ImageReadError(path, problem, fix),
        # are not at hand): the message becomes its only argument and its attributes come back
        error = cls.__new__(cls, report["message"])
        Exception.__init__(error, report["message"])
        vars(error).update(report["state"])
        try:
            same = str(error) == report["message"]
        except Exception:
            same = False
        if same:
            error.origin_rank = report["rank"]
            return error
    error = PeerRankError(f"rank {report['rank']} failed with {summary} (its traceback is in that rank's output)")
    error.origin_rank = report["rank"]
    return error


def agree(info: DistInfo, error: BaseException | None) -> None:
    """Collective: every rank calls it at the same point, with the exception it hit or None.

    Returns when no rank failed. Otherwise a rank that passed an error returns too (its caller
    re-raises it) and every other rank raises the lowest failed rank's error (see ``rebuild_error``).
    """
    if not info.enabled:
        return
    reports: list = [None] * info.world_size
    dist.all_gather_object(reports, None if error is None else error_report(info.rank, error))
    failed = [r for r in reports if r is not None]
    if failed and error is None:
        raise rebuild_error(failed[0])


@contextmanager
def fail_together(info: DistInfo):
    """Run a block of rank-local work; at its end every rank continues, or every rank raises.

    Also a barrier: no rank leaves the block before every rank has finished it.
    KeyboardInterrupt and SystemExit pass through without the agreement (torchrun signals
    every rank alike).
    """
    try:
        yield
    except Exception as e:
        agree(info, e)
        raise
    agree(info, None)


class _ZeroTouch(torch.autograd.Function):
    """0 in the forward and all-zero gradients in the backward, whatever the inputs hold
    (``0 * x.sum()`` would turn an inf into a NaN loss). The zero gradients are expanded
    scalars, as ``sum``'s backward makes them: no memory of the outputs' size."""

    @staticmethod
    def forward(ctx, *tensors):
        ctx.like = [(t.shape, t.dtype, t.device) for t in tensors]
        return torch.zeros((), dtype=torch.float32, device=tensors[0].device)

    @staticmethod
    def backward(ctx, grad):
        return tuple(torch.zeros((), dtype=dtype, device=device).expand(shape) for shape, dtype, device in ctx.like)


class TouchEveryOutput:
    """Collects the floating-point outputs of ``model``'s forward calls inside the block;
    ``zero_term()`` is then a float32 scalar 0 connected to each of them (see the module doc).

    Disabled (single process) it collects nothing and ``zero_term()`` is None: the single-process
    run keeps ``None`` gradients for a head its batch did not use. Under DDP that head gets zero
    gradients instead (the value every rank's reduced gradient has anyway), so an optimiser with
    momentum or weight decay still moves it on a step where no rank had box targets, as it
    already does when a batch has targets but none of its anchors is foreground.
    """

    def __init__(self, model: torch.nn.Module, enabled: bool):
        self.model, self.enabled = model, enabled
        self.outputs: list[torch.Tensor] = []
        self._hook = None

    def _collect(self, module, inputs, output):
        items = output if isinstance(output, (tuple, list)) else [output]
        self.outputs += [t for t in items if isinstance(t, torch.Tensor) and t.requires_grad]

    def __enter__(self):
        self.outputs = []
        if self.enabled:
            self._hook = self.model.register_forward_hook(self._collect)
        return self

    def __exit__(self, *exc):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        return False

    def zero_term(self) -> torch.Tensor | None:
        if not self.outputs:
            return None
        term = _ZeroTouch.apply(*self.outputs)
        self.outputs = []
        return term
