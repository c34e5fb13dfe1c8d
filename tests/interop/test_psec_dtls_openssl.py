"""Our /dtls/1.2 scheme against the openssl command line, both ways, with client
certificates from the mesh CA: `openssl s_server -dtls1_2 -Verify 1` and
`openssl s_client -dtls1_2` (real UDP on loopback)."""

from __future__ import annotations

import selectors
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from meshtools import LivePki

from trustmesh.pki.ca import CertificateAuthority
from trustmesh.psec.dtls import DtlsContext, DtlsScheme
from trustmesh.psec.scheme import SchemeData, SchemeUp
from trustmesh.sansio import Event

WAIT = 15.0


@pytest.fixture
def certs(tmp_path: Path) -> Iterator[Path]:
    ca = CertificateAuthority.init(tmp_path / "ca", None, name="dtls interop CA")
    pki = LivePki(ca)
    pki.config("node-a", tmp_path / "a")
    pki.config("node-b", tmp_path / "b")
    yield tmp_path
    ca.close()


def files(directory: Path) -> list[str]:
    # -cert takes the leaf; -cert_chain the issuing CA after it (the peer holds the root).
    return ["-cert", str(directory / "node.crt"), "-cert_chain", str(directory / "node.crt"),
            "-key", str(directory / "node.key"), "-CAfile", str(directory / "ca.crt")]  # fmt: skip


def read_until(proc: subprocess.Popen[bytes], needle: bytes, deadline: float) -> bytes:
    """Read the process's stdout until ``needle`` shows (or the deadline passes)."""
    assert proc.stdout is not None
    seen = b""
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        while needle not in seen:
            left = deadline - time.monotonic()
            if left <= 0 or not selector.select(left):
                raise TimeoutError(f"{needle!r} not seen; got {seen[-500:]!r}")
            chunk = proc.stdout.read1(4096)  # type: ignore[attr-defined]
            if not chunk:
                raise EOFError(f"openssl ended; got {seen[-500:]!r}")
            seen += chunk
    return seen


def run_scheme(
    scheme: DtlsScheme,
    sock: socket.socket,
    peer: tuple[str, int] | None,
    until: type,
    deadline: float,
) -> tuple[list[Event], tuple[str, int] | None]:
    """Drive a scheme over a UDP socket until an event of type ``until`` (or deadline)."""
    events: list[Event] = []
    while not any(isinstance(e, until) for e in events):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {until.__name__}: {events}")
        for datagram in scheme.datagrams_to_send():
            assert peer is not None
            sock.sendto(datagram, peer)
        sock.settimeout(0.1)
        try:
            data, source = sock.recvfrom(65535)
        except TimeoutError:
            events += scheme.handle_timer(time.monotonic())
            continue
        peer = peer or source
        events += scheme.receive(data, time.monotonic())
    for datagram in scheme.datagrams_to_send():
        assert peer is not None
        sock.sendto(datagram, peer)
    return events, peer


def test_our_client_against_openssl_s_server(certs: Path) -> None:
    server = subprocess.Popen(
        ["openssl", "s_server", "-dtls1_2", "-accept", "127.0.0.1:0", "-Verify", "1",
         *files(certs / "b")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + WAIT
        banner = read_until(server, b"ACCEPT", deadline)
        while b"\n" not in banner.split(b"ACCEPT", 1)[1]:
            banner += read_until(server, b"\n", deadline)
        line = banner.split(b"ACCEPT", 1)[1].split(b"\n", 1)[0]
        port = int(line.strip().rsplit(b":", 1)[1])
        client = DtlsScheme(DtlsContext(LivePki.tls(certs / "a"), server=False), initiator=True)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            client.start(time.monotonic())
            events, _ = run_scheme(client, sock, ("127.0.0.1", port), SchemeUp, deadline)
            (up,) = [e for e in events if isinstance(e, SchemeUp)]
            assert up.peer_chain[0].subject.rfc4514_string() == "CN=node-b"
            client.send(b"hello from trustmesh\n")
            for datagram in client.datagrams_to_send():
                sock.sendto(datagram, ("127.0.0.1", port))
            read_until(server, b"hello from trustmesh", deadline)
    finally:
        server.kill()
        server.wait(timeout=WAIT)
        for stream in (server.stdin, server.stdout):
            if stream is not None:
                stream.close()


def test_openssl_s_client_against_our_server(certs: Path) -> None:
    server = DtlsScheme(DtlsContext(LivePki.tls(certs / "b"), server=True), initiator=False)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        client = subprocess.Popen(
            ["openssl", "s_client", "-dtls1_2", "-connect", f"127.0.0.1:{port}",
             *files(certs / "a")],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            assert client.stdin is not None
            client.stdin.write(b"hello from openssl\n")
            client.stdin.flush()
            deadline = time.monotonic() + WAIT
            events, peer = run_scheme(server, sock, None, SchemeUp, deadline)
            (up,) = [e for e in events if isinstance(e, SchemeUp)]
            assert up.peer_chain[0].subject.rfc4514_string() == "CN=node-a"
            data = [e for e in events if isinstance(e, SchemeData)]
            if not data:
                events, _ = run_scheme(server, sock, peer, SchemeData, deadline)
                data = [e for e in events if isinstance(e, SchemeData)]
            assert data[0].data == b"hello from openssl\n"
        finally:
            client.kill()
            client.wait(timeout=WAIT)
            if client.stdin is not None:
                client.stdin.close()
