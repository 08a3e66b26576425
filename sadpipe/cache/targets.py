"""Compact teacher targets: one image's codec codes as stored, moved, and decoded on the device.

A detector's teacher puts almost every (anchor, class) entry into the codec's background bin
(code 0). Storing, reading and shipping the dense ``[A, K]`` code array therefore costs work
proportional to anchors x classes (9.8 M entries per image at COCO geometry) for information
proportional to the entries above the background bin. This module keeps only those:

- **sparse** (the usual case): the flat indices ``p_0 < p_1 < ...`` into ``codes.reshape(-1)`` of
  the entries with a non-zero code, stored as gaps ``delta_j = p_j - p_{j-1}`` (with
  ``p_{-1} = -1``, so every gap is >= 1) in uint16, and their codes in uint8. A gap larger than
  65535 is bridged by *filler* entries ``(65535, code 0)``: code 0 decodes to the background
  value, which is what an unlisted entry decodes to anyway, so fillers change nothing.
- **dense**: the whole ``[A * K]`` code array, used when the sparse form would be larger: always
  past a third of the entries above the background bin (3 bytes per entry against 1), and past a
  twelfth when zstd compresses the dense codes smaller (teachers whose entries above the bin
  cluster in space compress well as dense runs; both forms are compressed and compared then).

Either way the image carries one float32 ``background``: the logit its code 0 decodes to
(:meth:`codec.background_logit`, which may depend on the image's code counts). Decoding is a
cumulative sum, a table lookup and a scatter, so it runs on the training device inside the
step: only the compact arrays cross the DataLoader IPC and the host-to-device copy.

Shapes and dtypes (M = number of entries, fillers included):
``deltas`` int16 [M] (the uint16 bit pattern; torch has no general uint16 arithmetic),
``codes`` uint8 [M] (sparse) or uint8 [A * K] (dense).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from numcodecs import Zstd

MAX_GAP = 65535  # the largest gap one uint16 delta holds
SPARSE, DENSE = 0, 1  # the per-image ``encoding`` values stored in the cache
ENCODING_NAMES = {SPARSE: "sparse", DENSE: "dense"}


@dataclass
class CompactTargets:
    """One image's teacher targets in one view, compact (see the module docstring).

    deltas: int16 tensor [M] (uint16 gaps; empty when dense). codes: uint8 tensor [M] (sparse)
    or [A * K] (dense). background: the logit code 0 decodes to. num_anchors A, num_classes K.
    """

    deltas: torch.Tensor
    codes: torch.Tensor
    background: float
    num_anchors: int
    num_classes: int
    encoding: int = SPARSE

    @property
    def num_entries(self) -> int:
        """Entries stored (sparse: fillers included; dense: A * K)."""
        return int(self.codes.numel())

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data this record moves (IPC, host-to-device copy)."""
        return int(self.deltas.numel() * self.deltas.element_size() + self.codes.numel())

    def to(self, device, non_blocking: bool = False) -> "CompactTargets":
        return CompactTargets(self.deltas.to(device, non_blocking=non_blocking),
                              self.codes.to(device, non_blocking=non_blocking), self.background,
                              self.num_anchors, self.num_classes, self.encoding)

    def pin_memory(self) -> "CompactTargets":
        """Called by the DataLoader's pin-memory thread (``pin_memory=True``) so the copy to the
        GPU can be non-blocking."""
        return CompactTargets(self.deltas.pin_memory(), self.codes.pin_memory(), self.background,
                              self.num_anchors, self.num_classes, self.encoding)


# ---- encoding (dump side; torch so it runs on the teacher's device) -------------------------


