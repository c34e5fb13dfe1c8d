"""``trustmesh botd listen / connect / ping`` as real processes over loopback TCP."""

from __future__ import annotations

import json
import queue
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from clitools import TRUSTMESH, clean_env

from trustmesh.cli.main import EXIT_INTERRUPTED

WAIT = 15.0  # upper bound on any one process or line; each takes well under a second


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TRUSTMESH, *args],
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
        env=clean_env(),
    )


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


def assert_one_line_error(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 1, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("trustmesh: error: ")
    assert "Traceback" not in result.stderr


@dataclass(frozen=True)
class Identity:
    path: str
    public_key: str


@pytest.fixture(scope="module")
def identities(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Identity]:
    """Key files a (client), b (listener) and c (a stranger), made by the CLI."""
    folder = tmp_path_factory.mktemp("botd-keys")
    made = {}
    for name in ("a", "b", "c"):
        path = folder / f"{name}.key"
        result = run(
            "keys", "generate", "--type", "secp256k1", "--out", str(path), "--no-encrypt", "--json"
        )
        assert result.returncode == 0, result.stderr
        public_key = json.loads(result.stdout)["public_key"]
        assert len(public_key) == 66
        made[name] = Identity(str(path), public_key)
    return made


class Listener:
    """A running ``botd listen``; a thread turns its stdout into a queue of lines."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.events: list[dict[str, Any]] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()
        listening = self.next_event()
        assert listening["event"] == "listening", listening
        self.port: int = listening["port"]
        self.public_key: str = listening["public_key"]
        assert self.port > 0

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def next_event(self, timeout: float = WAIT) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no output from the listener in {timeout} s") from None
        assert line is not None, f"the listener exited: {self.proc.poll()}"
        event: dict[str, Any] = json.loads(line)
        self.events.append(event)
        return event

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        deadline = time.monotonic() + WAIT
        while True:
            event = self.next_event(max(deadline - time.monotonic(), 0.01))
            if predicate(event):
                return event

    def interrupt(self) -> int:
        """SIGINT; return the exit code once it has stopped, with all output read."""
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(timeout=WAIT)
        self._reader.join(WAIT)
        while (line := self._lines.get_nowait()) is not None:
            self.events.append(json.loads(line))
        return code


@pytest.fixture
def listen(identities: dict[str, Identity], tmp_path: Path) -> Iterator[Callable[..., Listener]]:
    procs: list[subprocess.Popen[str]] = []

    def start(*extra: str) -> Listener:
        with (tmp_path / f"listen{len(procs)}.err").open("w") as stderr:
            proc = subprocess.Popen(
                [TRUSTMESH, "botd", "listen", "--key", identities["b"].path, "--port", "0", *extra],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                env=clean_env(),
            )
        procs.append(proc)
        return Listener(proc)

    try:
        yield start
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=WAIT)
            assert proc.stdout is not None
            proc.stdout.close()


def ping(listener_address: str, key: Identity, peer_key: str) -> subprocess.CompletedProcess[str]:
    return run(
        "botd",
        "ping",
        listener_address,
        "--key",
        key.path,
        "--peer-key",
        peer_key,
        "--timeout",
        "5",
    )


def test_ping_prints_one_pong_line(
    listen: Callable[..., Listener], identities: dict[str, Identity]
) -> None:
    listener = listen("--echo")
    assert listener.public_key == identities["b"].public_key
    result = ping(listener.address, identities["a"], identities["b"].public_key)
    assert result.returncode == 0, result.stderr
    (pong,) = json_lines(result.stdout)
    assert pong["event"] == "pong"
    assert isinstance(pong["rtt_ms"], int | float)
    assert pong["rtt_ms"] >= 0
    assert pong["peer_key"] == identities["b"].public_key
    assert result.stderr == ""


def test_ping_with_the_wrong_peer_key_fails(
    listen: Callable[..., Listener], identities: dict[str, Identity]
) -> None:
    listener = listen("--echo")
    result = ping(listener.address, identities["a"], identities["c"].public_key)
    assert_one_line_error(result)
    assert result.stdout == ""
    # The listener refused the Init (addressed to another key) and says so.
    closed = listener.wait_for(lambda e: e["event"] == "closed")
    assert closed["peer_key"] is None
    assert "another recipient" in closed["reason"]
    assert closed["error"] is True


def test_ping_with_nothing_listening_fails(identities: dict[str, Identity]) -> None:
    with socket.socket() as bound:  # bound, never listening: connecting is refused
        bound.bind(("127.0.0.1", 0))
        port = bound.getsockname()[1]
        result = ping(f"127.0.0.1:{port}", identities["a"], identities["b"].public_key)
    assert_one_line_error(result)
    assert result.stdout == ""


def test_connect_sends_stdin_lines_and_prints_the_echoes(
    listen: Callable[..., Listener], identities: dict[str, Identity]
) -> None:
    listener = listen("--echo")
    b = identities["b"].public_key
    result = run(
        "botd",
        "connect",
        listener.address,
        "--key",
        identities["a"].path,
        "--peer-key",
        b,
        stdin="hello\nworld\n",
    )
    assert result.returncode == 0, result.stderr
    events = json_lines(result.stdout)
    assert [e["event"] for e in events] == ["established", "message", "message", "closed"]
    assert events[0]["peer_key"] == b
    assert [e["data"] for e in events[1:3]] == ["hello", "world"]
    assert all(e["peer_key"] == b for e in events[1:3])
    assert events[3]["error"] is False
    assert events[3]["reason"] == "end of input"


def test_listen_allow_list_refuses_other_keys(
    listen: Callable[..., Listener], identities: dict[str, Identity]
) -> None:
    listener = listen("--echo", "--allow", identities["c"].public_key)
    result = ping(listener.address, identities["a"], identities["b"].public_key)
    assert_one_line_error(result)
    closed = listener.wait_for(lambda e: e["event"] == "closed")
    assert closed["peer_key"] is None
    assert "allow-list" in closed["reason"]
    assert isinstance(closed["remote"], str)
    assert closed["remote"].startswith("127.0.0.1:")
    assert listener.interrupt() == EXIT_INTERRUPTED
    assert not [e for e in listener.events if e["event"] == "established"]


def test_listener_reports_sessions_and_stops_on_sigint(
    listen: Callable[..., Listener], identities: dict[str, Identity]
) -> None:
    listener = listen("--echo")
    a, b = identities["a"], identities["b"].public_key
    talk = run(
        "botd", "connect", listener.address, "--key", a.path, "--peer-key", b, stdin="hi there\n"
    )
    assert talk.returncode == 0, talk.stderr
    first_closed = listener.wait_for(lambda e: e["event"] == "closed")
    assert ping(listener.address, a, b).returncode == 0
    second_closed = listener.wait_for(lambda e: e["event"] == "closed")

    started = time.monotonic()
    assert listener.interrupt() == EXIT_INTERRUPTED
    assert time.monotonic() - started < WAIT

    kinds = [e["event"] for e in listener.events]
    assert kinds == ["listening", "established", "message", "closed", "established", "closed"]
    established = [e for e in listener.events if e["event"] == "established"]
    assert all(e["peer_key"] == a.public_key for e in established)
    assert all(e["remote"].startswith("127.0.0.1:") for e in established)
    message = next(e for e in listener.events if e["event"] == "message")
    assert message == {"event": "message", "peer_key": a.public_key, "data": "hi there"}
    for closed, why in ((first_closed, "end of input"), (second_closed, "closed by application")):
        assert closed["peer_key"] == a.public_key
        assert closed["reason"] == f"peer closed: {why}"
        assert closed["error"] is False
        assert closed["by_peer"] is True


def test_bad_usage(identities: dict[str, Identity]) -> None:
    bad = run("botd", "ping", "127.0.0.1:1", "--key", identities["a"].path, "--peer-key", "nothex")
    assert bad.returncode == 2
    assert "not a secp256k1 public key" in bad.stderr
    assert "Traceback" not in bad.stderr

    helped = run("botd", "listen", "--help")
    assert helped.returncode == 0
    for event in ("listening", "established", "message", "closed"):
        assert event in helped.stdout


def test_a_bare_port_is_a_usage_error(identities: dict[str, Identity]) -> None:
    # Read as a host, "20945" is an IPv4 address (0.0.81.209) in inet_aton's short form:
    # the ping went there on port 9945 and failed with a protobuf parse error.
    a, b = identities["a"], identities["b"].public_key
    for command in ("ping", "connect"):
        bare = run("botd", command, "20945", "--key", a.path, "--peer-key", b)
        assert bare.returncode == 2, bare.stderr
        assert "got a bare port '20945' (for this machine: 127.0.0.1:20945)" in bare.stderr
        assert "Traceback" not in bare.stderr
    helped = run("botd", "ping", "--help")
    assert "a bare port is refused" in helped.stdout


def test_listener_stopped_by_sigterm_exits_0(
    listen: Callable[..., Listener], identities: dict[str, Identity]
) -> None:
    listener = listen()
    listener.proc.send_signal(signal.SIGTERM)  # a service manager's stop: not an interrupt
    assert listener.proc.wait(timeout=WAIT) == 0
