"""Keys on a PKCS#11 token (an HSM; SoftHSM2 in tests), as a :class:`Signer`.

    signer = Pkcs11Signer.open("pkcs11:token=mesh;object=node-1")
    signer.sign(data)        # on the token; DER, low-S, like every trustmesh ECDSA key

The key never leaves the token: it is generated there, sensitive and not extractable.
SoftHSM2 has no CKM_ECDSA_SHA256, so the data is hashed here and the token signs the
digest with CKM_ECDSA; its raw r||s becomes DER with a low S. ECDH is CKM_ECDH1_DERIVE
with the null KDF, into a generic secret that is read once and destroyed.

Key URIs follow RFC 7512 (``token``, ``object``, ``pin-source``, ``module-path``). The
PIN comes from ``pin-source=file:...`` or ``$TRUSTMESH_PKCS11_PIN``, never from argv;
the module from ``module-path`` or ``$TRUSTMESH_PKCS11_MODULE``, else SoftHSM2's.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.util.ec import encode_named_curve_parameters

from trustmesh.crypto.keys import (
    KeyKind,
    PublicKey,
    low_s_der,
    uncompressed_point,
)
from trustmesh.errors import ProtocolError

PIN_ENV = "TRUSTMESH_PKCS11_PIN"
MODULE_ENV = "TRUSTMESH_PKCS11_MODULE"
SOFTHSM2_MODULES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)
MAX_URI = 2048
CURVES = {KeyKind.P256: "secp256r1", KeyKind.SECP256K1: "secp256k1"}


_LOGINS: dict[tuple[str, str], bytes] = {}  # (module, token) -> SHA-256 of the PIN used


class Pkcs11Error(ProtocolError):
    """A PKCS#11 key URI, module, token, PIN or key that cannot be used."""


@dataclass(frozen=True)
class Pkcs11Uri:
    """The parts of an RFC 7512 URI that name a key: the token's label, the key's
    label, where the PIN is, and the module (empty: unset)."""

    token: str
    object: str
    pin_source: str = ""
    module_path: str = ""

    @classmethod
    def parse(cls, text: str) -> Pkcs11Uri:
        if not isinstance(text, str) or not text.startswith("pkcs11:"):
            raise Pkcs11Error("a PKCS#11 key URI starts with pkcs11:")
        if len(text) > MAX_URI:
            raise Pkcs11Error(f"a PKCS#11 key URI is at most {MAX_URI} characters")
        path, _, query = text[len("pkcs11:") :].partition("?")
        fields: dict[str, str] = {}
        for part in [p for p in path.split(";") if p] + [q for q in query.split("&") if q]:
            name, equals, value = part.partition("=")
            if not equals or not name:
                raise Pkcs11Error(f"{part[:40]!r} is not name=value")
            if name in fields:
                raise Pkcs11Error(f"{name} is given twice")
            try:
                fields[name] = unquote(value, errors="strict")
            except UnicodeDecodeError:
                raise Pkcs11Error(f"{name} is not UTF-8 once percent-decoded") from None
        if "pin-value" in fields:
            raise Pkcs11Error("a PIN is never put in a URI: use pin-source=file:... or $" + PIN_ENV)
        token, label = fields.get("token", ""), fields.get("object", "")
        if not token or not label:
            raise Pkcs11Error("a PKCS#11 key URI names its token= and its object=")
        return cls(token, label, fields.get("pin-source", ""), fields.get("module-path", ""))

    def pin(self) -> str:
        if self.pin_source:
            if not self.pin_source.startswith("file:"):
                raise Pkcs11Error("pin-source is file:<path>")
            path = Path(self.pin_source[len("file:") :])
            try:
                return path.read_text().strip()
            except OSError as exc:
                raise Pkcs11Error(f"cannot read the PIN from {path}: {exc}") from None
        pin = os.environ.get(PIN_ENV)
        if not pin:
            raise Pkcs11Error(f"no PIN: give pin-source=file:... in the URI, or set ${PIN_ENV}")
        return pin

    def module(self) -> str:
        if self.module_path:
            return self.module_path
        if os.environ.get(MODULE_ENV):
            return os.environ[MODULE_ENV]
        for candidate in SOFTHSM2_MODULES:
            if Path(candidate).exists():
                return candidate
        raise Pkcs11Error(f"no PKCS#11 module: give module-path= or set ${MODULE_ENV}")


