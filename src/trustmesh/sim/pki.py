"""The simulation's PKI: a real mesh CA in a temporary directory, a real P-256 key and a
real certificate for every node, real revocations and real CRLs.

Issuing goes through :meth:`CertificateAuthority.sign` (the CSR's self-signature, its
names and key type are checked, the certificate is built and signed by the issuing CA)
and the records are committed to the CA's SQLite store in one transaction, instead of
one ``synchronous=FULL`` transaction per certificate as :meth:`CertificateAuthority.issue`
does (about 2 ms each: 20 s for 10,000 nodes). With ``workers`` > 1 the keys, CSRs and
certificates are made in that many processes, each with the CA loaded from its directory.

Two verification caches may be shared by every node (``crypto="shared"``, the default;
docs/sim.md): a chain's verification to the mesh root and a signature's check are pure
functions of their inputs, so the simulator computes each once for all nodes. Every node
still asks its own :class:`TrustView` (revocation is never cached) and checks every
signature it would check; only the repeated OpenSSL work is skipped. ``crypto="full"``
gives each node its own caches, as real nodes have.
"""

from __future__ import annotations

import multiprocessing
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from trustmesh.clock import FakeClock
from trustmesh.crypto.keys import KeyKind, PrivateKey
from trustmesh.mesh.trust import Identity, TrustView
from trustmesh.pki.ca import CertificateAuthority
from trustmesh.pki.store import IssuedCertificate

_DER = serialization.Encoding.DER
PARALLEL_FROM = 2000  # nodes; below this, worker processes cost more than they save


@dataclass(slots=True)
class NodeCert:
    """One node's identity: its key, its chain (leaf, issuing CA), its validity."""

    node_id: str
    key: PrivateKey
    chain: tuple[x509.Certificate, ...]
    chain_der: tuple[bytes, ...]
    serial: int
    not_before_ms: int
    not_after_ms: int


def _ms(when: datetime) -> int:
    return int(when.timestamp() * 1000)


def _csr(key: PrivateKey, node_id: str) -> x509.CertificateSigningRequest:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)])
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(name)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(node_id)]), critical=False)
        .sign(key.to_cryptography(), hashes.SHA256())
    )


