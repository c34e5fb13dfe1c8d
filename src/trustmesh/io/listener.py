"""A listening TCP socket under a :class:`~trustmesh.io.limits.ResourcePolicy`.

Why not ``loop.create_server``: its backlog is 100, it accepts whoever comes, and at the
descriptor limit CPython's accept loop schedules a retry for every connection left in
the backlog, which spins the CPU and floods the log. :class:`Listener` accepts one
connection at a time, asks its :class:`~trustmesh.io.limits.ConnectionTable` first
(a refused connection is reset at once, costing one descriptor for a moment). At the
descriptor limit it evicts the oldest unauthenticated connection of the busiest source
and accepts again once that socket is closed; with none to evict it pauses accepting
for ``accept_retry`` seconds. It never spins, and says so once a minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import struct
from collections.abc import Callable

from trustmesh.io.limits import Admission, ConnectionTable, LimitStats, ResourcePolicy, source_of

log = logging.getLogger("trustmesh.io.listener")

ACCEPT_BATCH = 256  # accepts per turn of the event loop
OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
ProtocolFactory = Callable[[Admission], asyncio.Protocol]


class Listener:
    """Accepts connections for ``protocol_factory(admission)`` until :meth:`close`."""

    def __init__(
        self,
        protocol_factory: ProtocolFactory,
        policy: ResourcePolicy | None = None,
        *,
        name: str = "listener",
    ) -> None:
        self.policy = policy or ResourcePolicy()
        self.stats = LimitStats(name)
        self.table = ConnectionTable(self.policy, self.stats)
        self._factory = protocol_factory
        self._socket: socket.socket | None = None
        self._port: int | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return (self._socket,) if self._socket is not None else ()

    @property
    def port(self) -> int:
        """The port it listens (or listened) on; useful after binding port 0."""
        if self._port is None:
            raise RuntimeError("the listener is not listening yet")
        return self._port

    async def listen(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(self.policy.backlog)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            shown = f"[{host}]" if ":" in host else host
            raise OSError(exc.errno, f"cannot listen on {shown}:{port}: {exc.strerror}") from None
        except BaseException:
            sock.close()
            raise
        self._socket = sock
        self._port = int(sock.getsockname()[1])
        self._task = loop.create_task(self._accept_loop(sock))

    def close(self) -> None:
        """Stop accepting (live connections are their owner's to close)."""
        sock = self._socket
        if sock is None:
            return
        if self._task is None:
            sock.close()
        else:
            # Closed once the accept loop has let go of it (its pending accept removed).
            self._task.add_done_callback(lambda _: sock.close())
            self._task.cancel()

    async def wait_closed(self) -> None:
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def is_serving(self) -> bool:
        return self._task is not None and not self._task.done()

    async def _accept_loop(self, sock: socket.socket) -> None:
        """Accept in batches while the socket is readable: a refusal costs one accept(),
        one table lookup and one close(), with no task switch, so a flood from one
        address does not slow the accept queue down for everyone else."""
        loop = asyncio.get_running_loop()
        readable = asyncio.Event()
        fd = sock.fileno()
        loop.add_reader(fd, readable.set)
        try:
            while True:
                await readable.wait()
                readable.clear()  # the selector is level-triggered: it sets it again
                for _ in range(ACCEPT_BATCH):
                    try:
                        conn, address = sock.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError as exc:
                        if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                            continue  # the peer gave up while it waited in the backlog
                        if exc.errno not in OUT_OF_DESCRIPTORS:
                            raise
                        await self._out_of_descriptors()
                        break
                    admission = self.table.admit(source_of(address))
                    if admission is None:
                        _reset(conn)
                    else:
                        await self._start(conn, admission)
                else:
                    await asyncio.sleep(0)  # a full batch: let the connections run
        finally:
            loop.remove_reader(fd)
            sock.close()  # an accept loop that fails ends the listener

    async def _out_of_descriptors(self) -> None:
        if self.table.evict_for_descriptors():
            # Its socket closes on the loop's next turn; then accept again.
            self.stats.hit("descriptors", "*", "evicting unauthenticated peers")
            await asyncio.sleep(0)
        else:
            self.stats.hit("descriptors", "*", "accepting paused")
            await asyncio.sleep(self.policy.accept_retry)

    async def _start(self, conn: socket.socket, admission: Admission) -> None:
        conn.setblocking(False)
        protocol = self._factory(admission)
        try:
            if conn.family in (socket.AF_INET, socket.AF_INET6):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await asyncio.get_running_loop().connect_accepted_socket(lambda: protocol, conn)
        except OSError as exc:  # the peer reset it before it started
            log.debug("an accepted connection failed to start: %s", exc)
            admission.release()
            conn.close()
            abandon = getattr(protocol, "abandon_if_unstarted", None)
            if abandon is not None:
                abandon()


def _reset(conn: socket.socket) -> None:
    """Close with a RST: no FIN handshake, no TIME_WAIT, nothing kept for a refusal."""
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()
