"""CRL scale: what a node pays to take a CRL of 100,000 revoked serials (issue 16 item 14).

- crl_link_apply_ms: the CRL (3.5 MB of DER, a mesh issuing CA's P-256 signature) goes
  from one :class:`~trustmesh.mesh.link.MeshLink` to another in memory, in CRL_PART pieces
  with CRL_ACK flow control (docs/protocols/mesh-link.md section 3.1), is reassembled,
  and is applied by a :class:`~trustmesh.mesh.trust.TrustView` (parse, issuer signature,
  CRL number, the revoked set). Both links are up before the timer starts.
- crl_fetch_apply_ms: ``GET /v1/crl`` from a real CA (``CaServer`` over trustmesh TLS 1.3
  on 127.0.0.1, its SQLite store holding 100,000 revoked certificates) with the node's own
  client (:class:`~trustmesh.api.ca_client.CaClient`, a new TLS connection, as
  ``MeshNode.refresh_crl`` makes), then the same ``apply_crl``. The CA's signed CRL is
  cached by the server (as between two revocations): the first, untimed, fetch signs it.

Anchor, for both: ``cryptography`` alone on the same DER: ``load_der_x509_crl``, the
issuer's signature checked, and every serial number read into a set (the least any
verifier does with a CRL). The figures are milliseconds, so a ratio above 1 is the cost
over that anchor. Rounds alternate, anchor first; the ratio is the median of per-round
ratios.
"""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bench.harness import Comparison, Result
from trustmesh.api.ca_client import CaClient, make_csr
from trustmesh.api.ca_server import CaServer
from trustmesh.crypto.keys import KeyKind, PrivateKey
from trustmesh.mesh.link import ALPN, CrlFrame, LinkConfig, LinkUp, MeshLink
from trustmesh.mesh.trust import TrustView
from trustmesh.pki.ca import CertificateAuthority
from trustmesh.pki.enroll import EnrollmentPolicy, MeshSettings, Registrar
from trustmesh.sansio import Event
from trustmesh.tls import TlsEstablished

REVOKED = 100_000
ROUNDS = 5
PASSPHRASE = b"crl bench passphrase"


class _Binding:
    def __init__(self, chain: tuple[x509.Certificate, ...]) -> None:
        self.established: TlsEstablished | None = TlsEstablished(
            peer_chain=chain, alpn=ALPN, group=None, resumed=False
        )

    def exporter(self, label: bytes, context: bytes) -> bytes:
        return bytes(32)  # no TLS session here; the CRL path never asks for it


class CrlRig:
    """A CA with ``revoked`` revoked certificates in its store, two node certificates,
    and the CA's CRL in DER."""

    def __init__(self, workdir: Path, revoked: int = REVOKED) -> None:
        now = datetime.now(UTC)
        self.ca = CertificateAuthority.init(workdir / "ca", PASSPHRASE, name="crl bench", now=now)
        self.chains = [self._node(f"node-{i}", now) for i in (1, 2)]
        _bulk_revoke(self.ca, revoked, now)
        self.der = self.ca.crl(now=now).public_bytes(serialization.Encoding.DER)
        self.revoked = revoked

    def _node(self, node_id: str, now: datetime) -> tuple[x509.Certificate, ...]:
        key = PrivateKey.generate(KeyKind.P256)
        cert = self.ca.issue(
            x509.load_pem_x509_csr(make_csr(key, node_id).encode()), node_id, now=now
        )
        return (cert, self.ca.issuing_cert)

    def trust(self) -> TrustView:
        return TrustView([self.ca.root_cert], [self.ca.issuing_cert])

    def close(self) -> None:
        self.ca.close()


def _bulk_revoke(ca: CertificateAuthority, count: int, now: datetime) -> None:
    """Revoked node certificates, written straight into the CA's table (issuing 100,000
    real ones would take minutes and prove nothing more about the CRL)."""
    not_after = int((now + timedelta(days=3)).timestamp())
    at = int(now.timestamp())
    rows = [
        (format(secrets.randbits(127) | 1, "x"), f"bulk-{i}", "node", at, not_after, "-", at)
        for i in range(count)
    ]
    with sqlite3.connect(ca.directory / "ca.db") as db:
        db.executemany(
            "INSERT OR IGNORE INTO certificates (serial, node_id, role, not_before, not_after,"
            " pem, revoked_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            rows,
        )


