"""A listening TCP socket under a :class:`~trustmesh.io.limits.ResourcePolicy`.

Why not ``loop.create_server``: its backlog is 100, it accepts whoever comes, and at the
descriptor limit CPython's accept loop schedules a retry for every connection left in
the backlog, which spins the CPU and floods the log. :class:`Listener` accepts in batches
from a reader callback, as asyncio does, but asks its
:class:`~trustmesh.io.limits.ConnectionTable` about each connection first (a refused
connection is reset at once, costing one descriptor for a moment). At the
descriptor limit it evicts the oldest unauthenticated connection of the busiest source
and accepts again once that socket is closed; with none to evict it pauses accepting
for ``accept_retry`` seconds. It never spins, and says so once a minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

from trustmesh.io.limits import Admission, ConnectionTable, LimitStats, ResourcePolicy, source_of

log = logging.getLogger("trustmesh.io.listener")

ACCEPT_BATCH = 256  # accepts per turn of the event loop
MAX_UNIX_PATH = 107  # bytes of a Unix socket path (sun_path, less its NUL) on Linux
LOCAL_SOURCE = "local"  # what every client of a Unix socket counts under
OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
ProtocolFactory = Callable[[Admission], asyncio.BaseProtocol]


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
        self._loop: asyncio.AbstractEventLoop | None = None
        self._socket: socket.socket | None = None
        self._port: int | None = None
        self._path: Path | None = None  # a Unix socket's, and its file's (st_dev, st_ino)
        self._inode: tuple[int, int] | None = None
        self._reading = False  # the socket is registered for accept
        self._resume: asyncio.TimerHandle | None = None  # accepting again after a pause
        self._starting: set[asyncio.Task[None]] = set()  # transports being set up
        self._stopped = asyncio.Event()  # set by close()

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
        self._loop = loop
        self._socket = sock
        self._port = int(sock.getsockname()[1])
        self._start_reading()

    async def listen_unix(self, path: Path, *, mode: int = 0o600) -> None:
        """Listen on a Unix socket at ``path``, its file given ``mode`` before the socket
        listens (no one connects in between); :meth:`close` removes the file. A socket
        file left behind by a process that is gone (a crash, kill -9) is replaced; one
        that a live process serves, or a file that is no socket, is refused (OSError
        EADDRINUSE). Every client counts under one source, ``local``."""
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with unix_address(path) as address:
                _clear_stale_socket(path, address)
                sock.bind(address)
            os.chmod(path, mode)
            info = os.stat(path)
            sock.listen(self.policy.backlog)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"cannot listen on {path}: {exc.strerror}") from None
        except BaseException:
            sock.close()
            raise
        self._loop = loop
        self._socket = sock
        self._port = 0
        self._path = path
        self._inode = (info.st_dev, info.st_ino)
        self._start_reading()

    @property
    def path(self) -> Path | None:
        """The Unix socket's path (None for a TCP listener)."""
        return self._path

    def close(self) -> None:
        """Stop accepting (live connections are their owner's to close); a Unix socket's
        file goes (unless another process has put its own in its place since)."""
        if self._socket is None:
            return
        self._stop_reading()
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        self._socket.close()
        self._socket = None
        if self._path is not None:
            with contextlib.suppress(OSError):
                info = os.stat(self._path)
                if (info.st_dev, info.st_ino) == self._inode:
                    os.unlink(self._path)
        self._stopped.set()

    async def wait_closed(self) -> None:
        """Wait until the connections accepted before :meth:`close` have started."""
        if self._starting:
            await asyncio.gather(*self._starting, return_exceptions=True)

    async def wait_stopped(self) -> None:
        """Wait until :meth:`close` (what an asyncio server's ``serve_forever`` does)."""
        await self._stopped.wait()

    def is_serving(self) -> bool:
        return self._socket is not None

    # --- accepting ------------------------------------------------------------------------

    def _start_reading(self) -> None:
        self._resume = None
        if self._socket is not None and self._loop is not None and not self._reading:
            self._loop.add_reader(self._socket.fileno(), self._accept_ready)
            self._reading = True

    def _stop_reading(self) -> None:
        if self._reading and self._socket is not None and self._loop is not None:
            self._loop.remove_reader(self._socket.fileno())
        self._reading = False

    def _accept_ready(self) -> None:
        """Accept a batch, synchronously, as asyncio's own server does: a refusal costs
        one accept(), one table lookup and one close(), so a flood from one address does
        not slow the accept queue down for everyone else."""
        sock, loop = self._socket, self._loop
        assert sock is not None
        assert loop is not None
        for _ in range(ACCEPT_BATCH):
            try:
                conn, address = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    continue  # the peer gave up while it waited in the backlog
                self._pause(exc)
                return
            source = LOCAL_SOURCE if self._path is not None else source_of(address)
            admission = self.table.admit(source)
            if admission is None:
                _reset(conn)
                continue
            task = loop.create_task(self._start(conn, admission))
            self._starting.add(task)
            task.add_done_callback(self._starting.discard)

    def _pause(self, exc: OSError) -> None:
        """accept() failed: out of descriptors (or worse). Stop accepting; resume once an
        evicted connection's socket is closed (the loop's next turn), or after
        ``accept_retry`` when there was none to evict. Never spin."""
        assert self._loop is not None
        self._stop_reading()
        if exc.errno in OUT_OF_DESCRIPTORS and self.table.evict_for_descriptors():
            self.stats.hit("descriptors", "*", "evicting unauthenticated peers")
            self._resume = self._loop.call_later(0, self._start_reading)
            return
        if exc.errno in OUT_OF_DESCRIPTORS:
            self.stats.hit("descriptors", "*", "accepting paused")
        else:
            self.stats.hit("accept_error", "*", str(exc))
        self._resume = self._loop.call_later(self.policy.accept_retry, self._start_reading)

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


@contextlib.contextmanager
def unix_address(path: Path) -> Iterator[str]:
    """An address for ``path`` that bind() and connect() take: the path itself, or,
    when it is longer than a Unix socket address may be, the same file reached through
    ``/proc/self/fd`` and a descriptor of its directory, held open meanwhile (Linux)."""
    if len(os.fsencode(path)) <= MAX_UNIX_PATH:
        yield str(path)
        return
    if not os.path.isdir("/proc/self/fd"):
        raise OSError(errno.ENAMETOOLONG, f"a Unix socket path is too long: {path}")
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        short = f"/proc/self/fd/{directory}/{path.name}"
        if len(os.fsencode(short)) > MAX_UNIX_PATH:
            raise OSError(errno.ENAMETOOLONG, f"a Unix socket name is too long: {path.name}")
        yield short
    finally:
        os.close(directory)


def _clear_stale_socket(path: Path, address: str) -> None:
    """Remove a socket file at ``path`` that no process serves; refuse a live one, or a
    file that is no socket (OSError EADDRINUSE)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise OSError(errno.EADDRINUSE, "a file that is no socket is in the way")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)  # a live server with a full backlog: EAGAIN, not a wait
    try:
        probe.connect(address)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)  # its process is gone
        return
    except BlockingIOError:  # a live server with a full backlog
        raise OSError(errno.EADDRINUSE, "another running process serves it (busy)") from None
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, "another running process serves it")
