"""What a node presents: its key, its chain, and the TLS contexts built on them.

Built once per certificate (at start and after each renewal): the link contexts verify
peers against the mesh CA and ask the trust view whether a serial is revoked at every
handshake and resumption; the API context asks for a client certificate but lets the
handshake finish without one, so that the answer is a JSON 401 or 403, not a TLS alert.
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from trustmesh.api.ca_client import rotate_node
from trustmesh.crypto.keys import PrivateKey
from trustmesh.keystore.filestore import load_key_file
from trustmesh.mesh.link import ALPN
from trustmesh.mesh.node import NodeIdentity
from trustmesh.mesh.trust import TrustView
from trustmesh.tls import TlsConfig, TlsContext


@dataclass
class Identity:
    key: PrivateKey
    chain: tuple[x509.Certificate, ...]
    server: TlsContext  # links
    client: TlsContext  # links
    api: TlsContext  # the HTTPS API

    @property
    def certificate(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def chain_der(self) -> tuple[bytes, ...]:
        return tuple(c.public_bytes(serialization.Encoding.DER) for c in self.chain)

    def for_core(self) -> NodeIdentity:
        """What the node's sans-IO core signs with."""
        cert = self.certificate
        return NodeIdentity(
            self.key,
            self.chain_der,
            int(cert.not_valid_before_utc.timestamp() * 1000),
            int(cert.not_valid_after_utc.timestamp() * 1000),
            cert.serial_number,
        )


def load_identity(directory: Path, passphrase: bytes | None, trust: TrustView) -> Identity:
    """The node's key and chain from ``directory``; their issuers join ``trust`` (they
    sign the CRLs the node takes)."""
    key = load_key_file(directory / "node.key", passphrase)
    chain = tuple(x509.load_pem_x509_certificates((directory / "node.crt").read_bytes()))
    for issuer in chain[1:]:
        trust.add_issuer(issuer)
    config = TlsConfig(
        cert_file=directory / "node.crt",
        key_file=directory / "node.key",
        ca_file=directory / "ca.crt",
        alpn=(ALPN,),
        key_passphrase=passphrase,
        is_revoked=trust.is_revoked,
    )
    api = dataclasses.replace(config, alpn=(), is_revoked=None, client_auth="request")
    return Identity(
        key,
        chain,
        TlsContext(config, server=True),
        TlsContext(config, server=False),
        TlsContext(api, server=True),
    )


async def rotate_identity(
    directory: Path, passphrase: bytes | None, ca_url: str, trust: TrustView
) -> Identity:
    """Rotate through the CA's ``/v1/rotate`` (a new key and certificate, the old pair
    kept for the overlap: api.ca_client.rotate_node), then load the new identity."""
    await asyncio.to_thread(rotate_node, directory, passphrase=passphrase, ca_url=ca_url)
    return load_identity(directory, passphrase, trust)