def anchor_parse(der: bytes, issuer: ec.EllipticCurvePublicKey) -> int:
    """cryptography alone: parse, check the signature, read every serial."""
    crl = x509.load_der_x509_crl(der)
    if not crl.is_signature_valid(issuer):
        raise AssertionError("the CRL's signature does not verify")
    return len({entry.serial_number for entry in crl})


def link_round(rig: CrlRig) -> float:
    """Seconds to carry ``rig.der`` over two linked cores and apply it."""
    trust = rig.trust()
    sender = MeshLink(
        LinkConfig("node-1"), initiator=True, authorize=lambda _: "node-2", crl_number=lambda: 1
    )
    receiver = MeshLink(
        LinkConfig("node-2"),
        initiator=False,
        authorize=lambda _: "node-1",
        crl_number=lambda: trust.crl_number,
    )
    sender.bind(_Binding(rig.chains[1]))
    receiver.bind(_Binding(rig.chains[0]))
    sender.start(0.0)
    receiver.start(0.0)
    _pump(sender, receiver)  # both HELLOs: the links are up
    if not (sender.established and receiver.established):
        raise AssertionError("the links did not come up")
    started = time.perf_counter()
    sender.send_crl(rig.der)
    got = [e for e in _pump(sender, receiver) if isinstance(e, CrlFrame)]
    if len(got) != 1:
        raise AssertionError(f"{len(got)} CRLs arrived, not 1")
    update = trust.apply_crl(got[0].der)
    took = time.perf_counter() - started
    if update is None or len(trust.revoked) != rig.revoked:
        raise AssertionError("the CRL was not applied whole")
    return took


def _pump(a: MeshLink, b: MeshLink) -> list[Event]:
    got: list[Event] = []
    while True:
        to_b, to_a = a.data_to_send(), b.data_to_send()
        if not to_a and not to_b:
            return got
        if to_b:
            got += b.receive_data(to_b, 0.0)
        if to_a:
            events = a.receive_data(to_a, 0.0)
            if any(not isinstance(e, LinkUp) for e in events):
                raise AssertionError(f"the sender got {events}")


def fetch_round(rig: CrlRig, client: CaClient) -> float:
    """Seconds to fetch the CA's CRL over HTTPS and apply it."""
    trust = rig.trust()
    started = time.perf_counter()
    der = client.crl().public_bytes(serialization.Encoding.DER)
    update = trust.apply_crl(der)
    took = time.perf_counter() - started
    if update is None or len(trust.revoked) != rig.revoked:
        raise AssertionError("the fetched CRL was not applied whole")
    return took


def _anchor_round(rig: CrlRig) -> float:
    issuer = rig.ca.issuing_cert.public_key()
    assert isinstance(issuer, ec.EllipticCurvePublicKey)
    started = time.perf_counter()
    if anchor_parse(rig.der, issuer) != rig.revoked:
        raise AssertionError("the anchor did not read every serial")
    return time.perf_counter() - started


def _milliseconds(
    subject: Callable[[], float], anchor: Callable[[], float], rounds: int
) -> Comparison:
    subject_ms, anchor_ms = [], []
    for _ in range(rounds):
        anchor_ms.append(anchor() * 1000)
        subject_ms.append(subject() * 1000)
    return Comparison.of(subject_ms, anchor_ms)


async def _with_server(rig: CrlRig, rounds: int) -> Comparison:
    registrar = Registrar(rig.ca, EnrollmentPolicy(), MeshSettings())
    server = CaServer(registrar, PASSPHRASE, "127.0.0.1", 0)
    await server.start()
    try:
        client = CaClient(server.url, rig.ca.directory / "ca.crt", timeout=60.0)
        await asyncio.to_thread(client.crl)  # the server signs and caches its CRL
        return await asyncio.to_thread(
            _milliseconds, lambda: fetch_round(rig, client), lambda: _anchor_round(rig), rounds
        )
    finally:
        await server.stop()


def run(revoked: int = REVOKED, rounds: int = ROUNDS) -> list[Result]:
    with tempfile.TemporaryDirectory() as tmp:
        rig = CrlRig(Path(tmp), revoked)
        try:
            link = _milliseconds(lambda: link_round(rig), lambda: _anchor_round(rig), rounds)
            fetch = asyncio.run(_with_server(rig, rounds))
        finally:
            rig.close()
    anchor = f"cryptography parse + signature + serials of the same {len(rig.der) // 1024} KiB DER"
    return [
        Result.of("crl_link_apply_ms", link, "ms", anchor),
        Result.of("crl_fetch_apply_ms", fetch, "ms", anchor),
    ]
