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
import socket
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
            # TCP first, then the protocol: uvloop would make the protocol (and so the
            # handle) before connecting, and a refused dial would leave an event behind.
            sock = await _connected_socket(loop, host, port, local_addr)
            try:
                await loop.create_connection(protocol, sock=sock)
            except BaseException:
                sock.close()
                raise
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


async def _connected_socket(
    loop: asyncio.AbstractEventLoop,
    host: str,
    port: int,
    local_addr: tuple[str, int] | None,
) -> socket.socket:
    """A non-blocking TCP socket connected to ``host:port`` (each address in turn, as
    ``loop.create_connection`` tries them), bound to ``local_addr`` when given."""
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    if not infos:
        raise OSError(f"getaddrinfo({host!r}) returned no address")
    local_infos = None
    if local_addr is not None:
        local_infos = await loop.getaddrinfo(*local_addr, type=socket.SOCK_STREAM)
    errors: list[OSError] = []
    for family, kind, proto, _, address in infos:
        try:
            # Inside the try, as create_connection does: a family this host lacks (::1
            # without IPv6) moves on to the next address.
            sock = socket.socket(family, kind, proto)
        except OSError as exc:
            errors.append(exc)
            continue
        try:
            sock.setblocking(False)
            if local_infos is not None:
                local = next((info[4] for info in local_infos if info[0] == family), None)
                if local is None:
                    raise OSError(f"no local address of family {family!r} in {local_addr}")
                sock.bind(local)
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            errors.append(exc)
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    if len(errors) == 1:
        raise errors[0]
    raise OSError(f"Multiple exceptions: {', '.join(str(exc) for exc in errors)}")
