"""Dial with a deadline: connect, wait until the peer is proven, and on failure leave
no connection behind.

    session = await dial(new_session, host, port, timeout=30.0)

Catalyst's :meth:`~trustmesh.io.catalyst.CatalystNode.connect`, BOTD's
:func:`~trustmesh.io.botd.connect` and the mesh node's dials share it; the redial loop
around it is :func:`trustmesh.io.backoff.redial`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any, TypeVar

from trustmesh.io.handle import Handle
from trustmesh.io.stream import StreamDriver

__all__ = ["DEFAULT_CLOSE_TIMEOUT", "dial"]

H = TypeVar("H", bound=Handle[Any, Any])

DEFAULT_CLOSE_TIMEOUT = 5.0  # how long a failed dial waits for its socket to be released


async def dial(
    new_handle: Callable[[], H],
    host: str,
    port: int,
    *,
    timeout: float | None,  # noqa: ASYNC109 - expiry aborts with timeout_reason
    local_addr: tuple[str, int] | None = None,
    timeout_reason: str = "not up in time",
    cancel_reason: str = "dial cancelled",
    close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
) -> H:
    """Connect to ``host:port`` (from ``local_addr`` when given) and return the handle
    once :meth:`~Handle.wait_up` returns, all within ``timeout`` seconds (None:
    no limit).

    ``new_handle()`` makes the handle on a fresh driver; it is called once TCP is
    connected, so a refused connection leaves no reader task behind, and the handle
    sees every event from the first.

    Raises ``TimeoutError`` when the deadline passes, the handle's own failure when the
    connection ends before it is up, and ``OSError`` when TCP fails. Before any error
    (cancellation too) goes on, a connection still open is aborted (``timeout_reason``
    or ``cancel_reason``) and its socket released, waiting at most ``close_timeout``.
    """
    loop = asyncio.get_running_loop()
    made: list[H] = []

    def protocol() -> StreamDriver[Any]:
        made.append(new_handle())
        return made[0].driver

    try:
        async with asyncio.timeout(timeout):
            await loop.create_connection(protocol, host, port, local_addr=local_addr)
            await made[0].wait_up()
    except BaseException as exc:
        if made:
            handle = made[0]
            if not handle.driver.closed:  # one that closed by itself sends its goodbye
                handle.abort(timeout_reason if isinstance(exc, TimeoutError) else cancel_reason)
            # Bounded, as this may run on cancel; a second cancel ends the wait.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(close_timeout):
                    await handle.wait_closed()
        raise
    return made[0]
