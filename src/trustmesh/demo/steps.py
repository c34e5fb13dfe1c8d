"""What every demo step reports, and how a check fails it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Step:
    name: str
    ok: bool
    detail: str
    seconds: float = 0.0
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "ok": self.ok,
            "seconds": round(self.seconds, 3),
            "detail": self.detail,
            **self.data,
        }


class DemoFailure(Exception):
    """A check in a demo step did not hold."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise DemoFailure(message)
