"""The PKI benchmark's measurements do real work: enrollments spend their tokens and land
certificates in the CA's store, the anchor answers over trustmesh TLS with the CA's
server certificate, and every count is exact."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bench import pki as pki_bench
from bench import pki_replicas
from trustmesh.pki.ca import token_hash

CLIENTS = 3
REVOKED = 5


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[pki_bench.PkiRig]:
    rig = pki_bench.PkiRig(tmp_path, clients=CLIENTS, revoked=REVOKED)
    async with asyncio.timeout(20):
        await rig.start()
        await rig.open_keepalive()
    try:
        yield rig
    finally:
        await rig.stop()


def _clients(rig: pki_bench.PkiRig) -> tuple[pki_bench.Clients, pki_bench.Clients]:
    assert rig.fresh is not None
    assert rig.keepalive is not None
    return rig.fresh, rig.keepalive


async def test_enrollment_rounds_spend_tokens_and_store_certificates(
    rig: pki_bench.PkiRig,
) -> None:
    fresh, _ = _clients(rig)
    opened, served = fresh.opened, rig.anchor_served
    async with asyncio.timeout(20):
        assert await rig.enroll_round(2) > 0
    # The warm-up enrolled one node per client, the round two more each.
    assert len(rig.enrollments) == len(rig.enrolled) == CLIENTS * 3
    assert len(set(rig.enrolled)) == CLIENTS * 3
    issuer = rig.ca.issuing_cert.public_key()
    assert isinstance(issuer, ec.EllipticCurvePublicKey)
    for enrollment in rig.enrollments:
        token = rig.ca.store.token(token_hash(enrollment.token))
        assert token is not None
        assert token.used_at is not None  # spent
        (record,) = rig.ca.store.by_node(enrollment.node_id)
        assert record.role == "node"
        cert = x509.load_pem_x509_certificate(record.pem.encode())
        cert.verify_directly_issued_by(rig.ca.issuing_cert)
        # The certificate is for the key in the CSR the client sent.
        csr = x509.load_pem_x509_csr(json.loads(enrollment.body)["csr"].encode())
        assert cert.public_key() == csr.public_key()
    # Each enrollment had its own connection; the anchor's handler saw none of them.
    assert fresh.opened - opened == CLIENTS * 2
    assert fresh.reused == 0
    assert rig.anchor_served == served


async def test_anchor_rounds_answer_over_tls_on_fresh_connections(
    rig: pki_bench.PkiRig,
) -> None:
    fresh, _ = _clients(rig)
    opened, requests, served = fresh.opened, fresh.requests, rig.anchor_served
    nodes = len(rig.ca.store.all())
    async with asyncio.timeout(20):
        assert await rig.echo_round(2) > 0
    assert rig.anchor_served - served == CLIENTS * 2
    assert fresh.requests - requests == CLIENTS * 2
    assert fresh.opened - opened == CLIENTS * 2
    assert fresh.reused == 0
    assert len(rig.ca.store.all()) == nodes  # the anchor issues nothing


async def test_anchor_serves_the_cas_certificate_over_tls13(rig: pki_bench.PkiRig) -> None:
    fresh, _ = _clients(rig)
    assert rig.anchor_site is not None
    served = [c for c in rig.ca.store.all() if c.role == "server"][-1]
    leaf = x509.load_pem_x509_certificate(served.pem.encode())
    seen = []
    for port in (rig.server.port, rig.anchor_site.port, rig.server.port, rig.anchor_site.port):
        async with asyncio.timeout(20):
            _, writer = await asyncio.open_connection(
                pki_bench.HOST, port, ssl=fresh.ssl, server_hostname=pki_bench.HOST
            )
            tls = writer.get_extra_info("ssl_object")
            assert isinstance(tls, ssl.SSLObject)
            assert tls.version() == "TLSv1.3"
            assert not tls.session_reused  # every connection is a full handshake
            seen.append(tls.getpeercert(binary_form=True))
            writer.close()
            await writer.wait_closed()
    # The CA API and the anchor present the same CA-issued certificate.
    assert seen == [leaf.public_bytes(serialization.Encoding.DER)] * 4


async def test_crl_and_ping_rounds_reuse_their_connections(rig: pki_bench.PkiRig) -> None:
    _, keepalive = _clients(rig)
    crl = x509.load_der_x509_crl(rig.crl_der)
    assert len(crl) == REVOKED
    # The warm-up opened one connection from each client to each server.
    assert keepalive.opened == rig.keepalive_opened == 2 * CLIENTS
    fetches, served, reused = rig.crl_fetches, rig.anchor_served, keepalive.reused
    async with asyncio.timeout(20):
        assert await rig.crl_round(4) > 0
        assert await rig.ping_round(4) > 0
    assert rig.crl_fetches - fetches == CLIENTS * 4
    assert rig.anchor_served - served == CLIENTS * 4
    assert keepalive.reused - reused == CLIENTS * 8
    assert keepalive.opened == 2 * CLIENTS


async def test_a_failed_enrollment_fails_the_round(rig: pki_bench.PkiRig) -> None:
    fresh, _ = _clients(rig)
    spent = rig.enrollments[0]  # enrolled in the warm-up: its token is used
    # With another key: the same key would be an idempotent retry, answered 200.
    other_key = pki_bench.enroll_body(spent.token, spent.node_id, pki_bench.make_csr(spent.node_id))
    request = rig._enroll_request(pki_bench.Enrollment(spent.node_id, spent.token, other_key))
    async with asyncio.timeout(20):
        with pytest.raises(pki_bench.BenchFailure, match="answered 400"):
            await fresh.run([[request]] + [[] for _ in range(CLIENTS - 1)])


def test_run_reports_both_metrics_with_their_anchors() -> None:
    results = pki_bench.run(
        enrollments_per_client=1, crl_fetches_per_client=2, rounds=1, clients=2, revoked=3
    )
    assert [r.metric for r in results] == ["enrollments_per_s", "crl_fetches_per_s"]
    for result in results:
        assert result.value > 0
        assert result.anchor_value > 0
        assert result.paired_ratio is not None
        assert pki_bench.ECHO_PATH in result.anchor


@pytest.mark.timeout(120)
def test_postgres_quick_run_compares_replicas_with_one_sqlite_replica() -> None:
    """``bench pki --store postgres --quick``: real ``ca serve`` processes (three on one
    PostgreSQL database, one on SQLite), every enrollment answered, logged by the replica
    it was sent to, and in the store."""
    before = set(_children())  # another test's PostgreSQL server, in this worker
    results = pki_bench.run(quick=True, store="postgres")
    assert [r.metric for r in results] == [
        "pg_1_replica_per_s",
        "pg_2_replicas_per_s",
        "pg_3_replicas_per_s",
    ]
    sqlite_rate = results[0].anchor_value
    for result in results:
        assert result.unit == "enroll/s"
        assert "SQLite" in result.anchor
        assert result.value > 0
        assert result.anchor_value == sqlite_rate > 0  # one anchor for all three
        assert result.paired_ratio is not None
        assert result.paired_ratio > 0
    info = pki_bench.info()
    assert info is not None
    quick = pki_replicas.QUICK
    per_round = quick["clients"] * quick["per_client"]
    # The warm-up (one per client on SQLite, one per client and replica on PostgreSQL)
    # and one round of each set-up: every one enrolled and found in its store.
    sqlite = quick["clients"] + quick["rounds"] * per_round
    postgres = quick["clients"] * 3 + quick["rounds"] * 3 * per_round
    assert info["enrollments"] == {"sqlite": sqlite, "postgresql": postgres}
    served = info["served"]
    assert isinstance(served, dict)
    assert served["sqlite"] == sqlite
    # Round-robin: the warm-up and the 2- and 3-replica rounds reach every replica.
    assert sum(served[f"pg-{i}"] for i in (1, 2, 3)) == postgres
    assert min(served[f"pg-{i}"] for i in (1, 2, 3)) >= quick["clients"]
    assert "fsync on" in str(info["postgresql"])
    cpu = info["cpu_ms_per_enrollment"]
    assert isinstance(cpu, dict)
    assert set(cpu) == {"sqlite_1", "pg_1", "pg_2", "pg_3"}
    for shares in cpu.values():
        assert shares["machine"] > 0
    # Every server and the PostgreSQL cluster were stopped and reaped.
    assert set(_children()) <= before


def _children() -> list[str]:
    """The command lines of this process's live children."""
    found = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text()
            if entry.name.isdigit() and int(stat[stat.rindex(")") + 2 :].split()[1]) == os.getpid():
                found.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode())
    return found


def test_store_is_checked() -> None:
    with pytest.raises(ValueError, match="store 'mysql'"):
        pki_bench.run(store="mysql")
