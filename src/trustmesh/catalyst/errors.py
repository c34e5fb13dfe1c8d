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
