"""PKI errors."""

from __future__ import annotations

from trustmesh.errors import ProtocolError


class PkiError(ProtocolError):
    """A CA operation failed or was refused."""


class CsrRejected(PkiError):
    """A certificate signing request is malformed, badly signed, or breaks the policy."""


class UnknownCertificate(PkiError):
    """No certificate with that serial or node_id was issued by this CA."""


class TokenRejected(PkiError):
    """An enrollment token is unknown, expired, already used, or for another node."""


class PolicyDenied(PkiError):
    """The enrollment policy refuses the node (not on the allow-list, mesh full, revoked)."""


class AttestationFailed(PkiError):
    """An attestation is missing where the policy requires one, or does not verify."""


class NotAuthenticated(PkiError):
    """A request needs a credential (a mesh client certificate, an admin token) that it
    did not present, or presented invalid."""


class CertificateExpired(NotAuthenticated):
    """The certificate a request is authenticated with has expired."""


class CertificateRevoked(PolicyDenied):
    """The certificate a request is authenticated with is revoked (by its serial, or
    with every certificate of its node_id)."""


class Superseded(PkiError):
    """The certificate asked to rotate already has a successor (or its node holds a
    newer live certificate): only the node's newest live certificate may rotate."""


class SerialMismatch(PkiError):
    """``current_cert_serial`` names another certificate than the client certificate."""


class UnknownAdminToken(PkiError):
    """No admin token has that id."""


class StoreUnavailable(PkiError):
    """The CA's database cannot be reached (or did not answer in time): nothing was
    decided, or the outcome is unknown; the same request may be sent again."""