class Pkcs11Signer:
    """A key on a token, through one open session (not thread-safe: one owner)."""

    def __init__(self, session: Any, private: Any, public: PublicKey) -> None:
        self._session = session
        self._private = private
        self._public = public
        self.kind = public.kind

    @classmethod
    def open(cls, uri: str) -> Pkcs11Signer:
        """The key ``uri`` names (raises :class:`Pkcs11Error`)."""
        parsed = Pkcs11Uri.parse(uri)
        session = _session(parsed)
        try:
            private = session.get_key(ObjectClass.PRIVATE_KEY, KeyType.EC, label=parsed.object)
            public = session.get_key(ObjectClass.PUBLIC_KEY, KeyType.EC, label=parsed.object)
        except (pkcs11.NoSuchKey, pkcs11.MultipleObjectsReturned) as exc:
            session.close()
            message = f"no single key {parsed.object!r} on {parsed.token!r}: {exc!r}"
            raise Pkcs11Error(message) from None
        return cls(session, private, _public_key(public))

    @classmethod
    def generate(cls, uri: str, kind: KeyKind) -> Pkcs11Signer:
        """A new key pair generated on the token: sensitive, never extractable."""
        if kind not in CURVES:
            raise Pkcs11Error(f"a token key is P-256 or secp256k1, not {kind}")
        parsed = Pkcs11Uri.parse(uri)
        session = _session(parsed)
        try:
            params = session.create_domain_parameters(
                KeyType.EC,
                {Attribute.EC_PARAMS: encode_named_curve_parameters(CURVES[kind])},
                local=True,
            )
            public, private = params.generate_keypair(
                store=True,
                label=parsed.object,
                private_template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False},
            )
        except pkcs11.PKCS11Error as exc:
            session.close()
            raise Pkcs11Error(f"the token refused to generate a {kind} key: {exc!r}") from None
        return cls(session, private, _public_key(public))

    def public_key(self) -> PublicKey:
        return self._public

    def sign(self, data: bytes) -> bytes:
        return self.sign_digest(hashlib.sha256(data).digest())

    def sign_digest(self, digest: bytes) -> bytes:
        if len(digest) != 32:
            raise ValueError("digest must be 32 bytes")
        raw = self._private.sign(digest, mechanism=Mechanism.ECDSA)
        return low_s_der(
            self.kind, int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
        )

    def ecdh(self, peer: PublicKey) -> bytes:
        if peer.kind != self.kind:
            raise Pkcs11Error(f"ECDH needs a {self.kind} peer key, got {peer.kind}")
        point = uncompressed_point(peer)
        secret = self._private.derive_key(
            KeyType.GENERIC_SECRET,
            256,
            mechanism_param=(pkcs11.KDF.NULL, None, point),
            template={Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True},
        )
        try:
            return bytes(secret[Attribute.VALUE])
        finally:
            secret.destroy()

    def close(self) -> None:
        self._session.close()


def _session(uri: Pkcs11Uri) -> Any:
    try:
        library = pkcs11.lib(uri.module())
        token = library.get_token(token_label=uri.token)
        pin = uri.pin()
        key = (uri.module(), uri.token)
        try:
            session = token.open(user_pin=pin, rw=True)
        except pkcs11.UserAlreadyLoggedIn:
            # Login is per process, not per session: another key of ours logged in, and
            # only the PIN it used opens more (the token cannot check it again).
            if _LOGINS.get(key) != hashlib.sha256(pin.encode()).digest():
                raise pkcs11.PinIncorrect() from None
            return token.open(rw=True)
        _LOGINS[key] = hashlib.sha256(pin.encode()).digest()
        return session
    except (pkcs11.NoSuchToken, pkcs11.MultipleTokensReturned):
        raise Pkcs11Error(f"no single token labelled {uri.token!r}") from None
    except pkcs11.PinIncorrect:
        raise Pkcs11Error(f"the PIN of token {uri.token!r} is not right") from None
    except (pkcs11.PKCS11Error, RuntimeError, OSError) as exc:
        raise Pkcs11Error(f"cannot open token {uri.token!r}: {exc!r}") from None


def _public_key(public: Any) -> PublicKey:
    """The token's EC_POINT (a DER OCTET STRING of the uncompressed point) and curve."""
    params = bytes(public[Attribute.EC_PARAMS])
    for kind, curve in CURVES.items():
        if params == encode_named_curve_parameters(curve):
            point = bytes(public[Attribute.EC_POINT])
            if len(point) == 67 and point[:2] == b"\x04\x41":
                point = point[2:]  # the DER wrapping SoftHSM2 keeps
            return PublicKey.from_bytes(kind, point)  # uncompressed, as both curves parse
    raise Pkcs11Error("the token key is on a curve trustmesh does not use")
