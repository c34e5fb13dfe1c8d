"""Shared benchmark machinery: interleaved timing, results, and output."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import NamedTuple


class Comparison(NamedTuple):
    """Rounds of a subject and its anchor measured alternately: the median rate of each,
    and the median of the per-round ratios (each round's subject over the anchor measured
    next to it). The paired ratio is the figure we report: on a shared machine the speed
    of both drifts together from round to round, and a ratio of two medians taken from
    different rounds would carry that drift."""

    value: float
    anchor_value: float
    ratio: float

    @classmethod
    def of(cls, subject_rates: list[float], anchor_rates: list[float]) -> Comparison:
        if len(subject_rates) != len(anchor_rates) or not subject_rates:
            raise ValueError("a comparison needs one anchor round for each subject round")
        ratios = [
            s / a if a else float("nan") for s, a in zip(subject_rates, anchor_rates, strict=True)
        ]
        return cls(
            statistics.median(subject_rates),
            statistics.median(anchor_rates),
            statistics.median(ratios),
        )


@dataclass(frozen=True)
class Result:
    metric: str
    value: float
    unit: str
    anchor: str
    anchor_value: float
    paired_ratio: float | None = None  # a Comparison's ratio, where the rounds were paired

    @classmethod
    def of(cls, metric: str, comparison: Comparison, unit: str, anchor: str) -> Result:
        return cls(
            metric, comparison.value, unit, anchor, comparison.anchor_value, comparison.ratio
        )

    @property
    def ratio(self) -> float:
        if self.paired_ratio is not None:
            return self.paired_ratio
        return self.value / self.anchor_value if self.anchor_value else float("nan")

    def to_json(self) -> dict[str, object]:
        data: dict[str, object] = asdict(self)
        del data["paired_ratio"]
        data["ratio"] = round(self.ratio, 4)
        return data


def rate(fn: Callable[[], None], *, work: float, min_time: float = 0.05) -> float:
    """Run ``fn`` until ``min_time`` has passed; return ``work`` units per second per call."""
    calls = 0
    start = time.perf_counter()
    deadline = start + min_time
    while True:
        fn()
        calls += 1
        now = time.perf_counter()
        if now >= deadline:
            return calls * work / (now - start)


def compare(
    subject: Callable[[], None],
    anchor: Callable[[], None],
    *,
    work: float,
    rounds: int = 7,
    min_time: float = 0.05,
) -> Comparison:
    """Rates of ``subject`` and ``anchor``, measured in alternating rounds (anchor first)
    so that machine noise hits both alike."""
    subject_rates, anchor_rates = [], []
    for _ in range(rounds):
        anchor_rates.append(rate(anchor, work=work, min_time=min_time))
        subject_rates.append(rate(subject, work=work, min_time=min_time))
    return Comparison.of(subject_rates, anchor_rates)


def compare_rates(
    subject: Callable[[], float],
    anchor: Callable[[], float],
    *,
    rounds: int = 5,
) -> Comparison:
    """Like :func:`compare` for callables that measure and return their own rate (e.g. an
    anchor in another process): ``subject`` and ``anchor`` called alternately, anchor
    first, ``rounds`` times."""
    subject_rates, anchor_rates = [], []
    for _ in range(rounds):
        anchor_rates.append(anchor())
        subject_rates.append(subject())
    return Comparison.of(subject_rates, anchor_rates)


def report(
    name: str,
    results: list[Result],
    *,
    as_json: bool,
    info: dict[str, object] | None = None,
) -> str:
    """The figures as one JSON object or as text. ``info``: facts about the run (the event
    loop, say), top-level fields of the JSON object and a line of the text."""
    facts = info or {}
    if as_json:
        return json.dumps({"bench": name, **facts, "results": [r.to_json() for r in results]})
    lines = [f"bench {name}"]
    if facts:
        lines.append("  " + ", ".join(f"{key}: {value}" for key, value in facts.items()))
    for r in results:
        lines.append(
            f"  {r.metric:<28} {r.value:>12.1f} {r.unit:<8} "
            f"anchor {r.anchor} {r.anchor_value:>10.1f}   ratio {r.ratio:.3f}"
        )
    return "\n".join(lines)
