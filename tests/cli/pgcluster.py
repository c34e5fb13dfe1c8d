"""A throwaway PostgreSQL server for tests: its own cluster (``initdb``) in a temporary
directory, listening on a Unix socket only, run as our child process and stopped by
its PID. As root the server runs as the ``postgres`` user, since PostgreSQL refuses
to run as root.

    with PostgresCluster.start() as cluster:
        dsn = cluster.create_database("t1")   # a fresh, empty database
        ...

Debian's ``postgresql`` package provides the programs (``scripts/dev test`` installs
it); they live in ``/usr/lib/postgresql/<version>/bin``, which is not on PATH.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import selectors
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

SUPERUSER = "trustmesh"
START_TIMEOUT = 60.0  # seconds for the server to say it accepts connections
STOP_TIMEOUT = 30.0  # seconds for the postmaster to exit after SIGINT (fast shutdown)


class ClusterUnavailable(RuntimeError):
    """PostgreSQL's server programs are not installed here."""


def server_programs() -> Path:
    """The directory of ``initdb`` and ``postgres``: on PATH, else the newest Debian
    version's."""
    on_path = shutil.which("initdb")
    if on_path is not None:
        return Path(on_path).resolve().parent
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if not versions:
        raise ClusterUnavailable("PostgreSQL's server (initdb, postgres) is not installed")
    return versions[-1].parent


@dataclass
class PostgresCluster:
    """A cluster: ``socket_dir`` holds its socket, ``pid`` is its postmaster,
    ``process`` the child we started it as (the postmaster, or runuser around it), None
    while it is halted."""

    directory: Path
    socket_dir: Path
    pid: int
    process: subprocess.Popen[bytes] | None
    durable: bool = False  # fsync on, as a deployment runs it (benches); off for tests

    @classmethod
    def start(cls, *, durable: bool = False) -> Self:
        """initdb into a new temporary directory, then the server (:meth:`resume`);
        ``durable``: with PostgreSQL's default fsync, else (tests) without."""
        directory = Path(tempfile.mkdtemp(prefix="trustmesh-pg-"))
        sockets = directory / "run"
        sockets.mkdir()
        owner = _server_user()
        if owner is not None:
            for path in (directory, sockets):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        cluster = cls(directory, sockets, 0, None, durable)
        try:
            _run(
                [
                    str(server_programs() / "initdb"),
                    "--pgdata",
                    str(directory / "data"),
                    "--username",
                    SUPERUSER,
                    "--auth",
                    "trust",
                    "--encoding",
                    "UTF8",
                    "--no-sync",
                ],
                owner,
            )
            cluster.resume()
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        return cluster

    def resume(self) -> None:
        """Start the server on the cluster's data, as our child (so that its exit is
        ours to reap), and return once it accepts connections: it is built with systemd
        support, and sends ``READY=1`` to ``$NOTIFY_SOCKET`` then."""
        data = self.directory / "data"
        notify_path = self.directory / "notify"
        notify_path.unlink(missing_ok=True)
        process: subprocess.Popen[bytes] | None = None
        try:
            with contextlib.closing(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)) as notify:
                notify.bind(str(notify_path))
                os.chmod(notify_path, 0o666)  # the server's user writes to it
                # No TCP at all: the Unix socket in our own directory is the only way in.
                command = [
                    str(server_programs() / "postgres"),
                    "-D",
                    str(data),
                    "-c",
                    "listen_addresses=",
                    "-k",
                    str(self.socket_dir),
                    *([] if self.durable else ["-c", "fsync=off"]),
                ]
                with open(self.directory / "server.log", "ab") as log:
                    process = subprocess.Popen(
                        _as(_server_user(), command),
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env={**os.environ, "NOTIFY_SOCKET": str(notify_path)},
                        start_new_session=True,  # its own group: killed whole if need be
                    )
                _wait_ready(notify, process, self.directory / "server.log")
            self.pid = int((data / "postmaster.pid").read_text().split("\n", 1)[0])
        except BaseException:
            if process is not None:
                _kill_group(process)
            raise
        self.process = process

    def halt(self) -> None:
        """Fast shutdown (SIGINT to the postmaster: sessions are ended, transactions
        rolled back), waited for; SIGKILL to its group after ``STOP_TIMEOUT``. The data
        stays, for :meth:`resume`."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGINT)
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            _kill_group(self.process)
        self.process = None

    def dsn(self, database: str = "postgres") -> str:
        """A libpq connection string for ``database`` on this cluster."""
        return f"postgresql:///{database}?host={self.socket_dir}&user={SUPERUSER}"

    def create_database(self, name: str) -> str:
        """A new empty database; its DSN."""
        import psycopg

        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
            raise ValueError(f"{name!r} is not a plain database name")
        with psycopg.connect(self.dsn(), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def stop(self) -> None:
        """:meth:`halt`, then the directory goes."""
        try:
            self.halt()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def _wait_ready(notify: socket.socket, process: subprocess.Popen[bytes], log: Path) -> None:
    """Until the server sends ``READY=1``; raise if it exits or stays silent."""
    with selectors.DefaultSelector() as selector:
        exited = os.pidfd_open(process.pid)
        try:
            selector.register(notify, selectors.EVENT_READ)
            selector.register(exited, selectors.EVENT_READ)
            deadline = time.monotonic() + START_TIMEOUT
            while (left := deadline - time.monotonic()) > 0:
                for key, _ in selector.select(left):
                    if key.fileobj is notify:
                        if b"READY=1" in notify.recv(4096).split(b"\n"):
                            return
                    else:
                        process.wait()
                        raise RuntimeError(f"postgres exited at start: {log.read_text()[-2000:]}")
        finally:
            os.close(exited)
    raise RuntimeError(f"postgres was not ready within {START_TIMEOUT} s")


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL to the server's whole process group (runuser, the postmaster and its
    children), then reap our child."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _server_user() -> pwd.struct_passwd | None:
    """The user the server runs as: ``postgres`` when we are root, else ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise ClusterUnavailable("running as root, and there is no postgres user") from None


def _as(owner: pwd.struct_passwd | None, command: list[str]) -> list[str]:
    return command if owner is None else ["runuser", "-u", owner.pw_name, "--", *command]


def _run(command: list[str], owner: pwd.struct_passwd | None) -> None:
    command = _as(owner, command)
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"{command[0]} failed ({done.returncode}): {done.stderr.strip()}")
