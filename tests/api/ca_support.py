"""Helpers for the CA API tests: CSRs, and a running CA with its client sessions."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from trustmesh.api.ca_server import CaServer
from trustmesh.pki.ca import CertificateAuthority

PASSPHRASE = b"api-test-passphrase"


def make_csr(
    node_id: str, key: ec.EllipticCurvePrivateKey | None = None
) -> tuple[str, ec.EllipticCurvePrivateKey]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(node_id)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode(), key


@dataclass
class RunningCa:
    """A CA and its API; ``session()`` gives an aiohttp client that trusts it."""

    ca: CertificateAuthority
    server: CaServer
    directory: Path
    sessions: list[aiohttp.ClientSession] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.server.url

    def token(self, node_id: str, **kwargs: object) -> str:
        return self.ca.create_token(node_id, **kwargs)  # type: ignore[arg-type]

    def ssl_context(self, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.directory / "ca.crt"))
        if cert is not None:
            ctx.load_cert_chain(str(cert), str(key) if key else None)
        return ctx

    def session(self, cert: Path | None = None, key: Path | None = None) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(ssl=self.ssl_context(cert, key))
        session = aiohttp.ClientSession(connector=connector)
        self.sessions.append(session)
        return session

    def write_node(self, directory: Path, node_id: str) -> tuple[Path, Path, x509.Certificate]:
        """Issue a node certificate (through the CA directly) and write it with its key,
        unencrypted, for use as a TLS client certificate."""
        csr_pem, key = make_csr(node_id)
        cert = self.ca.issue(x509.load_pem_x509_csr(csr_pem.encode()), node_id)
        directory.mkdir(parents=True, exist_ok=True)
        cert_file, key_file = directory / f"{node_id}.crt", directory / f"{node_id}.key"
        cert_file.write_bytes(
            cert.public_bytes(serialization.Encoding.PEM)
            + self.ca.issuing_cert.public_bytes(serialization.Encoding.PEM)
        )
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        key_file.chmod(0o600)
        return cert_file, key_file, cert
