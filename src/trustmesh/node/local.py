"""A whole mesh on loopback in one process: an embedded CA served over HTTPS, and nodes
that enroll through it with their own tokens, then link over TLS 1.3. Real TLS, real
HTTP, real files; only the processes are shared. The demo, the tests and the benchmark
run on it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from trustmesh.api.ca_client import enroll_node, make_csr
from trustmesh.api.ca_server import CaServer
from trustmesh.crypto.keys import KeyKind, PrivateKey
from trustmesh.io.limits import ResourcePolicy
from trustmesh.keystore.uri import close_signer, open_signer
from trustmesh.node.config import NodeConfig, write_config
from trustmesh.node.runtime import MeshNode
from trustmesh.pki.attestation import AttestationPolicy
from trustmesh.pki.ca import CertificateAuthority
from trustmesh.pki.challenge import Challenges
from trustmesh.pki.enroll import EnrollmentPolicy, MeshSettings, Registrar
from trustmesh.pki.tpm_verifier import TPM_QUOTE, TpmQuoteVerifier
from trustmesh.ratelimit import RateLimiter
from trustmesh.tls import TlsConfig
from trustmesh.tpm.attester import TpmAttester
from trustmesh.tpm.policy import AttestationPolicyFile

HOST = "127.0.0.1"
_PEM = serialization.Encoding.PEM
LOCAL_RATE = 1000.0  # CA requests per second from 127.0.0.1, where a fleet has many addresses


class LocalMesh:
    """``nodes`` nodes named node-1 ... node-N; every node bootstraps from node-1."""

    def __init__(
        self,
        workdir: Path,
        nodes: int,
        *,
        passphrase: bytes = b"local mesh CA passphrase",
        node_settings: dict[str, Any] | None = None,
        attestation: AttestationPolicyFile | None = None,
    ) -> None:
        """``attestation``: the CA takes TPM quotes under this policy (nodes may then
        enroll with ``attest=``)."""
        if nodes < 1:
            raise ValueError("a mesh needs at least one node")
        self.workdir = workdir
        self.count = nodes
        self.passphrase = passphrase
        self.node_settings = node_settings or {}
        self.attestation = attestation
        self.ca: CertificateAuthority | None = None
        self.ca_server: CaServer | None = None
        self.nodes: list[MeshNode] = []

    @property
    def ca_dir(self) -> Path:
        return self.workdir / "ca"

    async def start_ca(self) -> CaServer:
        ca = CertificateAuthority.init(self.ca_dir, self.passphrase, name="trustmesh demo")
        self.ca = ca
        challenges = Challenges.for_directory(self.ca_dir)
        policy = EnrollmentPolicy()
        if self.attestation is not None:
            verifier = TpmQuoteVerifier(self.attestation, challenges, ca.clock)
            policy = EnrollmentPolicy(attestation=AttestationPolicy("none", {TPM_QUOTE: verifier}))
        registrar = Registrar(ca, policy, MeshSettings(), challenges=challenges)
        # Every node of a local mesh reaches the CA from 127.0.0.1, where a real fleet
        # comes from as many addresses: lift the listener's per-address limits.
        self.ca_server = CaServer(
            registrar,
            self.passphrase,
            HOST,
            0,
            policy=ResourcePolicy.for_load(4096),
            limiter=RateLimiter(LOCAL_RATE, int(LOCAL_RATE)),
        )
        await self.ca_server.start()
        return self.ca_server

    async def enroll(
        self,
        index: int,
        *,
        token: str | None = None,
        identity_key: str | None = None,
        attest: str | None = None,
        **settings: Any,
    ) -> Path:
        """Enroll node-``index`` over the CA's HTTPS API (with a fresh token unless one is
        given) and write its config; ``identity_key`` (a device URI) and ``attest``
        (``tpm:<TCTI>``) as ``node init --key`` and ``--attest`` take them."""
        assert self.ca is not None
        assert self.ca_server is not None
        node_id = f"node-{index}"
        directory = self.workdir / node_id
        token = token or self.ca.create_token(node_id)
        identity = None if identity_key is None else open_signer(identity_key)
        try:
            await asyncio.to_thread(
                enroll_node,
                self.ca_server.url,
                self.ca_dir / "ca.crt",
                token,
                node_id,
                directory,
                passphrase=None,
                identity=identity,
                identity_uri=identity_key,
                attester=None if attest is None else TpmAttester.from_spec(attest),
                attest=attest,
            )
        finally:
            if identity is not None:
                close_signer(identity)
        bootstrap = (self.nodes[0].listen_address,) if self.nodes else ()
        values = {**self.node_settings, **settings}
        config = NodeConfig(
            node_id=node_id,
            ca_url=self.ca_server.url,
            listen=f"{HOST}:0",
            api=f"{HOST}:0",
            bootstrap=bootstrap,
            key_encrypted=False,
            **values,
        )
        write_config(directory, config)
        return directory

    async def start_node(self, directory: Path) -> MeshNode:
        node = MeshNode.from_directory(directory)
        await node.start()
        self.nodes.append(node)
        return node

    async def start(self) -> None:
        """The CA, then each node enrolled and started (node-1 first: it is everyone's
        bootstrap peer)."""
        await self.start_ca()
        for index in range(1, self.count + 1):
            await self.start_node(await self.enroll(index))

    async def start_many(
        self, indices: Sequence[int], *, tokens: dict[int, str] | None = None, at_once: int = 8
    ) -> None:
        """Enroll and start node-``i`` for each of ``indices``, ``at_once`` at a time (as
        a fleet's nodes come up: together, each with its own token). The first node must
        be running already: it is their bootstrap peer."""
        gate = asyncio.Semaphore(at_once)
        started: list[MeshNode] = []

        async def one(index: int) -> None:
            async with gate:
                token = (tokens or {}).get(index)
                directory = await self.enroll(index, token=token)
                # Opening the store and reading the keys block: not on the shared loop.
                node = await asyncio.to_thread(MeshNode.from_directory, directory)
                await node.start()
                started.append(node)

        await asyncio.gather(*(one(i) for i in indices))
        self.nodes.extend(sorted(started, key=lambda n: int(n.node_id.rsplit("-", 1)[1])))

    async def wait_for(
        self, condition: Callable[[], bool], within: float, *, what: str = "condition"
    ) -> float:
        """Wait until ``condition()`` holds, checking on every node event (never by
        sleeping a fixed time); return the seconds it took."""
        changed = asyncio.Event()

        def listener(event: str, fields: Any) -> None:
            changed.set()

        for node in self.nodes:
            node.listeners.append(listener)
        start = time.monotonic()
        try:
            async with asyncio.timeout(within):
                while not condition():
                    changed.clear()
                    await changed.wait()
        except TimeoutError:
            raise TimeoutError(f"{what} did not hold within {within:g} s") from None
        finally:
            for node in self.nodes:
                node.listeners.remove(listener)
        return time.monotonic() - start

    def connected(self) -> bool:
        """The links, counted only where both ends hold them, join all nodes into one mesh."""
        return bool(self.nodes) and not self.unconnected()

    def unconnected(self) -> list[str]:
        """The nodes that node-1 does not reach over links both ends hold."""
        live = {n.node_id: n for n in self.nodes}
        reached, frontier = set(), [self.nodes[0].node_id] if self.nodes else []
        while frontier:
            current = frontier.pop()
            if current not in reached:
                reached.add(current)
                frontier.extend(
                    p for p in live[current].links if p in live and current in live[p].links
                )
        return sorted(set(live) - reached, key=lambda n: int(n.rsplit("-", 1)[1]))

    async def stop(self) -> None:
        for node in self.nodes:
            await node.quiesce()  # nobody redials a node that is going away
        for node in reversed(self.nodes):
            await node.stop()
        self.nodes.clear()
        if self.ca_server is not None:
            await self.ca_server.stop()
        if self.ca is not None:
            self.ca.close()

    async def __aenter__(self) -> LocalMesh:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


def is_connected(graph: dict[str, set[str]]) -> bool:
    """Whether the edges of ``graph`` (node -> neighbours) reach every node from any."""
    if not graph:
        return False
    reached, frontier = set(), [next(iter(graph))]
    while frontier:
        current = frontier.pop()
        if current not in reached:
            reached.add(current)
            frontier.extend(graph.get(current, ()))
    return reached == set(graph)


def issue_node_files(
    ca: CertificateAuthority, node_id: str, directory: Path, *, root: x509.Certificate | None = None
) -> TlsConfig:
    """Write ``node.key`` (unencrypted, 0600), ``node.crt`` (its certificate, then the
    issuing CA) and ``ca.crt`` (``root``, by default the CA's own) into ``directory``."""
    key = PrivateKey.generate(KeyKind.P256)
    cert = ca.issue(x509.load_pem_x509_csr(make_csr(key, node_id).encode()), node_id)
    directory.mkdir(parents=True, exist_ok=True)
    key_file = directory / "node.key"
    key_file.touch(mode=0o600)
    key_file.write_bytes(
        key.to_cryptography().private_bytes(
            _PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    chain = (cert, ca.issuing_cert)
    (directory / "node.crt").write_bytes(b"".join(c.public_bytes(_PEM) for c in chain))
    (directory / "ca.crt").write_bytes((root or ca.root_cert).public_bytes(_PEM))
    return TlsConfig(directory / "node.crt", key_file, directory / "ca.crt")
