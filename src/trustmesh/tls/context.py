"""TLS 1.3 contexts with mutual authentication, built once per configuration.

pyOpenSSL, not the stdlib ``ssl``: only pyOpenSSL offers the RFC 8446 exporter
(``export_keying_material``) that binds PSK and JWS proofs to one session.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib

from trustmesh.tls.errors import TlsConfigError

# Offered in this order; the first the build supports leads (OpenSSL 3.5+ has the hybrid).
HYBRID_GROUP = "X25519MLKEM768"
CLASSIC_GROUP = "X25519"
SESSION_TIMEOUT = 2 * 3600  # seconds a resumption ticket stays valid, at most

log = logging.getLogger("trustmesh.tls")


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
        self._verify_callback: Any = None  # the cffi callback, kept alive with the context
        self._crl_store: crypto.X509Store | None = None  # a store replace_crl installed
        self._peer_store: crypto.X509Store | None = None  # refuse_resumed's, at the real time
        self.crl: x509.CertificateRevocationList | None = None  # the CRL file's, once loaded
        self.ssl = self._build()
        # Our own certificate (the chain file's first): its expiry bounds ticket lifetimes
        # and the life of every session made with this context.
        own_chain = x509.load_pem_x509_certificates(config.cert_file.read_bytes())
        self.certificate = own_chain[0]
        # A resumed session keeps the peer's certificate, not the intermediates it sent:
        # its chain is rebuilt with ours (a mesh's nodes share their issuing CA).
        self._intermediates = tuple(own_chain[1:])

    def _build(self) -> SSL.Context:
        method = SSL.TLS_SERVER_METHOD if self.server else SSL.TLS_CLIENT_METHOD
        ctx = SSL.Context(method)
        ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
        ctx.set_max_proto_version(SSL.TLS1_3_VERSION)
        try:
            ctx.use_certificate_chain_file(str(self.config.cert_file))
            ctx.use_privatekey(self.private_key())
            ctx.check_privatekey()
            ctx.load_verify_locations(str(self.config.ca_file))
        except (SSL.Error, OSError) as exc:
            raise TlsConfigError(f"cannot load certificate, key or CA bundle: {exc}") from None
        if self.server and self.config.client_auth == "request":
            ctx.set_verify(SSL.VERIFY_PEER, _accept_any)
        elif self.config.is_revoked is not None:
            self._set_revocation_callback(ctx)
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
        return self.private_key()

    def private_key(self) -> Any:
        """The configuration's private key (a ``cryptography`` key object)."""
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
            crl = parse_crl(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise TlsConfigError(f"cannot load CRL {path}: {exc}") from None
        store = ctx.get_cert_store()
        assert store is not None
        store.add_crl(crl)
        # Only the leaf is checked: the CA bundle's own certificates carry no CRL here.
        store.set_flags(crypto.X509StoreFlags.CRL_CHECK)
        self.crl = crl

    def replace_crl(self, crl: x509.CertificateRevocationList) -> None:
        """Check peers against ``crl`` from the next handshake (and resumption) on,
        instead of the CRL loaded so far. The CRL must be signed by a CA of the bundle
        and be no older than the current one (an old CRL replayed must not lift a
        revocation); otherwise :class:`TlsConfigError` and nothing changes.

        A fresh X509 store replaces the context's, so that CRLs do not pile up in it
        (OpenSSL keeps every CRL added to a store); connections in progress verify
        against the store of the moment they verify."""
        check_crl(crl, self.config.ca_file, also=self._intermediates)
        current = self.crl
        if current is not None and crl.last_update_utc < current.last_update_utc:
            raise TlsConfigError(
                f"the CRL was issued at {crl.last_update_utc:%Y-%m-%dT%H:%M:%SZ}, before "
                f"the one in use ({current.last_update_utc:%Y-%m-%dT%H:%M:%SZ})"
            )
        store = crypto.X509Store()
        try:
            store.load_locations(str(self.config.ca_file))
        except crypto.Error as exc:
            raise TlsConfigError(f"cannot load CA bundle: {exc}") from None
        store.add_crl(crl)
        store.set_flags(crypto.X509StoreFlags.CRL_CHECK)
        raw: Any = store._store
        # The context takes a reference (and frees its old store); pyOpenSSL's object
        # keeps its own.
        _lib.X509_STORE_up_ref(raw)
        _lib.SSL_CTX_set_cert_store(self.ssl._context, raw)
        self._crl_store = store
        self._peer_store = None
        self.crl = crl

    def crl_revokes(self, cert: x509.Certificate) -> bool:
        """Whether the CRL in use lists ``cert`` (a certificate of the CRL's issuer)."""
        crl = self.crl
        return (
            crl is not None
            and cert.issuer == crl.issuer
            and crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None
        )

    def _set_revocation_callback(self, ctx: SSL.Context) -> None:
        """Verify as OpenSSL does, then look the depth-0 certificate up in the live
        revocation view. A revoked one fails with ``X509_V_ERR_CERT_REVOKED``, so the peer
        gets the ``certificate_revoked`` alert and our log says "certificate revoked".

        pyOpenSSL's ``set_verify`` callback cannot set the verify error (returning false
        gives "unspecified certificate verification error" and an ``internal_error``
        alert), so the callback is installed through the cffi binding itself."""
        is_revoked = self.config.is_revoked
        assert is_revoked is not None

        def verify(ok: int, store_ctx: Any) -> int:
            if not ok or _lib.X509_STORE_CTX_get_error_depth(store_ctx) != 0:
                return ok  # OpenSSL's own verdict on the chain stands
            try:
                serial = _serial_of(_lib.X509_STORE_CTX_get_current_cert(store_ctx))
                revoked = is_revoked(serial)
            except Exception:  # never let an exception cross into OpenSSL
                log.exception("the revocation check failed; refusing the certificate")
                revoked = True
            if revoked:
                _lib.X509_STORE_CTX_set_error(store_ctx, _lib.X509_V_ERR_CERT_REVOKED)
                return 0
            return 1

        self._verify_callback = _ffi.callback("int (*)(int, X509_STORE_CTX *)", verify)
        mode = SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT
        _lib.SSL_CTX_set_verify(ctx._context, mode, self._verify_callback)

    # --- resumption (zero-trust-mesh.md section 2.3) ------------------------------------

    def ticket_lifetime(self, unix_now: float) -> int:
        """Seconds a ticket issued now may live: SESSION_TIMEOUT, and always less than our
        own certificate's remaining validity (at least 1: OpenSSL reads 0 as its default).
        The peer's certificate is checked again at every resumption (:meth:`refuse_resumed`)."""
        left = self.certificate.not_valid_after_utc.timestamp() - unix_now
        return max(1, min(SESSION_TIMEOUT, int(left) - 1))

    def set_ticket_lifetime(self, unix_now: float) -> None:
        """Bound the tickets of the next handshake (OpenSSL reads it at the ClientHello;
        pyOpenSSL refuses to change a context in use, the binding does not)."""
        _lib.SSL_CTX_set_timeout(self.ssl._context, self.ticket_lifetime(unix_now))

    def refuse_resumed(
        self, chain: Sequence[x509.Certificate], unix_now: float | None
    ) -> str | None:
        """Why a resumed session's peer must be refused (None: it passes), checked as a
        full handshake checks it: the chain to the CA bundle at ``unix_now`` (OpenSSL's
        clock when None), the CRL file if any, and the live revocation view."""
        if not chain:
            return "no peer certificate in the resumed session"
        store = self._peer_store if unix_now is None else None
        if store is None:
            store = crypto.X509Store()
            store.load_locations(str(self.config.ca_file))
            if self.crl is not None:
                store.add_crl(self.crl)
                store.set_flags(crypto.X509StoreFlags.CRL_CHECK)
            if unix_now is not None:
                store.set_time(datetime.fromtimestamp(unix_now, UTC))
            else:
                self._peer_store = store  # built once for the real time, until the CRL changes
        known = [c for c in self._intermediates if c not in chain]
        leaf, *rest = (_as_openssl(c) for c in [*chain, *known])
        try:
            crypto.X509StoreContext(store, leaf, rest).verify_certificate()
        except crypto.X509StoreContextError as exc:
            return f"certificate verify failed ({exc})"
        is_revoked = self.config.is_revoked
        if is_revoked is not None and is_revoked(chain[0].serial_number):
            return "certificate verify failed (certificate revoked)"
        return None

    def _select_alpn(self, conn: SSL.Connection, offered: list[bytes]) -> Any:
        # Any: pyOpenSSL types the "no overlap" sentinel with a private class.
        for proto in self.alpn:
            if proto in offered:
                return proto
        return SSL.NO_OVERLAPPING_PROTOCOLS


@functools.lru_cache(maxsize=256)
def _as_openssl(cert: x509.Certificate) -> crypto.X509:
    """pyOpenSSL's copy of a certificate, made once per certificate (peers come back,
    and the issuing CA is in every chain); only read by the verification."""
    return crypto.X509.from_cryptography(cert)


def _accept_any(conn: SSL.Connection, cert: crypto.X509, error: int, depth: int, ok: int) -> bool:
    return True  # "request" mode: the application verifies the chain it is shown


def _serial_of(cert: Any) -> int:
    """The serial number of an OpenSSL ``X509 *``."""
    bignum = _lib.ASN1_INTEGER_to_BN(_lib.X509_get_serialNumber(cert), _ffi.NULL)
    if bignum == _ffi.NULL:
        raise ValueError("the certificate's serial does not convert")
    try:
        text = _lib.BN_bn2hex(bignum)
        try:
            return int(_ffi.string(text).decode(), 16)
        finally:
            _lib.OPENSSL_free(text)
    finally:
        _lib.BN_free(bignum)


def parse_crl(data: bytes) -> x509.CertificateRevocationList:
    """A CRL in PEM or DER (``ValueError`` if it is neither)."""
    if data.lstrip().startswith(b"-----"):
        return x509.load_pem_x509_crl(data)
    return x509.load_der_x509_crl(data)


def check_crl(
    crl: x509.CertificateRevocationList, ca_file: Path, *, also: Sequence[x509.Certificate] = ()
) -> None:
    """Raise :class:`TlsConfigError` unless ``crl`` is signed by a CA that names its
    issuer: one of the bundle, or of ``also`` (the issuing CAs of our own chain file: a
    mesh's CRL is signed by its issuing CA, which a root-only bundle lacks)."""
    try:
        bundle = x509.load_pem_x509_certificates(ca_file.read_bytes())
    except (OSError, ValueError) as exc:
        raise TlsConfigError(f"cannot load CA bundle {ca_file}: {exc}") from None
    issuers = [c for c in (*bundle, *also) if c.subject == crl.issuer]
    if not issuers:
        raise TlsConfigError(
            f"the CRL's issuer ({crl.issuer.rfc4514_string()}) is not in the CA bundle "
            "nor our own chain"
        )
    for issuer in issuers:
        try:
            if crl.is_signature_valid(issuer.public_key()):  # type: ignore[arg-type]
                return
        except TypeError:  # a key type that cannot sign CRLs
            continue
    raise TlsConfigError("the CRL's signature does not verify with its issuer's key")


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
