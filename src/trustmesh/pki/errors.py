"""PKI errors."""

from __future__ import annotations

from trustmesh.errors import ProtocolError


class PkiError(ProtocolError):
    """A CA operation failed or was refused."""


class CsrRejected(PkiError):
    """A certificate signing request is malformed, badly signed, or breaks the policy."""


class UnknownCertificate(PkiError):
    """No certificate with that serial or node_id was issued by this CA."""
