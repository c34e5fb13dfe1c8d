"""BRC-103 mutual authentication with selective-disclosure certificates (sans-IO).

Transports live elsewhere: :mod:`trustmesh.io.brc103` (asyncio, in memory),
:mod:`trustmesh.io.brc103_ws` (WebSocket), :mod:`trustmesh.io.brc103_socketio`
(Socket.IO, the reference authsocket binding), :mod:`trustmesh.api.brc104` and
:mod:`trustmesh.api.authfetch` (HTTP). ``docs/protocols/brc103.md`` is the wire format.
"""

from trustmesh.brc103.certificates import Certificate, MasterCertificate, VerifiableCertificate
from trustmesh.brc103.messages import AuthMessage, MessageType, RequestedCertificates
from trustmesh.brc103.peer import Peer, PeerConfig
from trustmesh.brc103.revocation import (
    LocalRevocationRegistry,
    NoRevocationCheck,
    RevocationChecker,
)
from trustmesh.brc103.wallet import Wallet

__all__ = [
    "AuthMessage",
    "Certificate",
    "LocalRevocationRegistry",
    "MasterCertificate",
    "MessageType",
    "NoRevocationCheck",
    "Peer",
    "PeerConfig",
    "RequestedCertificates",
    "RevocationChecker",
    "VerifiableCertificate",
    "Wallet",
]
