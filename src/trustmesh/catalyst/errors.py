"""Catalyst errors. Each carries the RFC 4271 NOTIFICATION (code, subcode) it answers."""

from __future__ import annotations

from trustmesh.errors import DecodeError, ProtocolError


class CatalystError(ProtocolError):
    """A session failed; ``code``/``subcode`` are what the NOTIFICATION says."""

    def __init__(self, message: str, *, code: int, subcode: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.subcode = subcode


class MessageError(CatalystError, DecodeError):
    """A message that does not parse or breaks the schema (NOTIFICATION 1 or 2)."""

    def __init__(self, message: str, *, code: int = 1, subcode: int = 0) -> None:
        DecodeError.__init__(self, message)
        self.code = code
        self.subcode = subcode


class PeeringFailed(ProtocolError):
    """A session ended before it was Established, or could not start.

    ``notification`` is the (code, subcode) of the NOTIFICATION that ended it and
    ``direction`` whether we sent or received it; both are None for a TLS or transport
    failure, which ``reason`` then describes.
    """

    def __init__(
        self,
        reason: str,
        *,
        notification: tuple[int, int] | None = None,
        direction: str | None = None,
        peer_id: str | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.notification = notification
        self.direction = direction
        self.peer_id = peer_id
