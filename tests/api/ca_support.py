"""The CA API tests' helpers and fixtures (a pytest plugin, loaded by tests/conftest.py):
CSRs, and a fresh CA served by CaServer over trustmesh TLS on loopback."""

from __future__ import annotations

import dataclasses
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from trustmesh.api.ca_client import make_csr as node_csr
from trustmesh.api.ca_server import CaServer
from trustmesh.api.ratelimit import RateLimiter
from trustmesh.clock import Clock
from trustmesh.crypto.keys import PrivateKey
from trustmesh.io.limits import ResourcePolicy
from trustmesh.pki.attestation import AttestationPolicy
from trustmesh.pki.ca import CertificateAuthority
from trustmesh.pki.challenge import Challenges
from trustmesh.pki.enroll import EnrollmentPolicy, MeshSettings, Registrar
from trustmesh.pki.tpm_verifier import TpmQuoteVerifier
from trustmesh.tpm.policy import AttestationPolicyFile

PASSPHRASE = b"api-test-passphrase"


def make_csr(
    node_id: str, key: ec.EllipticCurvePrivateKey | None = None
) -> tuple[str, ec.EllipticCurvePrivateKey]:
    """A CSR as `trustmesh enroll` makes it, and its key (to write or reuse)."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    return node_csr(PrivateKey.from_cryptography(key), node_id), key


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


@pytest.fixture
async def ca_api_factory(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """``await factory(policy=..., limiter=..., settings=..., clock=..., resources=...)``:
    start a CA API (``resources``: its listener's ResourcePolicy; ``metrics``: the
    (host, port) of a plain-HTTP metrics port too; ``db``: a PostgreSQL DSN for its store)."""
    running: list[RunningCa] = []

    async def start(
        *,
        policy: EnrollmentPolicy | None = None,
        limiter: RateLimiter | None = None,
        settings: MeshSettings | None = None,
        clock: Clock | None = None,
        resources: ResourcePolicy | None = None,
        tpm_policy: AttestationPolicyFile | None = None,
        attestation: Literal["none", "required"] = "none",
        metrics: tuple[str, int] | None = None,
        db: str | None = None,
    ) -> RunningCa:
        directory = tmp_path / f"ca{len(running)}"
        ca = CertificateAuthority.init(directory, PASSPHRASE, db=db)
        challenges = Challenges.for_directory(directory)
        if tpm_policy is not None:
            # As `ca serve --attestation-policy FILE [--attestation required]` sets it up.
            verifier = TpmQuoteVerifier(tpm_policy, challenges, ca.clock)
            policy = dataclasses.replace(
                policy or EnrollmentPolicy(),
                attestation=AttestationPolicy(attestation, {verifier.type: verifier}),
            )
        registrar = Registrar(
            ca, policy or EnrollmentPolicy(), settings or MeshSettings(), challenges=challenges
        )
        server = CaServer(
            registrar,
            PASSPHRASE,
            "127.0.0.1",
            0,
            limiter=limiter or RateLimiter(1000.0, 1000),
            clock=clock,  # None: the CA's (the system clock)
            # Every test client connects from 127.0.0.1: lift the per-address caps too.
            policy=resources or ResourcePolicy.for_load(1024),
            metrics=metrics,
        )
        await server.start()
        handle = RunningCa(ca, server, directory)
        running.append(handle)
        return handle

    yield start
    for handle in running:
        for session in handle.sessions:
            await session.close()
        await handle.server.stop()
        handle.ca.close()


@pytest.fixture
async def ca_api(ca_api_factory: Callable[..., Any]) -> RunningCa:
    """A CA API with the default policy and a generous rate limit."""
    running: RunningCa = await ca_api_factory()
    return running
