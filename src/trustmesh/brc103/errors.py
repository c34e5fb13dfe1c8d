"""BRC-103 errors. Each carries a stable ``code`` for error replies (BRC-104 bodies)."""

from __future__ import annotations

from trustmesh.errors import DecodeError, ProtocolError

MAX_QUOTED = 40  # characters of a peer's text that an error message quotes


def quoted(text: str, limit: int = MAX_QUOTED) -> str:
    """``repr`` of at most ``limit`` characters of ``text`` (a name a peer sent), with an
    ellipsis when cut: an error message never carries much of what it complains about."""
    return repr(text[:limit]) + ("\u2026" if len(text) > limit else "")


class Brc103Error(ProtocolError):
    """Root of the BRC-103 errors."""

    code = "ERR_BRC103"


class InvalidProtocolIdError(Brc103Error, ValueError):
    """A BRC-43 protocol ID or key ID breaks the reference's rules."""

    code = "ERR_INVALID_PROTOCOL_ID"


class MalformedMessageError(Brc103Error, DecodeError):
    """An AuthMessage is not valid JSON of the right shape."""

    code = "ERR_MALFORMED_MESSAGE"


class UnsupportedVersionError(MalformedMessageError):
    """The message's ``version`` is not ``0.1``."""

    code = "ERR_UNSUPPORTED_VERSION"


class NonceError(Brc103Error):
    """A ``yourNonce`` is not one of ours (its HMAC does not verify)."""

    code = "ERR_INVALID_NONCE"


class SessionNotFoundError(Brc103Error):
    """No session answers to this nonce or identity key."""

    code = "ERR_SESSION_NOT_FOUND"


class MessageSignatureError(Brc103Error):
    """A message's signature does not verify under the sender's derived key."""

    code = "ERR_INVALID_SIGNATURE"


class ReplayError(Brc103Error):
    """A message nonce was already accepted in this session."""

    code = "ERR_REPLAYED_MESSAGE"


class IdentityMismatchError(Brc103Error):
    """A message names an identity key other than the session's peer."""

    code = "ERR_IDENTITY_MISMATCH"


class UnexpectedMessageError(Brc103Error):
    """A message arrived that the session's state does not allow (a stray initialResponse,
    a general message before the handshake)."""

    code = "ERR_UNEXPECTED_MESSAGE"


class HandshakeTimeoutError(Brc103Error):
    """The peer did not answer an initialRequest in time."""

    code = "ERR_HANDSHAKE_TIMEOUT"


class CertificateError(Brc103Error):
    """A certificate is malformed, mis-signed, revoked, unrequested or undecryptable."""

    code = "ERR_INVALID_CERTIFICATE"


class CertificateFormatError(CertificateError, DecodeError):
    """A certificate's JSON or binary form cannot be parsed."""

    code = "ERR_MALFORMED_CERTIFICATE"


class CertificateRevokedError(CertificateError):
    """The certificate's revocation outpoint is spent (revoked)."""

    code = "ERR_CERTIFICATE_REVOKED"


class RevocationUncheckedError(CertificateError):
    """The certificate can be revoked (its outpoint is not the 36 zero bytes) and no
    revocation source is configured that could say whether it is."""

    code = "ERR_REVOCATION_UNCHECKED"


class UnrequestedCertificateError(CertificateError):
    """A certificate from a certifier, of a type, or revealing a field that was not requested."""

    code = "ERR_UNREQUESTED_CERTIFICATE"


class CertificatesMissingError(CertificateError):
    """The peer has none of the certificates we require: it said so (an empty
    certificateResponse), or sent none within the grace after its first held message."""

    code = "ERR_CERTIFICATES_MISSING"


class CertificatesTimeoutError(Brc103Error):
    """Required certificates did not arrive in time; held general messages are dropped."""

    code = "ERR_CERTIFICATE_TIMEOUT"


class TransportError(Brc103Error):
    """The transport failed or the other side answered outside the protocol."""

    code = "ERR_TRANSPORT"
