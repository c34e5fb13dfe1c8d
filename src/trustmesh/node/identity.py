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

from trustmesh.api.ca_client import Attester, recorded_devices, rotate_node
from trustmesh.crypto.keys import KeyKind, PrivateKey
from trustmesh.keystore.filestore import load_key_file
from trustmesh.keystore.signer import Signer
from trustmesh.keystore.uri import open_signer
from trustmesh.mesh.link import ALPN
from trustmesh.mesh.node import NodeIdentity
from trustmesh.mesh.trust import TrustView
from trustmesh.pki.errors import PkiError
from trustmesh.pki.extensions import device_public_key, identity_binding_of, spki_der
from trustmesh.tls import TlsConfig, TlsContext


@dataclass
class Identity:
    key: PrivateKey  # node.key: the TLS key
    chain: tuple[x509.Certificate, ...]
    server: TlsContext  # links
    client: TlsContext  # links
    api: TlsContext  # the HTTPS API
    # What gossip, bundles and records are signed with: the device identity key when the
    # node has one (its certificate binds it, docs/protocols/keys.md), else node.key.
    signer: Signer

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
            self.signer,
            self.chain_der,
            int(cert.not_valid_before_utc.timestamp() * 1000),
            int(cert.not_valid_after_utc.timestamp() * 1000),
            cert.serial_number,
        )


def load_identity(
    directory: Path,
    passphrase: bytes | None,
    trust: TrustView,
    device: Signer | None = None,
) -> Identity:
    """The node's key and chain from ``directory``; their issuers join ``trust`` (they
    sign the CRLs the node takes). ``device`` is the identity key on a device, which
    the certificate must bind (else the node would sign what peers cannot verify)."""
    key = load_key_file(directory / "node.key", passphrase)
    chain = tuple(x509.load_pem_x509_certificates((directory / "node.crt").read_bytes()))
    if device is not None:
        bound = identity_binding_of(chain[0])
        ours = spki_der(device_public_key(device))
        if bound is None or bound.identity_spki != ours:
            raise PkiError(
                f"{directory / 'node.crt'} does not bind the device identity key: enroll"
                " or rotate with it (docs/protocols/keys.md)"
            )
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
        key if device is None else device,
    )


async def rotate_identity(
    directory: Path,
    passphrase: bytes | None,
    ca_url: str,
    trust: TrustView,
    device: Signer | None = None,
    attester: Attester | None = None,
) -> Identity:
    """Rotate through the CA's ``/v1/rotate`` (a new key and certificate, the old pair
    kept for the overlap: api.ca_client.rotate_node), then load the new identity. A
    device identity authorizes the new TLS key; an attester quotes for the CA again."""
    await asyncio.to_thread(
        rotate_node,
        directory,
        passphrase=passphrase,
        ca_url=ca_url,
        identity=device,
        attester=attester,
    )
    return load_identity(directory, passphrase, trust, device)


def open_node_signer(directory: Path, passphrase: bytes | None) -> Signer:
    """What the node in ``directory`` signs gossip and bundles with: the device identity
    it enrolled with, else node.key (close a device's with keystore.uri.close_signer)."""
    identity_uri = recorded_devices(directory).get("identity_key")
    if identity_uri is not None:
        return open_signer(identity_uri, kinds={KeyKind.P256})
    return load_key_file(directory / "node.key", passphrase)
