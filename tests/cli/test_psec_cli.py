"""`trustmesh psec listen` and `connect` as a user runs them: real UDP on loopback, JSON
lines, exit codes."""

from __future__ import annotations

import datetime
import json
import queue
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from clitools import TRUSTMESH
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from meshtools import LivePki

from trustmesh.cli.psec import CrlWatch
from trustmesh.pki.ca import CertificateAuthority
from trustmesh.psec.identity import peer_id_of
from trustmesh.tls.errors import TlsConfigError

WAIT = 30.0


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[CertificateAuthority]:
    """The mesh CA; node-a's files in tmp_path/a, node-b's in tmp_path/b."""
    ca = CertificateAuthority.init(tmp_path / "ca", None, name="psec cli CA")
    pki = LivePki(ca)
    pki.config("node-a", tmp_path / "a")
    pki.config("node-b", tmp_path / "b")
    yield ca
    ca.close()


@pytest.fixture
def certs(tmp_path: Path, mesh: CertificateAuthority) -> Path:
    return tmp_path


def identity(directory: Path) -> list[str]:
    return [
        "--cert", str(directory / "node.crt"),
        "--key", str(directory / "node.key"),
        "--ca", str(directory / "ca.crt"),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("host", "schemes", "expected"),
    [
        ("127.0.0.1", [], "/dtls/1.2"),
        ("localhost", ["--schemes", "/quic-datagram/1,/dtls/1.2"], "/quic-datagram/1"),
    ],
)
def test_connect_once_gets_its_datagram_echoed_over_an_authenticated_channel(
    certs: Path, host: str, schemes: list[str], expected: str
) -> None:
    listener = subprocess.Popen(
        [TRUSTMESH, "psec", "listen", "--port", "0", "--echo", *identity(certs / "b")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert listener.stdout is not None
        listening = json.loads(listener.stdout.readline())
        assert listening["event"] == "listening"
        client = subprocess.run(
            [TRUSTMESH, "psec", "connect", f"{host}:{listening['port']}", "--once",
             *schemes, *identity(certs / "a")],
            input="hello psec\n",
            capture_output=True,
            text=True,
            timeout=WAIT,
        )  # fmt: skip
        assert client.returncode == 0, client.stderr
        events = [json.loads(line) for line in client.stdout.splitlines()]
        negotiated = next(e for e in events if e["event"] == "negotiated")
        assert negotiated["scheme"] == expected and negotiated["initiator"] is True
        assert negotiated["peer_id"] == listening["peer_id"]
        assert negotiated["peer_node_id"] == "node-b"
        assert {"event": "datagram", "data": "hello psec"}.items() <= events[-1].items()
        seen = json.loads(listener.stdout.readline())
        assert seen["event"] == "negotiated" and seen["initiator"] is False
        assert seen["peer_node_id"] == "node-a"
    finally:
        listener.terminate()
        listener.wait(timeout=WAIT)
        if listener.stdout is not None:
            listener.stdout.close()


def test_connect_exits_1_when_no_channel_comes_up_in_time(certs: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))  # a port where nobody answers
        port = silent.getsockname()[1]
        client = subprocess.run(
            [TRUSTMESH, "psec", "connect", f"127.0.0.1:{port}", "--once", "--timeout", "1",
             *identity(certs / "a")],
            input="x\n",
            capture_output=True,
            text=True,
            timeout=WAIT,
        )  # fmt: skip
    assert client.returncode == 1
    assert json.loads(client.stdout.splitlines()[-1])["event"] == "closed"


def test_an_unavailable_scheme_is_a_usage_error(certs: Path) -> None:
    result = subprocess.run(
        [TRUSTMESH, "psec", "connect", "127.0.0.1:9", "--schemes", "/nope/1",
         *identity(certs / "a")],
        capture_output=True,
        text=True,
        timeout=WAIT,
    )  # fmt: skip
    assert result.returncode == 2 and "not available" in result.stderr


def test_simultaneous_without_a_local_port_is_a_usage_error(certs: Path) -> None:
    result = subprocess.run(
        [TRUSTMESH, "psec", "connect", "127.0.0.1:9", "--simultaneous", *identity(certs / "a")],
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert result.returncode == 2 and "--simultaneous needs --port" in result.stderr


def test_a_key_file_others_may_read_is_refused(certs: Path) -> None:
    # As `keys show` refuses it; before, connect and listen took it as it was.
    key = certs / "a" / "node.key"
    key.chmod(0o644)
    for where in (["connect", "127.0.0.1:9"], ["listen", "--port", "0"]):
        result = subprocess.run(
            [TRUSTMESH, "psec", *where, *identity(certs / "a")],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=WAIT,
        )
        assert result.returncode == 1, result
        assert result.stderr.strip() == (
            f"trustmesh: error: {key} has mode 0644; a private key must be private"
            f" (chmod 600 {key})"
        )


def test_a_bare_port_is_a_usage_error(certs: Path) -> None:
    result = subprocess.run(
        [TRUSTMESH, "psec", "connect", "9443", *identity(certs / "a")],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert result.returncode == 2
    assert "got a bare port '9443' (for this machine: 127.0.0.1:9443)" in result.stderr


# --- simultaneous negotiation -----------------------------------------------------------


def free_udp_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 now (held together, so they differ)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def peer_id(directory: Path) -> int:
    return int(peer_id_of(x509.load_pem_x509_certificate((directory / "node.crt").read_bytes())))


def test_two_simultaneous_connects_come_up_on_the_tie_rule_and_echo(certs: Path) -> None:
    """Each side dials the other's port from its own; neither listens. Whichever starts
    first, its first proposal goes to a port not bound yet, and is lost."""
    port_a, port_b = free_udp_ports(2)
    echoer = subprocess.Popen(
        [TRUSTMESH, "psec", "connect", f"127.0.0.1:{port_b}", "--port", str(port_a),
         "--simultaneous", "--echo", "--once", *identity(certs / "a")],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        sender = subprocess.run(
            [TRUSTMESH, "psec", "connect", f"127.0.0.1:{port_a}", "--port", str(port_b),
             "--simultaneous", "--once", *identity(certs / "b")],
            input="hello simultaneous\n",
            capture_output=True,
            text=True,
            timeout=WAIT,
        )  # fmt: skip
        echoed_out, echoed_err = echoer.communicate(timeout=WAIT)
    finally:
        if echoer.poll() is None:
            echoer.kill()
            echoer.communicate()
    assert sender.returncode == 0, sender.stdout + sender.stderr
    assert echoer.returncode == 0, echoed_out + echoed_err
    theirs = [json.loads(line) for line in sender.stdout.splitlines()]
    ours = [json.loads(line) for line in echoed_out.splitlines()]
    # The echoer exits once it echoed, closing its channel: the sender may hear it.
    assert [e["event"] for e in theirs] in (
        ["negotiated", "datagram"],
        ["negotiated", "datagram", "closed"],
    )
    assert theirs[-1]["event"] != "closed" or theirs[-1]["reason"] == "peer closed the channel"
    # And the sender exits once it has the echo, closing its own: the echoer may hear
    # that before it is done (a race the two processes run, not a fault).
    assert [e["event"] for e in ours] in (
        ["negotiated", "datagram"],
        ["negotiated", "datagram", "closed"],
    )
    assert ours[-1]["event"] != "closed" or ours[-1]["reason"] == "peer closed the channel"
    a_up, b_up = ours[0], theirs[0]
    assert a_up["scheme"] == b_up["scheme"] == "/dtls/1.2"
    assert a_up["peer_node_id"] == "node-b" and b_up["peer_node_id"] == "node-a"
    assert a_up["remote"] == f"127.0.0.1:{port_b}" and b_up["remote"] == f"127.0.0.1:{port_a}"
    # The same scheme lists: a tie, and the side with the smaller peer ID initiates.
    a_lower = peer_id(certs / "a") < peer_id(certs / "b")
    assert a_up["initiator"] is a_lower and b_up["initiator"] is not a_lower
    assert ours[1]["data"] == theirs[1]["data"] == "hello simultaneous"


# --- revocation during a channel ----------------------------------------------------------


class Process:
    """A running command whose JSON lines are read by a thread, so that a test can wait
    for the next one with a deadline."""

    def __init__(self, args: list[str], *, stdin: int | None = None) -> None:
        self.proc = subprocess.Popen(args, stdin=stdin, stdout=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def next_event(self) -> dict[str, Any]:
        line = self.lines.get(timeout=WAIT)
        assert line is not None, f"the command ended: {self.seen}"
        event: dict[str, Any] = json.loads(line)
        self.seen.append(event)
        return event

    def until(self, done: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        events = [self.next_event()]
        while not done(events[-1]):
            events.append(self.next_event())
        return events

    def send_line(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def wait(self) -> int:
        """Its exit code, once it exits by itself."""
        return self.proc.wait(timeout=WAIT)

    def close(self) -> int:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        if self.proc.poll() is None:
            self.proc.terminate()
        code = self.proc.wait(timeout=WAIT)
        self._reader.join(timeout=WAIT)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return code


def write_crl(ca: CertificateAuthority, path: Path) -> None:
    """The CA's CRL now, replacing the file atomically (as a CRL publisher should)."""
    fresh = path.with_suffix(".new")
    fresh.write_bytes(ca.crl().public_bytes(serialization.Encoding.PEM))
    fresh.replace(path)


def test_a_changed_crl_closes_the_revoked_peers_channel_and_refuses_it_after(
    mesh: CertificateAuthority, certs: Path
) -> None:
    crl = certs / "mesh.crl"
    write_crl(mesh, crl)  # nothing revoked yet
    listener = Process(
        [TRUSTMESH, "psec", "listen", "--port", "0", "--echo", "--crl", str(crl),
         *identity(certs / "b")]
    )  # fmt: skip
    client: Process | None = None
    try:
        port = listener.next_event()["port"]
        client = Process(
            [TRUSTMESH, "psec", "connect", f"127.0.0.1:{port}", *identity(certs / "a")],
            stdin=subprocess.PIPE,
        )
        assert client.next_event()["event"] == "negotiated"
        client.send_line("before")
        assert client.next_event() == {
            "event": "datagram", "data": "before", "remote": f"127.0.0.1:{port}"
        }  # fmt: skip
        assert [e["event"] for e in listener.until(lambda e: e["event"] == "datagram")] == [
            "negotiated",
            "datagram",
        ]

        serial = x509.load_pem_x509_certificate((certs / "a" / "node.crt").read_bytes())
        mesh.revoke(serial=serial.serial_number)
        write_crl(mesh, crl)
        update, closed = listener.next_event(), listener.next_event()
        assert update["event"] == "crl" and update["revoked"] == 1
        assert update["source"] == str(crl)
        assert closed["event"] == "closed"
        assert closed["reason"] == "the peer's certificate was revoked"
        # The listener's close reaches the client: its channel ends, and so does it.
        assert client.next_event() == {
            "event": "closed", "reason": "peer closed the channel", "remote": f"127.0.0.1:{port}"
        }  # fmt: skip
        assert client.wait() == 1

        # A new handshake of the revoked certificate is refused too.
        again = subprocess.run(
            [TRUSTMESH, "psec", "connect", f"127.0.0.1:{port}", "--once", "--timeout", "5",
             *identity(certs / "a")],
            input="after\n",
            capture_output=True,
            text=True,
            timeout=WAIT,
        )  # fmt: skip
        assert again.returncode == 1
        events = [json.loads(line) for line in again.stdout.splitlines()]
        assert [e["event"] for e in events] == ["closed"]
        refused = listener.next_event()
        assert refused["event"] == "closed" and "revoked" in refused["reason"]
    finally:
        if client is not None:
            client.close()
        listener.close()


def test_a_crl_file_is_read_again_only_when_it_changes_and_only_if_acceptable(
    mesh: CertificateAuthority, certs: Path, tmp_path: Path
) -> None:
    crl = certs / "mesh.crl"
    write_crl(mesh, crl)
    watch = CrlWatch(crl, certs / "b" / "node.crt", certs / "b" / "ca.crt")
    first = watch.poll()
    assert first is not None and len(first) == 0
    assert watch.poll() is None  # unchanged
    crl.write_bytes(b"not a CRL")
    with pytest.raises(ValueError):
        watch.poll()
    assert watch.crl is first  # the one in use stays
    hour_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=1)
    crl.write_bytes(mesh.crl(now=hour_ago).public_bytes(serialization.Encoding.PEM))
    with pytest.raises(TlsConfigError, match="before the one in use"):
        watch.poll()  # an old CRL replayed does not lift a revocation
    other = CertificateAuthority.init(tmp_path / "other", None, name="another CA")
    try:
        crl.write_bytes(other.crl().public_bytes(serialization.Encoding.PEM))
        with pytest.raises(TlsConfigError, match="is not in the CA bundle"):
            watch.poll()
    finally:
        other.close()
    serial = x509.load_pem_x509_certificate((certs / "a" / "node.crt").read_bytes())
    mesh.revoke(serial=serial.serial_number)
    write_crl(mesh, crl)
    assert watch.poll() is not None and watch.is_revoked(serial.serial_number)
