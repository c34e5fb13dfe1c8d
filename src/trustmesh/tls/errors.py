"""TLS errors: the handshake or a record failed, or the configuration is unusable."""

from __future__ import annotations

from trustmesh.errors import ProtocolError


class TlsError(ProtocolError):
    """A TLS handshake or record failed; the message says why (OpenSSL's reason)."""


class TlsConfigError(TlsError):
    """Certificates, keys or settings that cannot make a TLS context."""
