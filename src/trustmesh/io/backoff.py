"""Redial delays shared by every driver that keeps a connection up (Catalyst's
``maintain``, the mesh node's bootstrap and top-up dials)."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Exponential redial delays: ``initial``, doubling up to ``maximum``, each with up
    to ``jitter`` (a fraction) added so that a fleet does not redial in lockstep."""

    initial: float = 1.0
    maximum: float = 60.0
    jitter: float = 0.2
    rng: Callable[[], float] = field(default=random.random, repr=False)
    _failures: int = field(default=0, repr=False)

    def next_delay(self) -> float:
        base = self.initial * 2.0 ** min(self._failures, 62)
        self._failures += 1
        return min(self.maximum, base * (1 + self.jitter * self.rng()))

    def reset(self) -> None:
        self._failures = 0
