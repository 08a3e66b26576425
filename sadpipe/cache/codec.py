"""Lossy codec for teacher classification logits.

A codec maps float logits ``[..., K]`` to uint8 codes of the same shape (so the store keeps plain
fixed-shape uint8 arrays, one zarr inner chunk per image, compressed with zstd at
``codec.zstd_level``) and back to float32 logits. Encoding is pure torch, so it runs on the GPU
before the host copy; decoding is a table lookup.

Two codecs:

- :class:`UniformProbabilityCodec` - the baseline (the best simple scheme of the prototype,
  docs/codec.md, section "Earlier prototype measurements"): ``levels`` uniform
  bins of q = sigmoid(logit) on [0, 1], decoded to the bin centre.
- :class:`BinnedProbabilityCodec` (the default) - bins placed where the ADL is sensitive
  (docs/codec.md has the measurements behind every choice):

  * one wide *background* bin ``q < floor``. The ADL gradient error of an entry is about its
    adaptive weight times the error in q, and the weight of an entry near the focal prior is
    tiny, so the gradient needs no precision there. Most entries of a detector's output fall in
    this bin, so its code 0 is what zstd compresses into almost nothing.
  * geometric bins from ``floor`` to ``log_until`` (each ``1 + log_ratio`` times wider than the
    previous): there the ADL weight grows fast but the bins still hold many entries, and what
    matters is the sum of q**1.8 (the adaptive normaliser) and of the ADL, i.e. relative error.
  * uniform bins of width ``step`` from the last geometric edge (<= ``log_until``) up to 1: few
    entries, large adaptive weights,
    gradient error ~ weight x |error in q|, so absolute precision in q.

  Each code decodes to the power mean ``(E[q**power | bin])**(1/power)`` of the bin, fitted on
  a sample of teacher logits by :meth:`BinnedProbabilityCodec.fit` (``power`` = the normaliser's
  1.8), so the normaliser sum(q**1.8) is unbiased on data like the sample. Optionally the
  background value is predicted per image from the image's own code counts
  (``floor_context``): an image whose background sits higher puts more entries just above the
  floor, and that ratio predicts the image's background mean; no side information is stored.

Codecs are frozen dataclasses; ``to_dict()`` is JSON-able and ``codec_from_dict`` rebuilds them
from the store metadata.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass, replace
from functools import cached_property

import numpy as np
import torch

MAX_CODES = 256


def _logit(q: np.ndarray) -> np.ndarray:
    q = np.asarray(q, dtype=np.float64)
    return np.log(q) - np.log1p(-q)


def as_code_array(codes) -> np.ndarray:
    """uint8 numpy view of codes given as numpy or (CPU) torch."""
    if isinstance(codes, torch.Tensor):
        codes = codes.detach().cpu().numpy()
    codes = np.asarray(codes)
    if codes.dtype != np.uint8:
        raise TypeError(f"codes must be uint8 (as written by codec.encode), got {codes.dtype}")
    return codes


def _lookup(table: np.ndarray, pair_table: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """float32 ``table[codes]``; two codes per lookup (a 65536-entry table of float32 pairs)
    when the codes are contiguous and of even size, which is ~2x faster than one per lookup."""
    if sys.byteorder == "little" and codes.flags.c_contiguous and codes.size % 2 == 0 and codes.size > 0:
        pairs = codes.reshape(-1).view(np.uint16)
        return pair_table[pairs].view(np.float32).reshape(codes.shape)
    return table[codes]


def _pair_table(table: np.ndarray) -> np.ndarray:
    """uint64 [65536]: entry ``lo + 256*hi`` holds float32 (table[lo], table[hi]) (little endian)."""
    pairs = np.empty((MAX_CODES, MAX_CODES, 2), np.float32)
    pairs[:, :, 0] = table[None, :]  # low byte = first code
    pairs[:, :, 1] = table[:, None]
    return pairs.reshape(-1, 2).view(np.uint64).reshape(-1)


@dataclass(frozen=True)
class UniformProbabilityCodec:
    """q = sigmoid(logit) quantised to ``levels`` uniform bins on [0, 1] (the baseline of docs/codec.md).

    encode: float logits [...] -> uint8 codes [...]
    decode: uint8 codes [...] -> float32 logits [...] (the logit of the bin centre)
    """

    levels: int = 256
    zstd_level: int = 3
    name: str = "uniform_probability"

    def __post_init__(self) -> None:
        if not 2 <= self.levels <= MAX_CODES:
            raise ValueError(f"levels must be in [2, {MAX_CODES}], got {self.levels}")

    def encode(self, logits: torch.Tensor, **context) -> torch.Tensor:
        q = torch.sigmoid(logits.float())
        codes = torch.clamp((q * self.levels).floor(), 0, self.levels - 1)
        return codes.to(torch.uint8)

    needs_fit = False

    def fit(self, sample_logits=None, **kwargs) -> "UniformProbabilityCodec":
        """Nothing to fit (fixed bin centres); returns self so callers can fit any codec alike."""
        return self

    def decode_table(self) -> np.ndarray:
        """float32 [levels]: the logit each code decodes to."""
        centres = (np.arange(self.levels, dtype=np.float64) + 0.5) / self.levels
        return _logit(centres).astype(np.float32)

    @cached_property
    def _tables(self):
        table = np.zeros(MAX_CODES, np.float32)
        table[: self.levels] = self.decode_table()
        return table, _pair_table(table)

    def decode(self, codes: np.ndarray | torch.Tensor) -> torch.Tensor:
        table, pairs = self._tables
        return torch.from_numpy(_lookup(table, pairs, as_code_array(codes)))

    def background_logit(self, n0: int, n1: int) -> float:
        """The logit code 0 decodes to (the same for every image: no per-image context)."""
        return float(self._tables[0][0])

    def to_dict(self) -> dict:
        return asdict(self)


def binned_edges(floor: float, log_ratio: float, log_until: float, step: float) -> np.ndarray:
    """float64 [L-1] bin edges in q of :class:`BinnedProbabilityCodec` (code c covers
    ``[edge[c-1], edge[c])``, edge[-1] = 0, edge[L-1] = 1).

    floor, floor*(1+r), floor*(1+r)**2, ... while below log_until, then uniform steps of
    ``step`` from the last geometric edge until 1 - step/2 (the top bin is at most 1.5 steps).
    """
    edges = [floor]
    while edges[-1] * (1.0 + log_ratio) < log_until:
        edges.append(edges[-1] * (1.0 + log_ratio))
    n_uniform = int(math.floor((1.0 - step / 2 - edges[-1]) / step))
    edges.extend(edges[-1] + step * np.arange(1, n_uniform + 1))
    return np.asarray(edges, dtype=np.float64)


def _uniform_power_mean(lo: np.ndarray, hi: np.ndarray, power: float) -> np.ndarray:
    """(E[q**p])**(1/p) for q uniform on [lo, hi]: the decode value before any fit."""
    p1 = power + 1.0
    mean_pow = (hi**p1 - lo**p1) / (p1 * (hi - lo))
    return mean_pow ** (1.0 / power)


@dataclass(frozen=True)
class BinnedProbabilityCodec:
    """Non-uniform bins of q = sigmoid(logit), decoded to fitted per-bin power means.

    Parameters (all in probability q):
        floor: top of the background bin (code 0).
        log_ratio: geometric growth of the bins between ``floor`` and ``log_until``.
        log_until: where geometric bins end and uniform ones of width ``step`` start.
        step: width of the uniform bins up to 1.
        power: exponent of the decode power mean (the ADL normaliser's 1.8).
        decode_q: fitted decoded q per code (tuple of length num_codes) or None for the
            power mean of a uniform distribution over each bin (poor for the background bin).
        floor_context: None, or fitted (a, b): per image, code 0 decodes to
            ``exp((a + b * log((n1 + 1) / (n0 + 1))) / power)`` where n0, n1 are the image's
            counts of codes 0 and 1 (decode() then treats the last two dims [A, K] as one image).
        zstd_level: zstd level the store compresses the codes with.

    encode: float logits [..., K] (any device) -> uint8 codes [..., K], monotone in the logit.
    decode: uint8 codes [..., K] -> float32 logits [..., K] (CPU).
    """

    floor: float = 0.03
    log_ratio: float = 0.3
    log_until: float = 0.08
    step: float = 0.004
    power: float = 1.8
    decode_q: tuple[float, ...] | None = None
    floor_context: tuple[float, float] | None = None
    zstd_level: int = 3
    name: str = "binned_probability"

    def __post_init__(self) -> None:
        if not 0.0 < self.floor < self.log_until < 1.0:
            raise ValueError(f"need 0 < floor < log_until < 1, got floor={self.floor}, log_until={self.log_until}")
        if self.log_ratio <= 0 or not 0 < self.step < 0.5:
            raise ValueError(f"need log_ratio > 0 and 0 < step < 0.5, got {self.log_ratio}, {self.step}")
        n = self.num_codes
        if n > MAX_CODES:
            raise ValueError(f"these bins need {n} codes, more than {MAX_CODES}; raise step or log_ratio")
        # JSON round trips turn tuples into lists; normalise so equality and hashing work.
        if self.decode_q is not None:
            object.__setattr__(self, "decode_q", tuple(float(v) for v in self.decode_q))
            if len(self.decode_q) != n:
                raise ValueError(f"decode_q has {len(self.decode_q)} values but the bins give {n} codes")
        if self.floor_context is not None:
            object.__setattr__(self, "floor_context", tuple(float(v) for v in self.floor_context))
            if len(self.floor_context) != 2:
                raise ValueError(f"floor_context must be (a, b), got {self.floor_context}")

    @property
    def needs_fit(self) -> bool:
        """True until decode values were fitted (see :meth:`fit`); unfitted decoding biases the
        normaliser by several percent (docs/codec.md)."""
        return self.decode_q is None

    # ---- bins ------------------------------------------------------------------------

    @cached_property
    def edges_q(self) -> np.ndarray:
        """float64 [num_codes - 1] bin edges in q."""
        return binned_edges(self.floor, self.log_ratio, self.log_until, self.step)

    @property
    def num_codes(self) -> int:
        return len(self.edges_q) + 1

    @cached_property
    def _edges_logit(self) -> torch.Tensor:
        return torch.from_numpy(_logit(self.edges_q).astype(np.float32))

    def bin_bounds_q(self) -> tuple[np.ndarray, np.ndarray]:
        """(lo, hi) float64 [num_codes]: the q interval of each code."""
        lo = np.concatenate([[0.0], self.edges_q])
        hi = np.concatenate([self.edges_q, [1.0]])
        return lo, hi

    def decode_table(self) -> np.ndarray:
        """float32 [num_codes]: the logit each code decodes to (code 0 before any per-image context)."""
        if self.decode_q is not None:
            q = np.asarray(self.decode_q, dtype=np.float64)
        else:
            lo, hi = self.bin_bounds_q()
            q = _uniform_power_mean(lo, hi, self.power)
        return _logit(q).astype(np.float32)

    # ---- encode / decode ---------------------------------------------------------------

    def encode(self, logits: torch.Tensor, **context) -> torch.Tensor:
        """float logits [..., K] -> uint8 codes [..., K]; code = number of edges <= logit.

        Binning in logit space (edges are logit(edge_q)) avoids sigmoid rounding at large |z|;
        +-inf map to the extreme codes. NaN logits map to the top code (bucketize's rule); the
        teacher should never produce them.
        """
        edges = self._edges_logit.to(logits.device)
        return torch.bucketize(logits.float(), edges, right=True).to(torch.uint8)

    @cached_property
    def _tables(self):
        table = np.zeros(MAX_CODES, np.float32)
        table[: self.num_codes] = self.decode_table()
        return table, _pair_table(table)

    def floor_value(self, n0: int, n1: int) -> float:
        """Decoded logit of code 0 for an image with n0 codes 0 and n1 codes 1 (floor_context)."""
        a, b = self.floor_context
        log_mean_pow = a + b * math.log((n1 + 1.0) / (n0 + 1.0))
        q = math.exp(log_mean_pow / self.power)
        q = min(q, self.edges_q[0])
        return float(_logit(q))

    def background_logit(self, n0: int, n1: int) -> float:
        """The logit code 0 decodes to in an image with n0 codes 0 and n1 codes 1, rounded to
        float32 as :meth:`decode` uses it (the per-image value the teacher cache stores)."""
        if self.floor_context is None:
            return float(self._tables[0][0])
        return float(np.float32(self.floor_value(n0, n1)))

    def decode(self, codes: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 codes [..., K] -> float32 logits [..., K] (CPU tensor)."""
        codes = as_code_array(codes)
        table, pairs = self._tables
        if self.floor_context is None or codes.ndim < 2:
            return torch.from_numpy(_lookup(table, pairs, codes))
        images = codes.reshape((-1,) + codes.shape[-2:])
        out = np.empty(images.shape, np.float32)
        for i, image in enumerate(images):
            n0 = image.size - np.count_nonzero(image)
            n1 = np.count_nonzero(image == 1)
            image_table = table.copy()
            image_table[0] = self.floor_value(int(n0), int(n1))
            image_pairs = pairs.copy().view(np.float32).reshape(MAX_CODES, MAX_CODES, 2)
            image_pairs[0, :, 1] = image_table[0]  # high byte (second code) = 0
            image_pairs[:, 0, 0] = image_table[0]  # low byte (first code) = 0
            out[i] = _lookup(image_table, image_pairs.reshape(-1, 2).view(np.uint64).reshape(-1), image)
        return torch.from_numpy(out.reshape(codes.shape))

    # ---- fitting -----------------------------------------------------------------------

    def fit(self, sample_logits: torch.Tensor, *, floor_context: bool = True, min_count: int = 50):
        """A copy with decode values fitted on a sample of teacher logits.

        Args:
            sample_logits: float [B, A, K] (or [N, K]); a few dozen images of the teacher that
                will be dumped (fitting on other teachers biases the normaliser).
            floor_context: also fit the per-image background predictor (needs B >= 8 images).
            min_count: bins with fewer sample entries keep the uniform-bin power mean.

        Returns:
            a new BinnedProbabilityCodec with ``decode_q`` (and ``floor_context``) set.
        """
        z = torch.as_tensor(sample_logits).detach().double().cpu()
        codes = self.encode(z).numpy().astype(np.int64)
        q_pow = torch.exp(self.power * torch.nn.functional.logsigmoid(z)).numpy()
        counts = np.bincount(codes.reshape(-1), minlength=self.num_codes)
        sums = np.bincount(codes.reshape(-1), weights=q_pow.reshape(-1), minlength=self.num_codes)
        lo, hi = self.bin_bounds_q()
        decode_q = _uniform_power_mean(lo, hi, self.power)
        enough = counts >= min_count
        decode_q[enough] = (sums[enough] / counts[enough]) ** (1.0 / self.power)
        decode_q = np.clip(decode_q, np.maximum(lo, 1e-30), hi)
        context = None
        if floor_context and z.dim() == 3 and z.shape[0] >= 8:
            context = _fit_floor_context(codes, q_pow, self.power)
        return replace(self, decode_q=tuple(float(v) for v in decode_q), floor_context=context)

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("decode_q", "floor_context"):
            if d[key] is not None:
                d[key] = list(d[key])
        return d


def _fit_floor_context(codes: np.ndarray, q_pow: np.ndarray, power: float):
    """Least squares of log(mean q**p over an image's code-0 entries) on log((n1+1)/(n0+1)).

    codes int64 [B, A, K], q_pow float64 [B, A, K]. Returns (a, b) or None if the images do not
    vary enough to fit a slope.
    """
    xs, ys = [], []
    for image_codes, image_pow in zip(codes, q_pow):
        in_floor = image_codes == 0
        n0, n1 = int(in_floor.sum()), int((image_codes == 1).sum())
        if n0 == 0:
            continue
        xs.append(math.log((n1 + 1.0) / (n0 + 1.0)))
        ys.append(math.log(image_pow[in_floor].mean()))
    if len(xs) < 8 or np.std(xs) < 1e-6:
        return None
    slope, intercept = np.polyfit(np.asarray(xs), np.asarray(ys), 1)
    return (float(intercept), float(slope))

# default_codec()'s decode values: BinnedProbabilityCodec() fitted on the 64 images of the toy
# teacher (ResNet-18, 500 steps, val mAP 10.4) that benchmarks/make_codec_inputs.py saved as
# runs/codec_inputs/toy_teacher_500steps.pt
# (`python benchmarks/codec_fidelity.py --inputs ... --fit-default`), rounded to 6 digits.
# Other teachers should be refitted (BinnedProbabilityCodec.fit) on a sample of their own logits.
_TOY_TEACHER_DECODE_Q = (
    0.0100001, 0.0342073, 0.0444794, 0.0578041, 0.0678883, 0.0719079, 0.0758987, 0.0798731, 0.0839163,
    0.0878808, 0.0918647, 0.0959162, 0.0998617, 0.1039, 0.107908, 0.111965, 0.11591, 0.119875,
    0.123881, 0.127872, 0.131867, 0.135892, 0.139898, 0.143915, 0.147931, 0.151892, 0.155834, 0.159925,
    0.163942, 0.167861, 0.171983, 0.175946, 0.179882, 0.183989, 0.187903, 0.191937, 0.195939, 0.199841,
    0.203877, 0.207933, 0.211904, 0.215953, 0.219958, 0.22388, 0.227883, 0.231834, 0.235928, 0.23987,
    0.243844, 0.247842, 0.251908, 0.255944, 0.259901, 0.263856, 0.267906, 0.271843, 0.275926, 0.279913,
    0.283839, 0.288029, 0.291892, 0.295841, 0.299752, 0.303981, 0.307745, 0.311992, 0.315789, 0.319805,
    0.323859, 0.327904, 0.331673, 0.335912, 0.339912, 0.343912, 0.347912, 0.351912, 0.355911, 0.359911,
    0.363911, 0.367911, 0.371911, 0.375911, 0.379911, 0.383911, 0.387911, 0.391911, 0.395911, 0.399911,
    0.403911, 0.407911, 0.411911, 0.415911, 0.419911, 0.423911, 0.427911, 0.431911, 0.435911, 0.439911,
    0.443911, 0.447911, 0.451911, 0.455911, 0.459911, 0.463911, 0.467911, 0.471911, 0.475911, 0.479911,
    0.483911, 0.487911, 0.491911, 0.495911, 0.499911, 0.503911, 0.507911, 0.511911, 0.515911, 0.519911,
    0.523911, 0.527911, 0.531911, 0.535911, 0.539911, 0.543911, 0.547911, 0.551911, 0.555911, 0.559911,
    0.563911, 0.567911, 0.571911, 0.575911, 0.579911, 0.583911, 0.587911, 0.591911, 0.595911, 0.599911,
    0.603911, 0.607911, 0.611911, 0.615911, 0.619911, 0.623911, 0.627911, 0.631911, 0.635911, 0.639911,
    0.643911, 0.647911, 0.651911, 0.655911, 0.659911, 0.663911, 0.667911, 0.671911, 0.675911, 0.679911,
    0.683911, 0.687911, 0.691911, 0.695911, 0.699911, 0.703911, 0.707911, 0.711911, 0.715911, 0.719911,
    0.723911, 0.727911, 0.731911, 0.735911, 0.739911, 0.743911, 0.747911, 0.751911, 0.755911, 0.759911,
    0.763911, 0.767911, 0.771911, 0.775911, 0.779911, 0.783911, 0.787911, 0.791911, 0.795911, 0.799911,
    0.803911, 0.807911, 0.811911, 0.815911, 0.819911, 0.823911, 0.827911, 0.831911, 0.835911, 0.839911,
    0.843911, 0.847911, 0.851911, 0.855911, 0.859911, 0.863911, 0.867911, 0.871911, 0.875911, 0.879911,
    0.883911, 0.887911, 0.891911, 0.895911, 0.899911, 0.903911, 0.907911, 0.911911, 0.915911, 0.919911,
    0.923911, 0.927911, 0.931911, 0.935911, 0.939911, 0.943911, 0.947911, 0.951911, 0.955911, 0.959911,
    0.963911, 0.967911, 0.971911, 0.975911, 0.979911, 0.983911, 0.987911, 0.991911, 0.995911, 0.998955,
)
_TOY_TEACHER_FLOOR_CONTEXT = (-6.98167, 0.368845)


CODECS = {
    "uniform_probability": UniformProbabilityCodec,
    "binned_probability": BinnedProbabilityCodec,
}


def codec_from_dict(spec: dict):
    """Rebuild a codec from ``codec.to_dict()`` (as stored in the cache metadata)."""
    spec = dict(spec)
    name = spec.pop("name", None)
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r} in the cache metadata; known: {sorted(CODECS)}")
    try:
        return CODECS[name](**spec)
    except TypeError as error:
        raise ValueError(f"codec {name!r} does not accept these parameters: {spec} ({error})") from error


def default_codec():
    """The codec the dump uses unless configured otherwise (see docs/codec.md): the binned codec
    with its default bins and decode values fitted on the toy teacher. For another teacher,
    ``default_codec().fit(sample_logits)`` on ~32 of its images keeps the normaliser unbiased."""
    return BinnedProbabilityCodec(decode_q=_TOY_TEACHER_DECODE_Q, floor_context=_TOY_TEACHER_FLOOR_CONTEXT)