def sparse_entries(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse form of one image's codes.

    Args:
        codes: uint8 [A, K] (any device).
    Returns:
        (deltas int32 [M] in [1, 65535], codes uint8 [M]) on the same device, fillers included.
    """
    flat = codes.reshape(-1)
    pos = torch.nonzero(flat).reshape(-1)
    if pos.numel() == 0:
        return pos.new_zeros(0, dtype=torch.int32), flat.new_zeros(0)
    gaps = torch.diff(pos, prepend=pos.new_full((1,), -1))
    fillers = (gaps - 1) // MAX_GAP  # fillers before each real entry
    counts = fillers + 1
    out_codes = torch.zeros(int(counts.sum()), dtype=torch.uint8, device=codes.device)
    out_deltas = torch.full_like(out_codes, MAX_GAP, dtype=torch.int32)
    last = torch.cumsum(counts, 0) - 1  # slot of each real entry, after its fillers
    out_codes[last] = flat[pos]
    out_deltas[last] = (gaps - fillers * MAX_GAP).to(torch.int32)
    return out_deltas, out_codes


def choose_encoding(num_entries: int, num_values: int) -> int | None:
    """SPARSE or DENSE from the sizes alone, or None when only the compressed sizes can tell:
    sparse costs 3 bytes per entry, dense 1 per value; below a quarter of that (a twelfth of the
    values above the background bin) sparse always compressed smaller in our measurements."""
    if 3 * num_entries >= num_values:
        return DENSE
    if 12 * num_entries < num_values:
        return SPARSE
    return None


def compact_from_codes(codes: torch.Tensor | np.ndarray, zstd_level: int = 3) -> tuple[int, np.ndarray, np.ndarray]:
    """(encoding, deltas uint16 [M], codes uint8 [M] or [A*K]) as numpy for the store writer.

    Args:
        codes: uint8 [A, K] (numpy, or a torch tensor on any device: the sparse extraction runs
            there and only the compact arrays are copied to the host, unless the choice between
            the forms needs the dense codes compressed).
        zstd_level: the store's zstd level, for comparing compressed sizes (see choose_encoding).
    """
    t = torch.from_numpy(np.ascontiguousarray(codes)) if isinstance(codes, np.ndarray) else codes
    if t.dtype != torch.uint8 or t.dim() != 2:
        raise ValueError(f"codes must be uint8 [A, K], got {t.dtype} {list(t.shape)}")
    deltas, values = sparse_entries(t)
    encoding = choose_encoding(values.numel(), t.numel())
    sparse = (SPARSE, deltas.cpu().numpy().astype(np.uint16), values.cpu().numpy())
    if encoding == SPARSE:
        return sparse
    dense = (DENSE, np.zeros(0, np.uint16), t.reshape(-1).cpu().numpy())
    if encoding == DENSE:
        return dense
    zstd = Zstd(level=zstd_level)
    return min((sparse, dense), key=lambda form: len(zstd.encode(pack(*form))))


def code_counts(codes: np.ndarray, num_values: int) -> tuple[int, int]:
    """(n0, n1): the image's number of codes 0 and 1 among all ``num_values`` entries, from its
    sparse or dense codes (fillers and unlisted entries are code 0)."""
    n_nonzero = int(np.count_nonzero(codes))
    n1 = int(np.count_nonzero(codes == 1))
    return num_values - n_nonzero, n1


def targets_from_codes(codes: torch.Tensor | np.ndarray, codec) -> CompactTargets:
    """The record a dump stores for one image's codes, as a reader hands it over (CPU tensors):
    for loaders and tests that make targets without a store. codes: uint8 [A, K]."""
    encoding, deltas, values = compact_from_codes(codes, codec.zstd_level)
    n0, n1 = code_counts(values, int(np.prod(codes.shape)))
    return CompactTargets(torch.from_numpy(deltas.view(np.int16)), torch.from_numpy(np.ascontiguousarray(values)),
                          codec.background_logit(n0, n1), int(codes.shape[0]), int(codes.shape[1]), encoding)


# ---- the stored blob -----------------------------------------------------------------------


def pack(encoding: int, deltas: np.ndarray, codes: np.ndarray) -> bytes:
    """Bytes stored per image and view: sparse = low bytes of the deltas, then their high bytes,
    then the codes (3M bytes; the byte planes compress far better under zstd than interleaved
    uint16); dense = the codes (A*K bytes)."""
    if encoding == DENSE:
        return np.ascontiguousarray(codes, dtype=np.uint8).tobytes()
    d = np.ascontiguousarray(deltas, dtype="<u2")
    planes = d.view(np.uint8).reshape(-1, 2).T  # [2, M]: row 0 low bytes, row 1 high bytes
    return planes.tobytes() + np.ascontiguousarray(codes, dtype=np.uint8).tobytes()


def unpack(blob: bytes, encoding: int, num_entries: int) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`pack`: (deltas int16 [M], codes uint8 [M]) or (empty, codes [A*K]).

    Raises ValueError when the blob's length does not match ``num_entries``."""
    raw = np.frombuffer(blob, dtype=np.uint8)
    if encoding == DENSE:
        if raw.size != num_entries:
            raise ValueError(f"dense record holds {raw.size} codes, expected {num_entries}")
        return np.zeros(0, np.int16), raw
    if raw.size != 3 * num_entries:
        raise ValueError(f"sparse record holds {raw.size} bytes, expected 3 x {num_entries}")
    m = num_entries
    deltas = (raw[:m].astype(np.uint16) | (raw[m:2 * m].astype(np.uint16) << 8)).view(np.int16)
    return deltas, raw[2 * m:]


# ---- decoding (training side; any device) ---------------------------------------------------


def code_table(codec) -> torch.Tensor:
    """float32 [256]: the logit each code decodes to before the per-image background (code 0)."""
    table = np.zeros(256, np.float32)
    values = np.asarray(codec.decode_table(), dtype=np.float32)
    table[: values.size] = values
    return torch.from_numpy(table)


def decode(targets: CompactTargets, table: torch.Tensor) -> torch.Tensor:
    """float32 [A, K] logits on ``table``'s device, equal bit for bit to ``codec.decode`` of the
    dense codes (the same float32 table, code 0 replaced by the image's background).

    Args:
        targets: on the same device as ``table`` (``targets.to(device)`` first).
        table: float32 [256] from :func:`code_table`, on the training device.
    """
    n = targets.num_anchors * targets.num_classes
    image_table = table.clone()
    image_table[0] = targets.background
    if targets.encoding == DENSE:
        out = image_table[targets.codes.long()]
    else:
        out = torch.full((n,), targets.background, dtype=torch.float32, device=table.device)
        if targets.codes.numel():
            pos = torch.cumsum(targets.deltas.to(torch.int64) & MAX_GAP, 0) - 1
            if int(pos[-1]) >= n:
                raise ValueError(f"compact targets index entry {int(pos[-1])} of an image with {n} values")
            out[pos] = image_table[targets.codes.long()]
    return out.reshape(targets.num_anchors, targets.num_classes)


def dense_codes(encoding: int, deltas: np.ndarray, codes: np.ndarray, num_values: int) -> np.ndarray:
    """uint8 [num_values] codes (for tools that want the dense codes back; CPU, numpy)."""
    if encoding == DENSE:
        return np.asarray(codes, dtype=np.uint8).copy()
    out = np.zeros(num_values, np.uint8)
    if codes.size:
        pos = np.cumsum(deltas.view(np.uint16).astype(np.int64)) - 1
        out[pos] = codes
    return out
