"""Redialling with backoff, shared by every driver that keeps a connection up
(Catalyst's ``maintain``, the mesh node's bootstrap and top-up dials)."""

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

    The mesh node keeps a link to a bootstrap address while it has fewer links than
    its target, and only a link that ended with a clean shutdown resets the backoff::

        async def until_wanted() -> None:
            while True:
                if len(self.links) >= self.dial_target:
                    self._links_low.clear()
                    await self._links_low.wait()
                elif (existing := self._link_at(address)) is not None:
                    await existing.wait_closed()
                else:
                    return

        async def use(link: Link) -> bool:
            closed = await link.wait_closed()
            return isinstance(closed, LinkClosed) and closed.code == CloseCode.SHUTDOWN

        def failed(exc: Exception, delay: float) -> None:
            self._emit("link.dial_failed", address=address, error=str(exc), retry_in=delay)

        await redial(
            lambda: self.dial(address),
            use,
            backoff=Backoff(initial=0.5, maximum=30.0),
            retry_on=(LinkFailed, OSError),
            on_failure=failed,
            until_wanted=until_wanted,
        )
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
