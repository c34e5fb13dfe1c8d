"""BOTD #2 errors. Each one that a peer causes closes that peer's connection."""

from __future__ import annotations

from trustmesh.errors import ConnectionClosedError, ProtocolError


class BotdError(ProtocolError):
    """Root of the BOTD #2 errors."""


class HandshakeError(BotdError):
    """An Init or Ack was malformed, mis-signed, misaddressed, replayed or refused."""


class PolicyError(HandshakeError):
    """The peer's identity key is not on the allow-list."""


class PeerMisbehaved(BotdError):
    """The peer broke the protocol after the handshake (a ping flood, an unsolicited pong,
    a frame out of place)."""


class PingTooSoonError(BotdError):
    """The application asked for a ping sooner than the configured ping interval allows.

    Raised to the caller; the connection stays up."""


class HandshakeFailed(ConnectionClosedError):
    """The connection closed before the handshake completed; ``reason`` says why, and
    ``by_peer`` whether the peer hung up (a responder refuses without saying why)."""

    def __init__(self, reason: str, *, by_peer: bool = False) -> None:
        super().__init__(reason)
        self.by_peer = by_peer
