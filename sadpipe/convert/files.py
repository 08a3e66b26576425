"""Reading foreign checkpoint files without running code from them.

A ``.pth``/``.pkl`` file is a pickle, and a pickle can name any importable callable and have it
called while loading. Nothing here lets a file do that:

- torch files (``torch.save``, zip or the legacy format) load with ``torch.load(weights_only=True)``.
  Training checkpoints also carry objects of the training framework (MMEngine's message hub,
  optimizer schedulers, ...). Each such class or function the file names is replaced by an inert
  ``ForeignObject`` subclass that only records its arguments: the tensors load, the rest is kept as
  opaque records. numpy arrays (detectron2 ``.pth`` files may hold them) are rebuilt by numpy's own
  array-reconstruction functions, the only foreign callables allowed to run.
- plain pickles (detectron2's ``.pkl``: ``{"model": {name: numpy array}, ...}``) load with a
  restricted ``pickle.Unpickler`` that resolves only numpy's array/dtype/scalar reconstruction,
  ``collections.OrderedDict`` and ``_codecs.encode`` (how protocol-2 pickles store bytes); any
  other name in the file is refused, naming it.
"""

from __future__ import annotations

import collections
import codecs
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..models import CheckpointError

# What ``torch.save`` of the legacy (pre-zip) format writes first: a pickled magic number.
_LEGACY_TORCH_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_TORCH_PREFIX = b"\x80\x02\x8a\x0a" + _LEGACY_TORCH_MAGIC.to_bytes(10, "little")


def _numpy_globals() -> dict[str, object]:
    """Qualified name -> numpy callable/class needed to rebuild arrays, dtypes and scalars.

    numpy 2 pickles name ``numpy._core.multiarray``; numpy 1 pickles ``numpy.core.multiarray``.
    """
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    out: dict[str, object] = {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out[f"{module}._reconstruct"] = multiarray._reconstruct
        out[f"{module}.scalar"] = multiarray.scalar
    # BUILD on a dtype instance checks the instance's concrete class (numpy >= 1.25: numpy.dtypes.*)
    dtypes = getattr(np, "dtypes", None)
    for name in dir(dtypes) if dtypes is not None else []:
        cls = getattr(dtypes, name)
        if isinstance(cls, type) and issubclass(cls, np.dtype) and name != "ObjectDType":
            out[f"numpy.dtypes.{name}"] = cls
    return out


class ForeignObject:
    """An object of a class the file names and sadpipe does not load: only its arguments and state
    are kept; nothing of the original class runs. ``qualname`` says what it was."""

    qualname = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args = args
        obj.state = None
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:
        return f"<{self.qualname}: not loaded>"


def _stand_in(qualname: str) -> type:
    return type(qualname.rsplit(".", 1)[-1], (ForeignObject,), {"qualname": qualname})


_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+) was not an allowed global")


def _load_torch_file(path: Path, is_zip: bool) -> object:
    """torch.load(weights_only=True) with numpy allowed and stand-ins for every other foreign global."""
    allowed = [(obj, name) for name, obj in _numpy_globals().items()]
    unknown: set[str] = set()
    if is_zip:
        with torch.serialization.safe_globals(allowed):
            unknown.update(n for n in torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    for _ in range(100):  # the legacy format cannot be listed up front: learn its globals one at a time
        stand_ins = [(_stand_in(name), name) for name in sorted(unknown)]
        try:
            with torch.serialization.safe_globals(allowed + stand_ins):
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            match = _UNSUPPORTED_GLOBAL.search(str(e))
            if not match:
                raise CheckpointError(f"{path}: refused to load: {e}") from None
            name = match.group(1)
            name = name if "." in name else f"builtins.{name}"  # torch prints builtins without the module
            if name in unknown:
                raise CheckpointError(f"{path}: refused to load ({e})") from None
            unknown.add(name)
    raise CheckpointError(f"{path}: names more than 100 foreign classes; not a checkpoint sadpipe can read")


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Resolves only numpy array reconstruction, OrderedDict and _codecs.encode; refuses everything else."""

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="latin1")  # detectron2 reads its .pkl files with latin1 too
        self.path = path
        self.allowed = {**_numpy_globals(), "collections.OrderedDict": collections.OrderedDict,
                        "_codecs.encode": codecs.encode}

    def find_class(self, module: str, name: str):
        qualname = f"{module}.{name}"
        if qualname in self.allowed:
            return self.allowed[qualname]
        raise CheckpointError(f"{self.path}: the pickle names {qualname}, which sadpipe does not load (a plain "
                              "pickle may only hold numpy arrays, dicts, lists, strings and numbers)")


def read_checkpoint_file(path: str | Path) -> object:
    """The object stored in a torch file or a plain pickle, read without running code from it (module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(len(_LEGACY_TORCH_PREFIX))
    if zipfile.is_zipfile(path):
        return _load_torch_file(path, is_zip=True)
    if head == _LEGACY_TORCH_PREFIX:
        return _load_torch_file(path, is_zip=False)
    try:
        with open(path, "rb") as f:
            return _ArraysOnlyUnpickler(f, path).load()
    except CheckpointError:
        raise
    except Exception as e:  # truncated or not a pickle at all
        raise CheckpointError(f"{path}: neither a torch file nor a pickle ({type(e).__name__}: {e})") from None


def as_tensor_state(state: dict, path: Path, where: str) -> dict[str, torch.Tensor]:
    """{name: tensor} from {name: tensor or numpy array}; anything else is refused, naming the key."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: {where} is a {type(state).__name__}, expected a dict of weights")
    out = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            out[str(key)] = value
        elif isinstance(value, np.ndarray) and value.dtype.kind in "fiub":
            out[str(key)] = torch.from_numpy(np.ascontiguousarray(value))
        else:
            raise CheckpointError(f"{path}: {where}[{key!r}] is a {type(value).__name__} ({value!r:.80}), not an array")
    return out


__all__ = ["ForeignObject", "read_checkpoint_file", "as_tensor_state"]
