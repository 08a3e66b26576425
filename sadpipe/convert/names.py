"""Two-way renaming of parameters between a foreign checkpoint and sadpipe's (torchvision's) RetinaNet.

A converter writes one table of name pairs, e.g.
``("neck.lateral_convs.{level}.conv.{param}", "backbone.fpn.inner_blocks.{level}.0.{param}")``,
and one :class:`Field` per placeholder. The same table renames a file's parameters to torchvision's
when loading and names a torchvision parameter as the file calls it in messages, so the two
directions cannot drift apart.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..models import CheckpointError

__all__ = ["Field", "NameMap"]


@dataclass(frozen=True)
class Field:
    """A placeholder of the name templates: the regex its value matches on each side and how a
    value crosses over (both identity unless given)."""

    file: str
    torchvision: str | None = None  # None: the same pattern as in the file
    to_torchvision: Callable[[str], str] = str
    to_file: Callable[[str], str] = str

    @classmethod
    def shifted(cls, file: str, torchvision: str, by: int) -> "Field":
        """An index numbered differently: torchvision's index is the file's plus ``by``."""
        return cls(file, torchvision, lambda v: str(int(v) + by), lambda v: str(int(v) - by))

    def pattern(self, side: str) -> str:
        return self.file if side == "file" or self.torchvision is None else self.torchvision


def _compile(template: str, fields: Mapping[str, Field], side: str) -> re.Pattern:
    """The template as a regex: literal text escaped, each ``{name}`` a named group of its field's pattern."""
    parts = []
    for literal, name, _spec, _conv in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if name is not None:
            parts.append(f"(?P<{name}>{fields[name].pattern(side)})")
    return re.compile("".join(parts))


class NameMap:
    """Parameter names of a file <-> torchvision names, from ``(file template, torchvision template)``
    pairs; the first pair whose template matches the whole name wins."""

    def __init__(self, pairs: Sequence[tuple[str, str]], fields: Mapping[str, Field]):
        self._fields = dict(fields)
        self._pairs = [(_compile(f, fields, "file"), f, _compile(t, fields, "torchvision"), t) for f, t in pairs]

    def _cross(self, key: str, side: str) -> str | None:
        for file_re, file_t, tv_re, tv_t in self._pairs:
            pattern, target = (file_re, tv_t) if side == "file" else (tv_re, file_t)
            m = pattern.fullmatch(key)
            if m:
                convert = {n: (f.to_torchvision if side == "file" else f.to_file) for n, f in self._fields.items()}
                return target.format(**{n: convert[n](v) for n, v in m.groupdict().items()})
        return None

    def to_torchvision(self, file_key: str) -> str | None:
        """The torchvision name of a file's parameter, or None when no template matches it."""
        return self._cross(file_key, "file")

    def to_file(self, key: str) -> str:
        """The file's name of a torchvision parameter (the name itself when no template matches)."""
        return self._cross(key, "torchvision") or key

    def rename(self, state: Mapping[str, object], path: str | Path, *, suspects: str) -> dict:
        """``state`` in torchvision names; a key no template matches raises CheckpointError naming the
        first five such keys and ``suspects`` (what the file probably has instead)."""
        out, unknown = {}, []
        for key, value in state.items():
            name = self.to_torchvision(key)
            if name is None:
                unknown.append(key)
            else:
                out[name] = value
        if unknown:
            raise CheckpointError(f"{path}: parameters sadpipe's RetinaNet has no place for: {unknown[:5]} "
                                  f"({suspects}?)")
        return out
