"""JWKS and detached JWS (RFC 7515 appendix F) for Catalyst OPEN messages.

The sender puts its public keys in the OPEN's ``jwks`` and signs, with one of them,
``canonical OPEN || exporter``: the OPEN without its proofs (keys sorted, no spaces) and
32 bytes of the TLS exporter for this session, so the signature cannot be replayed on
another session. ``jws`` carries the compact serialization with the payload left out.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, KeySet, OKPKey

from trustmesh.catalyst import messages as m
from trustmesh.catalyst.errors import CatalystError

JWS_EXPORTER_LABEL = b"EXPORTER-catalyst-jws"
# "Ed25519" is RFC 9864's fully specified name for what RFC 8037 called "EdDSA".
ALGORITHMS = ("ES256", "Ed25519")
# Only asymmetric signing keys may come from a peer: an "oct" key would let the peer pick
# an HMAC secret, and other curves are not ours to support.
ALLOWED_KEYS = {("EC", "P-256"), ("OKP", "Ed25519")}
MAX_KEYS = 16


class JwsSigner:
    """A private JWK (P-256 for ES256, or Ed25519) that signs our OPENs; its ``kid`` is its RFC 7638
    thumbprint unless the file says otherwise."""

    def __init__(self, key: ECKey | OKPKey) -> None:
        if isinstance(key, ECKey) and key.curve_name != "P-256":
            raise ValueError("JWS keys are P-256 (ES256) or Ed25519 (EdDSA)")
        self.key = key
        self.alg = "ES256" if isinstance(key, ECKey) else "Ed25519"
        self.kid = str(key.kid or key.thumbprint())
        key.ensure_kid()

    @classmethod
    def from_pem_file(cls, path: Path) -> JwsSigner:
        data = path.read_bytes()
        for kind in (ECKey, OKPKey):
            try:
                key = kind.import_key(data)
            except (JoseError, ValueError, TypeError):
                continue
            if not key.is_private:
                raise ValueError(f"{path} holds a public key; the JWS key must be private")
            return cls(key)
        raise ValueError(f"{path} is not a P-256 or Ed25519 private key in PEM")

    def jwks(self) -> dict[str, Any]:
        public = dict(self.key.as_dict(private=False))
        public["kid"] = self.kid
        public["alg"] = self.alg
        return {"keys": [public]}

    def sign_detached(self, payload: bytes) -> str:
        compact = jws.serialize_compact(
            {"alg": self.alg, "kid": self.kid}, payload, self.key, algorithms=[self.alg]
        )
        return str(jws.detach_content(compact))


def verify_detached(detached: str, payload: bytes, jwks: dict[str, Any]) -> str:
    """Check ``detached`` over ``payload`` with a key from ``jwks`` and return its kid;
    raise CatalystError with the NOTIFICATION subcode (2/243 bad signature, 2/244 unknown
    kid, 2/245 bad JWKS)."""
    keys = jwks.get("keys")
    if not isinstance(keys, list) or not 0 < len(keys) <= MAX_KEYS:
        raise _error(f"jwks must hold 1..{MAX_KEYS} keys", m.JWKS_MALFORMED)
    for key in keys:
        if not isinstance(key, dict) or (key.get("kty"), key.get("crv")) not in ALLOWED_KEYS:
            raise _error("jwks keys must be EC P-256 or OKP Ed25519 public keys", m.JWKS_MALFORMED)
        if "d" in key:
            raise _error("jwks must not carry private keys", m.JWKS_MALFORMED)
    try:
        key_set = KeySet.import_key_set({"keys": keys})
    except (JoseError, ValueError, TypeError, KeyError) as exc:
        raise _error(f"jwks does not import: {exc}", m.JWKS_MALFORMED) from None
    parts = detached.split(".")
    if len(parts) != 3 or parts[1] != "":
        raise _error("jws must be a detached compact JWS (header..signature)", m.JWS_BAD_SIGNATURE)
    header = _header(parts[0])
    kid = header.get("kid")
    if not isinstance(kid, str) or not any(k.kid == kid for k in key_set.keys):
        raise _error(f"jws kid {kid!r} is not in the OPEN's jwks", m.JWS_UNKNOWN_KID)
    encoded = base64.urlsafe_b64encode(payload).rstrip(b"=").decode()
    try:
        jws.deserialize_compact(
            f"{parts[0]}.{encoded}.{parts[2]}", key_set, algorithms=list(ALGORITHMS)
        )
    except (JoseError, ValueError, TypeError, KeyError) as exc:
        raise _error(f"jws does not verify: {exc}", m.JWS_BAD_SIGNATURE) from None
    return kid


def _header(segment: str) -> dict[str, Any]:
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise _error("jws header is not base64url JSON", m.JWS_BAD_SIGNATURE) from None
    if not isinstance(header, dict):
        raise _error("jws header is not a JSON object", m.JWS_BAD_SIGNATURE)
    return header


def _error(text: str, subcode: int) -> CatalystError:
    return CatalystError(text, code=m.OPEN_MESSAGE_ERROR, subcode=subcode)
