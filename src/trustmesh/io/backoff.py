"""Redialling with backoff for a driver that keeps one connection up (Catalyst's
``maintain``). The mesh node decides its redials in its sans-IO core instead
(``trustmesh.mesh.node``: one cooldown per address, the same doubling), because there
the choice of whom to dial is policy, not plumbing."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import NoReturn, TypeVar

__all__ = ["Backoff", "redial"]

H = TypeVar("H")


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


async def redial(
    connect: Callable[[], Awaitable[H]],
    use: Callable[[H], Awaitable[bool]],
    *,
    backoff: Backoff,
    retry_on: tuple[type[Exception], ...] = (OSError,),
    on_failure: Callable[[Exception, float], None] | None = None,
    until_wanted: Callable[[], Awaitable[None]] | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> NoReturn:
    """Keep a connection up until cancelled.

    Each round waits for ``until_wanted()`` (if given), then ``connect()``s. A failure
    of a type in ``retry_on`` goes to ``on_failure(error, delay)`` and the next round
    starts after ``delay``, the backoff's next; any other error ends the loop. A
    connection goes to ``use(connection)``, which returns when it has ended: True
    starts the delays afresh (it ran its course), False keeps them growing. Either way
    the next round waits the backoff's next delay. ``sleep`` is injected for tests.

    Catalyst's ``CatalystNode.maintain`` is the caller: ``use`` waits for the session
    to end and says whether it ended cleanly.
    """
    while True:
        if until_wanted is not None:
            await until_wanted()
        try:
            connection = await connect()
        except retry_on as exc:
            delay = backoff.next_delay()
            if on_failure is not None:
                on_failure(exc, delay)
            await sleep(delay)
            continue
        if await use(connection):
            backoff.reset()
        await sleep(backoff.next_delay())
