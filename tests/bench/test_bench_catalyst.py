"""The Catalyst benchmark's measurements do real work: sessions reach Established (and
resume when they should), and the anchor runs TLS 1.3 with client certificates."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from pathlib import Path

import pytest

from bench import catalyst as catalyst_bench
from trustmesh.tls import hybrid_group_available

CLIENTS = 3


@pytest.fixture
def pki(tmp_path: Path) -> catalyst_bench.Pki:
    return catalyst_bench.make_pki(tmp_path, clients=CLIENTS)


async def _round(rig: catalyst_bench.CatalystRig, per_client: int) -> float:
    await rig.start()
    try:
        async with asyncio.timeout(20):
            return await rig.round(per_client)
    finally:
        await rig.stop()


async def test_full_sessions_reach_established_on_x25519(pki: catalyst_bench.Pki) -> None:
    rig = catalyst_bench.CatalystRig(pki, post_quantum=False, resume=False)
    assert await _round(rig, 2) > 0
    assert rig.sessions == CLIENTS * 3  # the warm-up session and two measured ones
    assert rig.resumed == 0
    assert rig.groups == {"X25519": CLIENTS * 3}
    assert rig.server_node.counters.sessions_established == CLIENTS * 3
    assert sum(n.counters.sessions_established for n in rig.client_nodes) == CLIENTS * 3
    assert not rig.server_node.sessions


async def test_resumed_sessions_really_resume(pki: catalyst_bench.Pki) -> None:
    rig = catalyst_bench.CatalystRig(pki, post_quantum=False, resume=True)
    assert await _round(rig, 2) > 0
    # Only the warm-up sessions were full handshakes.
    assert rig.sessions == CLIENTS * 3
    assert rig.resumed == CLIENTS * 2
    assert rig.server_node.counters.sessions_established == CLIENTS * 3


async def test_resumed_session_reports_resumed(pki: catalyst_bench.Pki) -> None:
    rig = catalyst_bench.CatalystRig(pki, post_quantum=False, resume=True)
    await rig.start()  # one full session per client leaves a ticket
    try:
        session = await rig.client_nodes[0].connect(catalyst_bench.HOST, rig.port)
        assert session.tls is not None
        assert session.tls.resumed is True
        assert session.peer_id == catalyst_bench.SERVER_ID
        await session.close()
    finally:
        await rig.stop()


async def test_pq_sessions_use_the_hybrid_group_when_openssl_has_it(
    pki: catalyst_bench.Pki,
) -> None:
    rig = catalyst_bench.CatalystRig(pki, post_quantum=True, resume=False)
    assert await _round(rig, 1) > 0
    best = "X25519MLKEM768" if hybrid_group_available() else "X25519"
    assert rig.groups == {best: CLIENTS * 2}


async def test_anchor_runs_tls13_with_client_certificates(pki: catalyst_bench.Pki) -> None:
    anchor = catalyst_bench.AnchorRig(pki)
    await anchor.start()
    try:
        async with asyncio.timeout(20):
            assert await anchor.round(2) > 0
    finally:
        await anchor.stop()
    assert anchor.accepted == CLIENTS * 3
    assert anchor.versions == {"TLSv1.3": CLIENTS * 3}
    assert anchor.client_certificates == anchor.accepted
    assert anchor.group == "X25519"


async def test_anchor_refuses_a_client_without_certificate(pki: catalyst_bench.Pki) -> None:
    anchor = catalyst_bench.AnchorRig(pki)
    bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    bare.minimum_version = ssl.TLSVersion.TLSv1_3
    bare.load_verify_locations(pki.ca_file)
    await anchor.start()
    try:
        async with asyncio.timeout(20):
            reader, writer = await asyncio.open_connection(
                catalyst_bench.HOST, anchor.port, ssl=bare, server_hostname=catalyst_bench.SERVER_ID
            )
            # TLS 1.3: the client's handshake is over before the server checks it; the
            # server's alert then ends the connection (asyncio reports it as EOF or an error).
            with contextlib.suppress(ssl.SSLError, OSError):
                assert await reader.read() == b""
            writer.close()
            with contextlib.suppress(ssl.SSLError, OSError):
                await writer.wait_closed()
    finally:
        await anchor.stop()
    # The server never ran its handler for it: only the warm-up connections counted.
    assert anchor.accepted == anchor.client_certificates == CLIENTS


def test_negotiated_group_reads_the_server_hello(pki: catalyst_bench.Pki) -> None:
    server, clients = catalyst_bench.anchor_contexts(pki)
    assert catalyst_bench.negotiated_group(server, clients[0]) == "X25519"
    p256 = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    p256.load_verify_locations(pki.ca_file)
    p256.set_ecdh_curve("prime256v1")
    server.set_ecdh_curve("prime256v1")
    assert catalyst_bench.negotiated_group(server, p256) == "secp256r1"


def test_server_hello_parser_rejects_other_records() -> None:
    with pytest.raises(ValueError, match="ServerHello"):
        catalyst_bench._server_hello_group(b"\x17\x03\x03\x00\x10" + bytes(60))


def test_run_reports_every_metric_with_its_anchor() -> None:
    results = catalyst_bench.run(per_client=1, rounds=1, clients=2)
    metrics = ["sessions_per_s", "resumed_sessions_per_s"]
    if hybrid_group_available():
        metrics.append("sessions_per_s_pq")
    assert [r.metric for r in results] == metrics
    for result in results:
        assert result.value > 0
        assert result.anchor_value > 0
        assert result.paired_ratio is not None
        assert "X25519" in result.anchor
