"""What a configuration field says about itself: the values it accepts, whether a resumed run may change it, and
whether the sensitivity method's shared scoring depends on it. Data on the field (dataclass metadata), read by
walking the dataclasses: no list of dotted key strings to keep in step with them.

``option(default, bound=..., resume_free=..., scoring_free=...)`` declares a field; `flagged` lists the dotted keys
with a flag (a flag on a section covers every key in it), `bounds` the numeric bounds.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterator
from dataclasses import MISSING, dataclass
from typing import Any

RESUME_FREE = "resume_free"  # where files, services and logs go, retries, a study's grid: a resume may change it
SCORING_FREE = "scoring_free"  # the sensitivity method's pre-training and scores do not depend on it
BOUND, ITEM_BOUND = "bound", "item_bound"


@dataclass(frozen=True)
class Bound:
    """The values a numeric key accepts: ``low``/``high`` (None: unbounded), each end open or closed; ``why`` is
    the consequence a refused value would have had, when it is not obvious."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    why: str = ""

    def admits(self, v: float) -> bool:
        return (self.low is None or (v > self.low if self.low_open else v >= self.low)) and \
            (self.high is None or (v < self.high if self.high_open else v <= self.high))

    def __str__(self) -> str:
        low = "(-inf" if self.low is None else f"{'(' if self.low_open else '['}{self.low:g}"
        high = "inf)" if self.high is None else f"{self.high:.10g}{')' if self.high_open else ']'}"
        return f"{low}, {high}"


POSITIVE, NON_NEGATIVE, FRACTION = Bound(0, None, low_open=True), Bound(0), Bound(0, 1, high_open=True)
OPEN_FRACTION = Bound(0, 1, low_open=True, high_open=True)
SEED = Bound(0, 2**32 - 1)  # numpy's SeedSequence and torch's manual_seed both take these


def option(default: Any = MISSING, *, factory: Any = MISSING, bound: Bound | None = None,
           item_bound: Bound | None = None, resume_free: bool = False, scoring_free: bool = False) -> Any:
    """A dataclass field with its metadata: ``bound`` (a numeric field; None allowed where the type allows it),
    ``item_bound`` (each number of a list), ``resume_free``, ``scoring_free`` (module docstring)."""
    metadata = {BOUND: bound, ITEM_BOUND: item_bound, RESUME_FREE: resume_free, SCORING_FREE: scoring_free}
    return dataclasses.field(default=default, default_factory=factory, metadata=metadata)


def _fields(cls: type, prefix: str = "", inherited: frozenset = frozenset()) -> Iterator[tuple[str, Any, set]]:
    """(dotted key, dataclass field, flags from it and its sections) of every leaf field of ``cls``."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flags = set(inherited) | {k for k in (RESUME_FREE, SCORING_FREE) if f.metadata.get(k)}
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            yield from _fields(kind, f"{prefix}{f.name}.", frozenset(flags))
        else:
            yield f"{prefix}{f.name}", f, flags


def flagged(cls: type, flag: str) -> tuple[str, ...]:
    """The dotted keys of ``cls`` with ``flag`` (`RESUME_FREE`, `SCORING_FREE`), set on them or on their section."""
    return tuple(key for key, _, flags in _fields(cls) if flag in flags)


def bounds(cls: type, item: bool = False) -> dict[str, Bound]:
    """``{dotted key: Bound}`` of the numeric fields of ``cls`` (``item``: of the lists' numbers)."""
    which = ITEM_BOUND if item else BOUND
    return {key: f.metadata[which] for key, f, _ in _fields(cls) if f.metadata.get(which) is not None}


def numeric_keys(cls: type) -> list[str]:
    """The dotted keys of the int and float fields of ``cls`` (optional ones included): what must have a bound."""
    out = []
    for key, f, _ in _fields(cls):
        kind = typing.get_type_hints(_owner(cls, key))[f.name]
        args = set(typing.get_args(kind)) if typing.get_origin(kind) in (typing.Union, types.UnionType) else {kind}
        if args & {int, float} and args <= {int, float, type(None)}:
            out.append(key)
    return out


def _owner(cls: type, key: str) -> type:
    for part in key.split(".")[:-1]:
        cls = typing.get_type_hints(cls)[part]
    return cls


def under(key: str, prefixes: tuple[str, ...]) -> bool:
    """``key`` is one of ``prefixes`` or lies inside one of them (``tracking.uri`` under ``tracking``)."""
    return any(key == p or key.startswith(p + ".") for p in prefixes)