def _issue_batch(
    directory: str, node_ids: Sequence[str], now: datetime
) -> list[tuple[bytes, bytes, IssuedCertificate]]:
    """In a worker: (PKCS#8 DER key, DER certificate, record) for each node."""
    ca = CertificateAuthority(Path(directory), None)
    try:
        out = []
        for node_id in node_ids:
            key = PrivateKey.generate(KeyKind.P256)
            cert, record = ca.sign(_csr(key, node_id), node_id, now=now)
            key_der = key.to_cryptography().private_bytes(
                _DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            out.append((key_der, cert.public_bytes(_DER), record))
        return out
    finally:
        ca.close()


class SimPki:
    """The mesh CA of one simulation, on the simulation's clock."""

    def __init__(self, directory: Path, clock: FakeClock) -> None:
        self.clock = clock
        self.ca = CertificateAuthority.init(directory, None, name="trustmesh sim", clock=clock)
        self.root = self.ca.root_cert
        self.issuing = self.ca.issuing_cert
        self.issuing_der = self.issuing.public_bytes(_DER)
        self.crl_der = b""
        self.crl_number = -1
        self.refresh_crl()

    def close(self) -> None:
        self.ca.close()

    def issue(self, node_ids: Sequence[str], *, workers: int = 1) -> list[NodeCert]:
        """A key and a certificate for each node (in that order), all recorded."""
        now = self.clock.now()
        if workers > 1 and len(node_ids) >= PARALLEL_FROM:
            made = self._issue_parallel(node_ids, now, workers)
        else:
            made = []
            for node_id in node_ids:
                key = PrivateKey.generate(KeyKind.P256)
                cert, record = self.ca.sign(_csr(key, node_id), node_id, now=now)
                made.append((key, cert, record))
        # One commit for them all (docs/sim.md).
        self.ca.store.add_many([r for _, _, r in made], event="issue", actor="sim", now=now)
        certs = []
        for node_id, (key, cert, _) in zip(node_ids, made, strict=True):
            chain = (cert, self.issuing)
            certs.append(
                NodeCert(
                    node_id,
                    key,
                    chain,
                    (cert.public_bytes(_DER), self.issuing_der),
                    cert.serial_number,
                    _ms(cert.not_valid_before_utc),
                    _ms(cert.not_valid_after_utc),
                )
            )
        return certs

    def _issue_parallel(
        self, node_ids: Sequence[str], now: datetime, workers: int
    ) -> list[tuple[PrivateKey, x509.Certificate, IssuedCertificate]]:
        size = (len(node_ids) + workers - 1) // workers
        batches = [list(node_ids[i : i + size]) for i in range(0, len(node_ids), size)]
        context = multiprocessing.get_context("fork")
        with context.Pool(len(batches)) as pool:
            results = pool.starmap(
                _issue_batch, [(str(self.ca.directory), batch, now) for batch in batches]
            )
        made = []
        for batch in results:
            for key_der, cert_der, record in batch:
                loaded = serialization.load_der_private_key(key_der, None)
                made.append(
                    (
                        PrivateKey.from_cryptography(loaded),
                        x509.load_der_x509_certificate(cert_der),
                        record,
                    )
                )
        return made

    def revoke(self, serials: Sequence[int]) -> None:
        """Revoke ``serials`` now and issue the CRL that lists them."""
        now = self.clock.now()
        for serial in serials:
            self.ca.revoke(serial=serial, reason="keyCompromise", now=now, actor="sim")
        self.refresh_crl()

    def refresh_crl(self) -> None:
        crl = self.ca.crl(now=self.clock.now())
        self.crl_der = crl.public_bytes(_DER)
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        self.crl_number = int(number)

    def trust_view(self, shared: SharedIdentities | None) -> TrustView:
        """A node's trust view: the mesh root, the issuing CA (for CRL signatures), and
        the shared chain cache when the nodes share one."""
        return TrustView([self.root], [self.issuing], identities=shared)


class _MemoKey:
    """A public key whose successful checks are remembered: the same signature over the
    same bytes is checked by OpenSSL once, however many nodes check it. A failure is
    never remembered (it raises each time)."""

    __slots__ = ("_key", "_ok")

    def __init__(self, key: ec.EllipticCurvePublicKey) -> None:
        self._key = key
        self._ok: set[tuple[bytes, bytes]] = set()

    def verify(
        self, signature: bytes, data: bytes, signature_algorithm: ec.EllipticCurveSignatureAlgorithm
    ) -> None:
        entry = (signature, data)
        if entry in self._ok:
            return
        self._key.verify(signature, data, signature_algorithm)  # InvalidSignature
        self._ok.add(entry)


class SharedIdentities(OrderedDict[bytes, Identity]):
    """One chain cache for every node's :class:`TrustView` (its ``identities``,
    docs/sim.md). It never evicts (it
    holds one entry per certificate of the simulation), and it gives each identity a
    key that remembers the signatures it checked."""

    def __init__(self, *, memo_signatures: bool = True) -> None:
        super().__init__()
        self.memo_signatures = memo_signatures

    def __setitem__(self, leaf: bytes, identity: Identity) -> None:
        if self.memo_signatures and isinstance(identity.public_key, ec.EllipticCurvePublicKey):
            memo = cast(ec.EllipticCurvePublicKey, _MemoKey(identity.public_key))
            identity = replace(identity, public_key=memo)
        super().__setitem__(leaf, identity)

    def popitem(self, last: bool = True) -> tuple[bytes, Identity]:
        """TrustView trims its cache to 4,096 chains; this one keeps them all."""
        key = next(reversed(self)) if last else next(iter(self))
        return key, self[key]


__all__ = ["NodeCert", "SharedIdentities", "SimPki"]
