"""`trustmesh psec listen` and `connect` as a user runs them: real UDP on loopback, JSON
lines, exit codes."""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from clitools import TRUSTMESH
from meshtools import LivePki

from trustmesh.pki.ca import CertificateAuthority

WAIT = 30.0


@pytest.fixture
def certs(tmp_path: Path) -> Iterator[Path]:
    ca = CertificateAuthority.init(tmp_path / "ca", None, name="psec cli CA")
    pki = LivePki(ca)
    pki.config("node-a", tmp_path / "a")
    pki.config("node-b", tmp_path / "b")
    yield tmp_path
    ca.close()


def identity(directory: Path) -> list[str]:
    return [
        "--cert", str(directory / "node.crt"),
        "--key", str(directory / "node.key"),
        "--ca", str(directory / "ca.crt"),
    ]  # fmt: skip


def test_connect_once_gets_its_datagram_echoed_over_an_authenticated_channel(
    certs: Path,
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
            [TRUSTMESH, "psec", "connect", f"127.0.0.1:{listening['port']}", "--once",
             *identity(certs / "a")],
            input="hello psec\n",
            capture_output=True,
            text=True,
            timeout=WAIT,
        )  # fmt: skip
        assert client.returncode == 0, client.stderr
        events = [json.loads(line) for line in client.stdout.splitlines()]
        negotiated = next(e for e in events if e["event"] == "negotiated")
        assert negotiated["scheme"] == "/dtls/1.2" and negotiated["initiator"] is True
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
