"""What the mesh core tests (tests/mesh/) share: a real mesh CA in a directory, node
certificates issued from CSRs as ``trustmesh enroll`` makes them, signed gossip, and one
fixed clock.

Not a test module (no ``test_`` prefix). It lives in tests/cli only because that directory
is on the import path (pytest's ``pythonpath``); the mesh tests import it as ``meshtools``.
Every time is fixed: the CA and its certificates are made at ``NOW`` and the tests run at
``T0`` (ten minutes later), so nothing depends on the real clock.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from trustmesh.api.ca_client import make_csr
from trustmesh.crypto.keys import KeyKind, PrivateKey
from trustmesh.keystore.filestore import load_key_file
from trustmesh.mesh.gossip import DEFAULT_TTL_MS, GossipMessage, anomaly_payload, sign_message
from trustmesh.mesh.link import ALPN
from trustmesh.mesh.trust import TrustView
from trustmesh.node.local import issue_node_files
from trustmesh.pki.ca import CertificateAuthority
from trustmesh.tls import TlsConfig, TlsEstablished

DER = serialization.Encoding.DER
NOW = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)  # when the CA and every certificate are made
T0 = NOW + timedelta(minutes=10)  # when the tests run: every node certificate is valid


def ms(when: datetime) -> int:
    """Unix milliseconds, the unit of gossip times."""
    return int(when.timestamp() * 1000)


T0_MS = ms(T0)


def anomaly(n: int = 0, **meta: str | int | float | bool | None) -> dict[str, Any]:
    """A valid anomaly payload, distinct for each ``n``."""
    return anomaly_payload(f"{n:016x}", "test/probe", 0.5, dict(meta))


@dataclass(frozen=True)
class Node:
    """A node's key and its certificate from the mesh CA."""

    node_id: str
    key: PrivateKey
    cert: x509.Certificate
    issuing: x509.Certificate

    @property
    def serial(self) -> int:
        return self.cert.serial_number

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        """As a TLS peer presents it: the node's certificate, then its issuing CA."""
        return (self.cert, self.issuing)

    @property
    def chain_der(self) -> tuple[bytes, ...]:
        return tuple(c.public_bytes(DER) for c in self.chain)

    def sign(
        self,
        payload: dict[str, Any] | None = None,
        *,
        now_ms: int = T0_MS,
        ttl_ms: int = DEFAULT_TTL_MS,
        with_chain: bool = True,
        message_id: str | None = None,
        origin: str | None = None,
    ) -> GossipMessage:
        """A gossip message signed by this node (``origin`` may claim another node)."""
        return sign_message(
            self.key,
            origin if origin is not None else self.node_id,
            payload if payload is not None else anomaly(),
            now_ms=now_ms,
            ttl_ms=ttl_ms,
            chain=self.chain_der if with_chain else (),
            message_id=message_id,
        )


class MeshPki:
    """A fresh mesh CA (root and issuing CA, keys unencrypted) in ``directory``."""

    def __init__(self, directory: Path, name: str = "mesh test CA") -> None:
        self.ca = CertificateAuthority.init(directory, None, name=name, now=NOW)

    def close(self) -> None:
        self.ca.close()

    def node(self, node_id: str, kind: KeyKind = KeyKind.P256) -> Node:
        """A new key and a node certificate for it, issued from its CSR."""
        key = PrivateKey.generate(kind)
        csr = x509.load_pem_x509_csr(make_csr(key, node_id).encode())
        cert = self.ca.issue(csr, node_id, now=NOW)
        return Node(node_id, key, cert, self.ca.issuing_cert)

    def admin(self, name: str) -> x509.Certificate:
        """An admin client certificate: a URI SAN, no DNS name, so never a node."""
        key = ec.generate_private_key(ec.SECP256R1())
        return self.ca.issue_admin(name, key.public_key(), now=NOW)

    def trust(self) -> TrustView:
        """A node's view: the root, and the issuing CA (which signs CRLs)."""
        return TrustView([self.ca.root_cert], [self.ca.issuing_cert])

    def revoke(self, node: Node) -> None:
        self.ca.revoke(serial=node.serial, now=NOW)

    def crl(self, at: datetime = T0) -> bytes:
        """The CA's CRL as made at ``at`` (its CRL number is ``at`` in Unix ms), DER."""
        return self.ca.crl(now=at).public_bytes(DER)

    def issuing_key(self) -> ec.EllipticCurvePrivateKey:
        """The issuing CA's key, to forge what the CA itself never makes."""
        key = load_key_file(self.ca.directory / "issuing.key", None).to_cryptography()
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return key

    def custom_cert(self, common_names: list[str], dns_names: list[str]) -> x509.Certificate:
        """A certificate from the issuing CA with any CNs and DNS SANs (a mismatched
        pairing the CA's own ``issue`` refuses to make)."""
        key = ec.generate_private_key(ec.SECP256R1())
        issuing = self.ca.issuing_cert
        ski = issuing.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        builder = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, n) for n in common_names])
            )
            .issuer_name(issuing.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - timedelta(minutes=5))
            .not_valid_after(NOW + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
            )
        )
        if dns_names:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(n) for n in dns_names]), critical=False
            )
        return builder.sign(self.issuing_key(), hashes.SHA256())


def signed_crl(
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    serials: Iterable[int],
    *,
    number: int,
    at: datetime = T0,
) -> bytes:
    """A CRL in DER listing ``serials``, signed by ``key`` for ``issuer`` as the CA signs
    its CRLs, built in one go (not through the CA's store)."""
    entries = [
        x509.RevokedCertificateBuilder().serial_number(s).revocation_date(NOW).build()
        for s in serials
    ]
    crl = (
        x509.CertificateRevocationListBuilder(revoked_certificates=entries)
        .issuer_name(issuer)
        .last_update(at)
        .next_update(at + timedelta(days=1))
        .add_extension(x509.CRLNumber(number), critical=False)
        .sign(key, hashes.SHA256())
    )
    return crl.public_bytes(DER)


def big_crl(
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    count: int,
    *,
    number: int,
    at: datetime = T0,
    seed: int = 14,
) -> bytes:
    """:func:`signed_crl` of ``count`` random, distinct, positive 127-bit serials (as the
    CA makes them): 100,000 take under a second, and 3.5 MB of DER."""
    rng = random.Random(seed)
    serials: set[int] = set()
    while len(serials) < count:
        serials.add(rng.getrandbits(127) | 1)
    return signed_crl(key, issuer, serials, number=number, at=at)


@dataclass
class LivePki:
    """A mesh CA issuing at the real time (the handshake checks validity now)."""

    ca: CertificateAuthority

    def config(self, node_id: str, directory: Path, *, trust: LivePki | None = None) -> TlsConfig:
        root = (trust or self).ca.root_cert
        return issue_node_files(self.ca, node_id, directory, root=root)

    @staticmethod
    def tls(directory: Path) -> TlsConfig:
        """The TLS settings of a directory that :meth:`config` wrote."""
        return TlsConfig(directory / "node.crt", directory / "node.key", directory / "ca.crt")


@dataclass
class Binding:
    """What a MeshLink reads from its TlsStream, in memory: the handshake's outcome, and
    an exporter both ends of a test link agree on (there is no TLS session to derive it)."""

    established: TlsEstablished | None

    def exporter(self, label: bytes, context: bytes) -> bytes:
        return hashlib.sha256(b"in-memory link:" + label + context).digest()


def tls_with(chain: Sequence[x509.Certificate], alpn: str | None = ALPN) -> Binding:
    return Binding(TlsEstablished(peer_chain=tuple(chain), alpn=alpn, group=None, resumed=False))
