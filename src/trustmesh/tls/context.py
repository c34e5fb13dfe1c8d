"""TLS 1.3 contexts with mutual authentication, built once per configuration.

pyOpenSSL, not the stdlib ``ssl``: only pyOpenSSL offers the RFC 8446 exporter
(``export_keying_material``) that binds PSK and JWS proofs to one session.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from OpenSSL._util import lib as _lib

from trustmesh.tls.errors import TlsConfigError

# Offered in this order; the first the build supports leads (OpenSSL 3.5+ has the hybrid).
HYBRID_GROUP = "X25519MLKEM768"
CLASSIC_GROUP = "X25519"
SESSION_TIMEOUT = 2 * 3600  # seconds a resumption ticket stays valid


@dataclass(frozen=True)
class TlsConfig:
    """One side's TLS settings: its certificate chain and key, the CA bundle it trusts
    for peers, an optional CRL file, and the ALPN protocols it speaks (in preference
    order)."""

    cert_file: Path
    key_file: Path
    ca_file: Path
    crl_file: Path | None = None
    alpn: Sequence[str] = field(default_factory=tuple)
    post_quantum: bool = True  # offer X25519MLKEM768 first when the build has it
    key_passphrase: bytes | None = field(default=None, repr=False)  # for an encrypted key
    # A server's stance on client certificates: "require" one that chains to the CA
    # bundle, or "request" one and accept whatever comes (none, or any chain), leaving
    # the verdict to the application (an HTTP API that answers 401 instead of an alert).
    client_auth: Literal["require", "request"] = "require"
    # Asked for the serial of each peer certificate that otherwise verifies: a live
    # revocation view (a mesh node's), where a CRL file would need a new context.
    is_revoked: Callable[[int], bool] | None = field(default=None, compare=False, repr=False)


class TlsContext:
    """A pyOpenSSL context for one role (client or server), made once and shared by every
    connection with that configuration."""

    def __init__(self, config: TlsConfig, *, server: bool) -> None:
        self.config = config
        self.server = server
        self.alpn = tuple(a.encode() for a in config.alpn)
        self.groups = _groups(config.post_quantum)
        self.ssl = self._build()

    def _build(self) -> SSL.Context:
        method = SSL.TLS_SERVER_METHOD if self.server else SSL.TLS_CLIENT_METHOD
        ctx = SSL.Context(method)
        ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
        ctx.set_max_proto_version(SSL.TLS1_3_VERSION)
        try:
            ctx.use_certificate_chain_file(str(self.config.cert_file))
            ctx.use_privatekey(self._private_key())
            ctx.check_privatekey()
            ctx.load_verify_locations(str(self.config.ca_file))
        except (SSL.Error, OSError) as exc:
            raise TlsConfigError(f"cannot load certificate, key or CA bundle: {exc}") from None
        if self.server and self.config.client_auth == "request":
            ctx.set_verify(SSL.VERIFY_PEER, _accept_any)
        elif self.config.is_revoked is not None:
            ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, self._not_revoked)
        else:
            # Both sides must present a certificate that chains to the CA bundle.
            ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT)
        if self.config.crl_file is not None:
            self._load_crl(ctx, self.config.crl_file)
        if _lib.SSL_CTX_set1_curves_list(ctx._context, ":".join(self.groups).encode()) != 1:
            raise TlsConfigError(f"OpenSSL refused the groups {self.groups}")
        if self.alpn:
            if self.server:
                ctx.set_alpn_select_callback(self._select_alpn)
            else:
                ctx.set_alpn_protos(list(self.alpn))
        if self.server:
            ctx.set_session_id(b"trustmesh")
            ctx.set_timeout(SESSION_TIMEOUT)
        else:
            ctx.set_session_cache_mode(SSL.SESS_CACHE_CLIENT)
        return ctx

    def _private_key(self) -> Any:
        # Loaded here rather than by OpenSSL, which would prompt on the terminal for an
        # encrypted key's passphrase.
        path = self.config.key_file
        data = path.read_bytes()
        passphrase = self.config.key_passphrase if key_is_encrypted(data) else None
        try:
            return serialization.load_pem_private_key(data, password=passphrase)
        except TypeError:
            raise TlsConfigError(f"{path} is encrypted and no passphrase was given") from None
        except ValueError as exc:
            raise TlsConfigError(f"cannot load private key {path}: {exc}") from None

    def _load_crl(self, ctx: SSL.Context, path: Path) -> None:
        try:
            data = path.read_bytes()
            crl = (
                x509.load_pem_x509_crl(data)
                if data.lstrip().startswith(b"-----")
                else x509.load_der_x509_crl(data)
            )
        except (OSError, ValueError) as exc:
            raise TlsConfigError(f"cannot load CRL {path}: {exc}") from None
        store = ctx.get_cert_store()
        assert store is not None
        store.add_crl(crl)
        # Only the leaf is checked: the CA bundle's own certificates carry no CRL here.
        store.set_flags(crypto.X509StoreFlags.CRL_CHECK)

    def _not_revoked(
        self, conn: SSL.Connection, cert: crypto.X509, error: int, depth: int, ok: int
    ) -> bool:
        # OpenSSL's own verdict stands; a revoked peer certificate (depth 0) fails too.
        is_revoked = self.config.is_revoked
        assert is_revoked is not None
        return bool(ok) and not (depth == 0 and is_revoked(cert.get_serial_number()))

    def _select_alpn(self, conn: SSL.Connection, offered: list[bytes]) -> Any:
        # Any: pyOpenSSL types the "no overlap" sentinel with a private class.
        for proto in self.alpn:
            if proto in offered:
                return proto
        return SSL.NO_OVERLAPPING_PROTOCOLS


def _accept_any(conn: SSL.Connection, cert: crypto.X509, error: int, depth: int, ok: int) -> bool:
    return True  # "request" mode: the application verifies the chain it is shown


def key_is_encrypted(pem: bytes) -> bool:
    """Whether a PEM private key is encrypted (PKCS#8 or OpenSSL's legacy headers)."""
    return b"ENCRYPTED" in pem


def _groups(post_quantum: bool) -> tuple[str, ...]:
    if post_quantum and hybrid_group_available():
        return (HYBRID_GROUP, CLASSIC_GROUP)
    return (CLASSIC_GROUP,)


@functools.cache
def hybrid_group_available() -> bool:
    """Whether the OpenSSL build pyOpenSSL runs on offers X25519MLKEM768."""
    probe = SSL.Context(SSL.TLS_CLIENT_METHOD)
    return bool(_lib.SSL_CTX_set1_curves_list(probe._context, HYBRID_GROUP.encode()) == 1)
