"""JWKS and detached JWS (RFC 7515 appendix F) for Catalyst OPEN messages.

The sender puts its public keys in the OPEN's ``jwks`` and signs, with one of them,
``canonical OPEN || exporter``: the OPEN without its proofs (keys sorted, no spaces) and
32 bytes of the TLS exporter for this session, so the signature cannot be replayed on
another session. ``jws`` carries the compact serialization with the payload left out.

A key is named by its RFC 7638 thumbprint (``kid``), never by a name its sender chose:
what the peering policy sees as ``jws_kid`` is the hash of the key that signed.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, OKPKey

from trustmesh.catalyst import messages as m
from trustmesh.catalyst.errors import CatalystError

JWS_EXPORTER_LABEL = b"EXPORTER-catalyst-jws"
# "Ed25519" is RFC 9864's fully specified name for what RFC 8037 called "EdDSA".
ALGORITHMS = ("ES256", "Ed25519")
# Only asymmetric signing keys may come from a peer: an "oct" key would let the peer pick
# an HMAC secret, and other curves are not ours to support.
ALLOWED_KEYS = {("EC", "P-256"), ("OKP", "Ed25519")}
MAX_KEYS = 16
# What a public JWK may carry (RFC 7517 section 4), and what our JWS header may.
KEY_MEMBERS = {"kty", "crv", "x", "y", "kid", "alg", "use", "key_ops"}
HEADER_MEMBERS = {"alg", "kid", "typ"}
_B64URL = re.compile(r"[A-Za-z0-9_-]*")


class JwsSigner:
    """A private JWK (P-256 for ES256, or Ed25519) that signs our OPENs; its ``kid`` is
    its RFC 7638 thumbprint, the only kid a peer accepts."""

    def __init__(self, key: ECKey | OKPKey) -> None:
        if isinstance(key, ECKey) and key.curve_name != "P-256":
            raise ValueError("JWS keys are P-256 (ES256) or Ed25519 (EdDSA)")
        if isinstance(key, OKPKey) and key.curve_name != "Ed25519":
            raise ValueError("JWS keys are P-256 (ES256) or Ed25519 (EdDSA)")
        thumbprint = key.thumbprint()
        if key.kid is not None and key.kid != thumbprint:
            raise ValueError(
                f"JWS key kid {key.kid!r} is not its RFC 7638 thumbprint {thumbprint}; "
                "peers refuse any other kid"
            )
        self.key = key
        self.alg = "ES256" if isinstance(key, ECKey) else "Ed25519"
        self.kid = thumbprint
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
    """Check ``detached`` over ``payload`` with a key from ``jwks`` and return that key's
    RFC 7638 thumbprint, the only name a key has here; raise CatalystError with the
    NOTIFICATION subcode (2/243 bad signature, 2/244 unknown kid, 2/245 bad JWKS).

    Every input is checked before joserfc sees it (members, base64url, lengths, JSON
    depth), so a hostile OPEN gets its NOTIFICATION and never an exception.
    """
    keys = import_jwks(jwks)
    header_segment, signature_segment = _split(detached)
    header = _header(header_segment)
    alg = header.get("alg")
    if alg not in ALGORITHMS:
        raise _error(f"jws alg {alg!r} is not one of {', '.join(ALGORITHMS)}", m.JWS_BAD_SIGNATURE)
    kid = header.get("kid")
    key = keys.get(kid) if isinstance(kid, str) else None
    if key is None:
        raise _error(
            f"jws kid {_short(kid)} is not the thumbprint of a key in the OPEN's jwks",
            m.JWS_UNKNOWN_KID,
        )
    assert isinstance(kid, str)
    if _alg_for(key) != alg:
        raise _error(f"jws alg {alg} does not fit the key {kid}", m.JWS_BAD_SIGNATURE)
    encoded = base64.urlsafe_b64encode(payload).rstrip(b"=").decode()
    try:
        jws.deserialize_compact(
            f"{header_segment}.{encoded}.{signature_segment}", key, algorithms=[alg]
        )
    except (JoseError, ValueError, TypeError, KeyError) as exc:
        raise _error(f"jws does not verify: {exc}", m.JWS_BAD_SIGNATURE) from None
    return kid


def import_jwks(jwks: dict[str, Any]) -> dict[str, ECKey | OKPKey]:
    """The OPEN's public keys by RFC 7638 thumbprint. A key may carry a ``kid`` only if
    it is that thumbprint: a free-form kid would let any fresh key claim the name a
    policy pins (2/245)."""
    keys = jwks.get("keys")
    if not isinstance(keys, list) or not 0 < len(keys) <= MAX_KEYS:
        raise _error(f"jwks must hold 1..{MAX_KEYS} keys", m.JWKS_MALFORMED)
    result: dict[str, ECKey | OKPKey] = {}
    for index, member in enumerate(keys):
        key = _import_key(member, index)
        result[key.thumbprint()] = key
    return result


def _import_key(member: object, index: int) -> ECKey | OKPKey:
    where = f"jwks key {index}"
    if not isinstance(member, dict) or not any(
        member.get("kty") == kty and member.get("crv") == crv for kty, crv in ALLOWED_KEYS
    ):
        raise _error(f"{where}: keys must be EC P-256 or OKP Ed25519 public keys", m.JWKS_MALFORMED)
    if "d" in member:
        raise _error(f"{where}: jwks must not carry private keys", m.JWKS_MALFORMED)
    extra = set(member) - KEY_MEMBERS
    if extra:
        raise _error(f"{where}: unknown members {sorted(extra)[:4]}", m.JWKS_MALFORMED)
    ec = member["kty"] == "EC"
    clean = {"kty": member["kty"], "crv": member["crv"], "x": _coordinate(member, "x", where)}
    if ec:
        clean["y"] = _coordinate(member, "y", where)
    elif "y" in member:
        raise _error(f"{where}: an OKP key has no y", m.JWKS_MALFORMED)
    try:
        key: ECKey | OKPKey = ECKey.import_key(clean) if ec else OKPKey.import_key(clean)
    except (JoseError, ValueError, TypeError, KeyError) as exc:
        raise _error(f"{where} does not import: {exc}", m.JWKS_MALFORMED) from None
    thumbprint = key.thumbprint()
    kid = member.get("kid")
    if kid is not None and kid != thumbprint:
        raise _error(
            f"{where}: kid {_short(kid)} is not the key's RFC 7638 thumbprint {thumbprint}",
            m.JWKS_MALFORMED,
        )
    alg = member.get("alg")
    if alg is not None and alg != _alg_for(key):
        raise _error(f"{where}: alg {_short(alg)} does not fit the key", m.JWKS_MALFORMED)
    if member.get("use", "sig") != "sig":
        raise _error(f"{where}: use must be sig", m.JWKS_MALFORMED)
    ops = member.get("key_ops", ["verify"])
    if not isinstance(ops, list) or "verify" not in ops:
        raise _error(f"{where}: key_ops must allow verify", m.JWKS_MALFORMED)
    return key


def _coordinate(member: dict[str, Any], name: str, where: str) -> str:
    value = member.get(name)
    if not isinstance(value, str) or not _B64URL.fullmatch(value) or len(value) != 43:
        raise _error(f"{where}: {name} must be 32 bytes in base64url", m.JWKS_MALFORMED)
    return value


def _alg_for(key: ECKey | OKPKey) -> str:
    return "ES256" if isinstance(key, ECKey) else "Ed25519"


def _split(detached: str) -> tuple[str, str]:
    parts = detached.split(".")
    if len(parts) != 3 or parts[1] != "":
        raise _error("jws must be a detached compact JWS (header..signature)", m.JWS_BAD_SIGNATURE)
    if not all(_B64URL.fullmatch(part) and part for part in (parts[0], parts[2])):
        raise _error("jws header and signature must be base64url", m.JWS_BAD_SIGNATURE)
    return parts[0], parts[2]


def _header(segment: str) -> dict[str, Any]:
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        header = json.loads(raw, object_pairs_hook=_unique, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise _error("jws header is not base64url JSON", m.JWS_BAD_SIGNATURE) from None
    if not isinstance(header, dict):
        raise _error("jws header is not a JSON object", m.JWS_BAD_SIGNATURE)
    extra = set(header) - HEADER_MEMBERS
    if extra:
        # "crit", "b64", "jwk", "jku", "x5u" ... would each change what is verified, or how.
        raise _error(f"jws header has unsupported members {sorted(extra)[:4]}", m.JWS_BAD_SIGNATURE)
    return header


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate member")  # RFC 7515 section 4: refuse, or take the last
    return result


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _error(text: str, subcode: int) -> CatalystError:
    return CatalystError(text, code=m.OPEN_MESSAGE_ERROR, subcode=subcode)
