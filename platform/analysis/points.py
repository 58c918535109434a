"""A study's points: one trial each (method, family, accuracy, cost, its target), and the helpers every analysis of
them shares (finite points, grouping by method, mean and standard deviation)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Point:
    """One trial: its method and family, final accuracy (0..1) and cost (GBOPs), and where it came from.

    ``label`` names the point within its series (the uniform format); ``target_fraction`` is its cost target as a
    fraction of the uniform-int8 cost, ``target`` the cost target itself in GBOPs (both None without a target: a
    uniform format)."""

    method: str
    family: str
    accuracy: float
    cost: float
    run_id: str = ""
    target_fraction: float | None = None
    seed: int | None = None
    label: str = ""
    target: float | None = None

    def to_dict(self) -> dict:
        """JSON-ready: ``cost`` is called ``gbops`` like the MLflow metric."""
        d = asdict(self)
        d["gbops"] = d.pop("cost")
        return d


def finite(points: Iterable[Point]) -> list[Point]:
    """The points whose accuracy and cost are finite numbers."""
    return [p for p in points if math.isfinite(p.accuracy) and math.isfinite(p.cost)]


def by_method(points: Iterable[Point]) -> dict[str, list[Point]]:
    """Points grouped by method, methods in sorted order, points in input order."""
    groups: dict[str, list[Point]] = {}
    for p in points:
        groups.setdefault(p.method, []).append(p)
    return {m: groups[m] for m in sorted(groups)}


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for one value) of a non-empty sequence."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std
