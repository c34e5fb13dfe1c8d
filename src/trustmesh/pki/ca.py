"""The mesh CA: a root that only signs the issuing CA, and an issuing CA that signs node
certificates and CRLs (docs/protocols/pki.md).

A CA lives in one directory::

    ca.crt       the root certificate, distributed to every node
    root.key     the root key (encrypted PKCS#8, mode 0600); absent when it is kept
                 offline (``init(root_key_out=...)``): only :meth:`renew` needs it
    issuing.crt  the issuing CA's certificate
    issuing.key  its key (encrypted PKCS#8, mode 0600)
    chain.pem    issuing.crt then ca.crt: what a node is handed with its certificate
    ca.db        every certificate issued and every revocation (SQLite)
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import re
import secrets
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from trustmesh.clock import SYSTEM_CLOCK, Clock
from trustmesh.crypto.keys import KeyKind, PrivateKey
from trustmesh.keystore.filestore import load_key_file, save_key_file, write_durably
from trustmesh.pki.errors import CsrRejected, PkiError, UnknownCertificate
from trustmesh.pki.keysign import (
    KEY_URI_FILE,
    DeviceIssuingKey,
    IssuingKey,
    load_device_key,
    sign_certificate,
    sign_crl,
)
from trustmesh.pki.store import CaStore, IssuedCertificate, spki_sha256
from trustmesh.pki.stores import mark_moved_to_postgresql, open_store
from trustmesh.tls.stream import certificate_names

ROOT_VALIDITY = timedelta(days=3650)
ISSUING_VALIDITY = timedelta(days=730)
DEFAULT_NODE_VALIDITY = timedelta(hours=72)
MIN_NODE_VALIDITY = timedelta(hours=1)
MAX_NODE_VALIDITY = timedelta(days=7)
SERVER_VALIDITY = timedelta(days=7)  # the CA API's own TLS certificate, renewed while serving
ADMIN_VALIDITY = timedelta(days=90)
MIN_ADMIN_VALIDITY = timedelta(seconds=1)
MAX_ADMIN_VALIDITY = timedelta(days=365)
DEFAULT_ADMIN_TOKEN_TTL = timedelta(hours=24)
MIN_ADMIN_TOKEN_TTL = timedelta(seconds=1)
MAX_ADMIN_TOKEN_TTL = timedelta(days=90)
DEFAULT_TOKEN_TTL = timedelta(hours=1)
MIN_TOKEN_TTL = timedelta(minutes=1)
MAX_TOKEN_TTL = timedelta(days=30)
ENROLL_TOKEN_PREFIX = "tmenroll_"  # noqa: S105 (a prefix that makes tokens recognizable)
ADMIN_TOKEN_PREFIX = "tmadmin_"  # noqa: S105
CRL_VALIDITY = timedelta(hours=24)
BACKDATE = timedelta(minutes=5)  # tolerate clocks a little behind ours
EXPIRY_WARNING = timedelta(days=30)  # warn when a CA certificate has less left than this
ALLOWED_CURVES = (ec.SECP256R1, ec.SECP384R1)

# A node_id is a DNS name (lowercase labels of letters, digits and hyphens), so that it
# can be both the CN and a DNS SAN, and so that Catalyst's bgpIdentifier check matches.
NODE_ID = re.compile(
    r"(?=.{1,253}\Z)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*\Z"
)

REASONS = {
    flag.value: flag for flag in x509.ReasonFlags if flag is not x509.ReasonFlags.remove_from_crl
}


def check_node_id(node_id: str) -> str:
    if not NODE_ID.match(node_id):
        raise PkiError(
            f"node_id {node_id!r} is not a DNS name (lowercase letters, digits, hyphens and dots)"
        )
    return node_id


def token_hash(token: str) -> str:
    """How a token is stored: SHA-256, hex. Tokens carry 256 random bits, so a fast hash
    is enough; a stolen database yields no usable token."""
    return hashlib.sha256(token.encode()).hexdigest()


def admin_uri(name: str) -> str:
    return f"urn:trustmesh:admin:{name}"


def parse_serial(text: str, what: str = "serial") -> int:
    """A serial as people write it: hex, with or without ``0x`` or colons."""
    try:
        return int(text.removeprefix("0x").replace(":", ""), 16)
    except ValueError:
        raise PkiError(f"{what} {text!r} is not a hex serial") from None


def random_serial() -> int:
    """A random positive 128-bit serial (its top bit clear, so DER needs no sign byte)."""
    return secrets.randbits(127) | 1


class CertificateAuthority:
    """The CA in ``directory``, with its keys unlocked by ``passphrase``."""

    def __init__(
        self,
        directory: Path,
        passphrase: bytes | None,
        *,
        clock: Clock = SYSTEM_CLOCK,
        db: str | None = None,
    ) -> None:
        """``db``: a PostgreSQL URI to keep the records in (replicas share one), instead
        of ``directory/ca.db`` (:func:`trustmesh.pki.stores.open_store`)."""
        self.directory = directory
        self.clock = clock  # every method's time, unless its ``now=`` overrides it
        try:
            self.root_cert = _load_cert(directory / "ca.crt")
            self.issuing_cert = _load_cert(directory / "issuing.crt")
        except OSError as exc:
            raise PkiError(f"{directory} is not a CA directory: {exc.strerror}") from None
        # On a token (issuing-key.uri), or encrypted at rest in issuing.key.
        self._issuing_key: IssuingKey = (
            load_device_key(directory)
            or load_key_file(directory / "issuing.key", passphrase).to_cryptography()
        )
        if _spki(self._issuing_key.public_key()) != _spki(self.issuing_cert.public_key()):
            raise PkiError(
                f"the issuing key of {directory} is not this CA's (its public key is not the"
                " one in issuing.crt)"
            )
        self.store: CaStore = open_store(directory, db)
        try:
            self.store.claim(ca_id(self.issuing_cert), new=False)
        except BaseException:
            self.store.close()
            raise

    @classmethod
    def init(
        cls,
        directory: Path,
        passphrase: bytes | None,
        *,
        name: str = "trustmesh mesh CA",
        now: datetime | None = None,
        clock: Clock = SYSTEM_CLOCK,
        root_key_out: Path | None = None,
        db: str | None = None,
        issuing_key: str | None = None,
    ) -> CertificateAuthority:
        """Create a root and an issuing CA (P-256) in ``directory``, which must hold no CA;
        the CA returned reads ``clock``.

        With ``root_key_out`` the root key is written there instead of
        ``directory/root.key``: a path outside ``directory`` (removable media, say), so
        that the root key can be kept offline. The CA issues, rotates, revokes and signs
        CRLs with the issuing key alone; only :meth:`renew` needs the root key.

        With ``issuing_key`` (a ``pkcs11:`` URI) the issuing key is made on that token,
        never leaves it, and ``directory/issuing-key.uri`` names it instead of
        ``issuing.key`` (keysign.py)."""
        now = now or clock.now()
        root_key_path = directory / "root.key"
        if root_key_out is not None:
            _check_root_key_out(root_key_out, directory)
            root_key_path = root_key_out
        directory.mkdir(parents=True, exist_ok=True)
        if (directory / "ca.crt").exists() or (directory / "root.key").exists():
            raise PkiError(f"{directory} already holds a CA; refusing to overwrite it")
        store = open_store(directory, db)
        try:
            store.check_unclaimed()  # before a key is made on a token, where it would stay
            root_key = PrivateKey.generate(KeyKind.P256)
            software, device = None, None
            if issuing_key is None:
                software = PrivateKey.generate(KeyKind.P256)
                issuing_public: CertificatePublicKeyTypes = software.to_cryptography().public_key()
            else:
                device = DeviceIssuingKey.generate(issuing_key)
                issuing_public = device.public_key()
            root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} root")])
            issuing_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} issuing")])
            root_crypto = root_key.to_cryptography()
            root = _ca_certificate(
                root_name,
                root_name,
                root_crypto.public_key(),
                root_crypto,
                now,
                ROOT_VALIDITY,
                None,
            )
            issuing = _ca_certificate(
                issuing_name, root_name, issuing_public, root_crypto, now, ISSUING_VALIDITY, 0
            )
            # The database is bound to this CA before any file is written: of two `ca
            # init` racing for one empty database, the loser leaves nothing behind.
            store.claim(ca_id(issuing), new=True)
        finally:
            store.close()
        save_key_file(root_key, root_key_path, passphrase)
        if software is not None:
            save_key_file(software, directory / "issuing.key", passphrase)
        elif device is not None:
            write_durably(directory / KEY_URI_FILE, f"{device.uri}\n".encode())
        _write_pem(directory / "ca.crt", [root])
        _write_pem(directory / "issuing.crt", [issuing])
        _write_pem(directory / "chain.pem", [issuing, root])
        if db:
            mark_moved_to_postgresql(directory)
        return cls(directory, passphrase, clock=clock, db=db)

    def close(self) -> None:
        self.store.close()

    @property
    def may_block(self) -> bool:
        """Whether a store call or a signature may wait on another machine or a device
        (a remote store, an issuing key on a token): the CA API then makes it on a
        worker thread, within a deadline."""
        return self.store.remote or isinstance(self._issuing_key, DeviceIssuingKey)

    def __enter__(self) -> CertificateAuthority:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def chain_pem(self) -> str:
        """The issuing CA then the root, PEM: what a node is handed with its certificate."""
        return _pem(self.issuing_cert) + _pem(self.root_cert)

    # --- issuing ------------------------------------------------------------------------

    def sign(
        self,
        csr: x509.CertificateSigningRequest,
        node_id: str,
        *,
        validity: timedelta = DEFAULT_NODE_VALIDITY,
        now: datetime | None = None,
        extensions: Sequence[x509.ExtensionType] = (),
    ) -> tuple[x509.Certificate, IssuedCertificate]:
        """A node certificate for the key in ``csr``, which must name ``node_id``, and the
        record to store. Nothing is stored: the caller commits the record (with whatever
        else must happen in the same transaction) before handing the certificate out.
        ``extensions`` (non-critical) are what the registrar vouches for: a checked
        identity binding, an attested platform."""
        now = now or self.clock.now()
        check_node_id(node_id)
        check_csr(csr, node_id)
        if not MIN_NODE_VALIDITY <= validity <= MAX_NODE_VALIDITY:
            raise PkiError("a node certificate is valid for 1 hour to 7 days")
        names: list[x509.GeneralName] = [x509.DNSName(node_id)]
        eku = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        return self._sign(
            node_id, names, eku, csr.public_key(), validity, now, "node", extensions=extensions
        )

    def issue(
        self,
        csr: x509.CertificateSigningRequest,
        node_id: str,
        *,
        validity: timedelta = DEFAULT_NODE_VALIDITY,
        now: datetime | None = None,
        actor: str | None = "cli",
    ) -> x509.Certificate:
        """Sign (as :meth:`sign`) and record a node certificate."""
        now = now or self.clock.now()
        cert, record = self.sign(csr, node_id, validity=validity, now=now)
        self.store.add(record, event="issue", actor=actor, now=now)
        return cert

    def issue_server(
        self,
        hosts: list[str],
        public_key: CertificatePublicKeyTypes,
        *,
        now: datetime | None = None,
    ) -> x509.Certificate:
        """A TLS server certificate for the CA's own API, naming each of ``hosts`` (an
        IP SAN for an address, else a DNS SAN), valid for 7 days; role ``server``."""
        now = now or self.clock.now()
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        eku = [ExtendedKeyUsageOID.SERVER_AUTH]
        cert, record = self._sign(hosts[0], names, eku, public_key, SERVER_VALIDITY, now, "server")
        self.store.add(record, event="issue", actor="ca serve", now=now)
        return cert

    def issue_admin(
        self,
        name: str,
        public_key: CertificatePublicKeyTypes,
        *,
        validity: timedelta = ADMIN_VALIDITY,
        now: datetime | None = None,
    ) -> x509.Certificate:
        """A client certificate for an administrator of this CA's API. It names
        ``urn:trustmesh:admin:<name>`` (a URI SAN, no DNS name), so it can never pass for
        a node; the API knows it as an admin by its serial's role in the store. It expires
        (``validity``, 1 second to 365 days) and can be revoked by serial like any other
        certificate; the API then refuses it with 401."""
        now = now or self.clock.now()
        check_node_id(name)
        if not MIN_ADMIN_VALIDITY <= validity <= MAX_ADMIN_VALIDITY:
            raise PkiError("an admin certificate is valid for 1 second to 365 days")
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(admin_uri(name))]
        eku = [ExtendedKeyUsageOID.CLIENT_AUTH]
        cert, record = self._sign(
            f"admin:{name}", names, eku, public_key, validity, now, "admin", label=name
        )
        self.store.add(record, event="issue", actor="cli", now=now)
        return cert

    def _sign(
        self,
        common_name: str,
        names: list[x509.GeneralName],
        eku: list[x509.ObjectIdentifier],
        public_key: CertificatePublicKeyTypes,
        validity: timedelta,
        now: datetime,
        role: str,
        *,
        label: str | None = None,
        extensions: Sequence[x509.ExtensionType] = (),
    ) -> tuple[x509.Certificate, IssuedCertificate]:
        now = now.replace(microsecond=0)  # X.509 times have whole seconds
        not_before = now - BACKDATE
        not_after = min(now + validity, self.issuing_cert.not_valid_after_utc)
        if self.issuing_cert.not_valid_after_utc <= now + MIN_NODE_VALIDITY:
            raise PkiError("the issuing CA expires too soon to issue; renew the CA")
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.issuing_cert.subject)
            .public_key(public_key)
            .serial_number(random_serial())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(eku), critical=False)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(_aki(self.issuing_cert), critical=False)
        )
        for extension in extensions:
            builder = builder.add_extension(extension, critical=False)
        cert = sign_certificate(builder, self._issuing_key)
        record = IssuedCertificate(
            serial=cert.serial_number,
            node_id=label or common_name,
            role=role,
            not_before=not_before,
            not_after=not_after,
            pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
            revoked_at=None,
            reason=None,
            spki_sha256=spki_sha256(public_key),
        )
        return cert, record

    # --- tokens -------------------------------------------------------------------------

    def create_token(
        self, node_id: str, *, ttl: timedelta = DEFAULT_TOKEN_TTL, now: datetime | None = None
    ) -> str:
        """A single-use enrollment token for ``node_id``; only its hash is stored."""
        now = now or self.clock.now()
        check_node_id(node_id)
        if not MIN_TOKEN_TTL <= ttl <= MAX_TOKEN_TTL:
            raise PkiError("an enrollment token lives from 1 minute to 30 days")
        token = ENROLL_TOKEN_PREFIX + secrets.token_urlsafe(32)
        self.store.add_token(token_hash(token), node_id, now, now + ttl)
        return token

    def create_admin_token(
        self,
        label: str = "admin",
        *,
        ttl: timedelta = DEFAULT_ADMIN_TOKEN_TTL,
        now: datetime | None = None,
    ) -> str:
        """A bearer token for the admin API (POST /v1/revoke), valid for ``ttl`` (1 second
        to 90 days, a day by default); only its hash is stored. Its public id (for
        ``ca admin-token list`` and ``revoke``) is :func:`admin_token_id` of the hash."""
        if not MIN_ADMIN_TOKEN_TTL <= ttl <= MAX_ADMIN_TOKEN_TTL:
            raise PkiError("an admin token lives from 1 second to 90 days")
        now = now or self.clock.now()
        token = ADMIN_TOKEN_PREFIX + secrets.token_urlsafe(32)
        self.store.add_admin_token(token_hash(token), label, now, now + ttl)
        return token

    def revoke_admin_token(
        self, token_id: str, *, now: datetime | None = None, actor: str | None = "cli"
    ) -> bool:
        """Revoke an admin token by its id; False when it was revoked already."""
        return self.store.revoke_admin_token(token_id, now or self.clock.now(), actor=actor)

    # --- revocation ---------------------------------------------------------------------

    def revoke(
        self,
        *,
        serial: int | None = None,
        node_id: str | None = None,
        reason: str = "unspecified",
        now: datetime | None = None,
        actor: str | None = "cli",
    ) -> list[int]:
        """Revoke one certificate by serial, or every certificate of ``node_id``; return the
        serials newly revoked. Revoking again is not an error (nothing is lost twice)."""
        if (serial is None) == (node_id is None):
            raise PkiError("revoke by serial or by node_id (one of them)")
        if reason not in REASONS:
            raise PkiError(f"unknown revocation reason {reason!r}; one of {', '.join(REASONS)}")
        when = now or self.clock.now()
        if serial is not None:
            found = self.store.get(serial)
            if found is None:
                raise UnknownCertificate(f"no certificate with serial {serial:x}")
            return self.store.revoke([serial], when, reason, actor=actor)
        assert node_id is not None
        if not NODE_ID.match(node_id):  # no node certificate names it (nor can the store)
            raise UnknownCertificate(f"no certificate was issued to {node_id!r}")
        # One transaction: a rotation that commits meanwhile is revoked with the rest.
        revoked = self.store.revoke_node(node_id, when, reason, actor=actor)
        if revoked is None:
            raise UnknownCertificate(f"no certificate was issued to {node_id!r}")
        return revoked

    def crl(self, *, now: datetime | None = None) -> x509.CertificateRevocationList:
        """A CRL of every revoked certificate that has not expired, signed by the issuing
        CA, valid for a day.

        A revoked serial stays listed until its certificate has been expired for one CRL
        validity (24 h), then leaves: every CRL issued in that day still lists it, so the
        CRL after its notAfter does (RFC 5280 section 3.3), and a node whose clock runs
        behind the CA's still refuses it. An expired certificate is refused anyway, so
        the CRL holds only what can still be used, whatever the mesh's history."""
        now = now or self.clock.now()
        # The number is the store's: above every CRL any replica signed before (and the
        # time in milliseconds, as before, while clocks move forward).
        number, listed = self.store.next_crl(
            now - CRL_VALIDITY, at_least=int(now.timestamp() * 1000)
        )
        entries = []
        for entry in listed:
            revoked = (
                x509.RevokedCertificateBuilder()
                .serial_number(entry.serial)
                .revocation_date(entry.revoked_at)
            )
            if entry.reason and entry.reason != "unspecified":
                revoked = revoked.add_extension(
                    x509.CRLReason(REASONS[entry.reason]), critical=False
                )
            entries.append(revoked.build())
        # All entries at once: add_revoked_certificate copies its list, O(n^2) in all.
        builder = (
            x509.CertificateRevocationListBuilder(revoked_certificates=entries)
            .issuer_name(self.issuing_cert.subject)
            .last_update(now)
            .next_update(now + CRL_VALIDITY)
            .add_extension(x509.CRLNumber(number), critical=False)
            .add_extension(_aki(self.issuing_cert), critical=False)
        )
        return sign_crl(builder, self._issuing_key)

    # --- renewal ------------------------------------------------------------------------

    def renew(
        self,
        passphrase: bytes | None,
        *,
        force: bool = False,
        now: datetime | None = None,
        root_key: Path | None = None,
    ) -> list[str]:
        """Certify the root and the issuing CA again, with the same keys and names, when
        less than 30 days are left (or always with ``force``); return what was renewed.

        Same key and name means everything issued so far still chains: nodes may keep the
        old ca.crt until it expires. A running ``ca serve`` picks the change up on restart.

        This is the one operation that needs the root key: ``directory/root.key``, or
        ``root_key`` when it is kept offline (it must be this CA's root key).
        """
        now = now or self.clock.now()
        renewed = []
        root_key_crypto = self._load_root_key(passphrase, root_key)
        root, issuing = self.root_cert, self.issuing_cert
        if force or root.not_valid_after_utc - now < EXPIRY_WARNING:
            root = _ca_certificate(
                root.subject,
                root.subject,
                root_key_crypto.public_key(),
                root_key_crypto,
                now,
                ROOT_VALIDITY,
                None,
            )
            renewed.append("root")
        if force or renewed or issuing.not_valid_after_utc - now < EXPIRY_WARNING:
            validity = min(ISSUING_VALIDITY, root.not_valid_after_utc - now)
            issuing = _ca_certificate(
                issuing.subject,
                root.subject,
                issuing.public_key(),
                root_key_crypto,
                now,
                validity,
                0,
            )
            renewed.append("issuing")
        if renewed:
            _write_pem(self.directory / "ca.crt", [root])
            _write_pem(self.directory / "issuing.crt", [issuing])
            _write_pem(self.directory / "chain.pem", [issuing, root])
            self.root_cert, self.issuing_cert = root, issuing
            self.store.audit_event("renew-ca", detail={"renewed": renewed}, now=now)
        return renewed

    def _load_root_key(
        self, passphrase: bytes | None, path: Path | None
    ) -> ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey:
        """The root key from ``path`` (default ``directory/root.key``), checked against
        ca.crt: a wrong key would certify a root that nothing issued so far chains to."""
        path = self.directory / "root.key" if path is None else path
        if not path.exists():
            if path == self.directory / "root.key":
                raise PkiError(
                    f"renewing the CA needs its root key, and {path} is absent (kept offline"
                    " since `ca init --root-key-out`?): bring the root key from offline"
                    " storage and give its path (trustmesh ca renew --root-key PATH)"
                )
            raise PkiError(f"renewing the CA needs its root key, and {path} is absent")
        key = load_key_file(path, passphrase).to_cryptography()
        if _spki(key.public_key()) != _spki(self.root_cert.public_key()):
            raise PkiError(
                f"{path} is not this CA's root key (its public key is not the one in"
                f" {self.directory / 'ca.crt'})"
            )
        return key

    # --- health -------------------------------------------------------------------------

    def expiry_warnings(self, *, now: datetime | None = None) -> list[str]:
        """A line for each CA certificate with less than 30 days left (or expired)."""
        now = now or self.clock.now()
        warnings = []
        for label, cert in (("root", self.root_cert), ("issuing", self.issuing_cert)):
            end = cert.not_valid_after_utc
            left = end - now
            if left <= timedelta(0):
                warnings.append(f"the {label} CA certificate EXPIRED on {end:%Y-%m-%d %H:%M} UTC")
            elif left < EXPIRY_WARNING:
                warnings.append(
                    f"the {label} CA certificate expires in {left.days} days "
                    f"({end:%Y-%m-%d %H:%M} UTC); renew it now (trustmesh ca renew)"
                )
        return warnings


def check_csr(csr: x509.CertificateSigningRequest, node_id: str) -> None:
    """A CSR is acceptable when its self-signature verifies, its key is P-256, P-384 or
    Ed25519, and it names ``node_id`` (CN or DNS SAN).

    No RSA: a node's trust view (trustmesh.mesh.trust) takes only EC and Ed25519 keys,
    so an RSA certificate would be issued only to be refused on every link."""
    if not csr.is_signature_valid:
        raise CsrRejected("the CSR's self-signature does not verify")
    key = csr.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ALLOWED_CURVES):
            raise CsrRejected(f"EC curve {key.curve.name} is not allowed (P-256 or P-384)")
    elif not isinstance(key, ed25519.Ed25519PublicKey):
        kind = "RSA" if isinstance(key, rsa.RSAPublicKey) else type(key).__name__
        raise CsrRejected(
            f"{kind} keys are not allowed: mesh nodes take only EC P-256, P-384 or Ed25519"
        )
    if node_id not in certificate_names(csr, uris=False):
        raise CsrRejected(f"the CSR does not name node_id {node_id!r} (its CN or a DNS SAN)")


def load_csr(data: bytes | str) -> x509.CertificateSigningRequest:
    """A CSR in PEM, DER, or (as text) base64 DER; :class:`CsrRejected` when it does not
    parse."""
    try:
        if isinstance(data, str):
            if not data.lstrip().startswith("-----"):
                data = base64.b64decode("".join(data.split()), validate=True)
            else:
                data = data.encode()
        if data.lstrip().startswith(b"-----"):
            return x509.load_pem_x509_csr(data)
        return x509.load_der_x509_csr(data)
    except (ValueError, binascii.Error, UnicodeEncodeError) as exc:
        raise CsrRejected(f"not a CSR in PEM, DER or base64 DER: {exc}") from None


def _ca_certificate(
    subject: x509.Name,
    issuer: x509.Name,
    public: CertificatePublicKeyTypes,
    signer: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey,
    now: datetime,
    validity: timedelta,
    path_length: int | None,
) -> x509.Certificate:
    """A CA certificate for ``public``, signed by ``signer`` (self-signed: the root,
    whose subject is its issuer)."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public)
        .serial_number(random_serial())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
    )
    if subject != issuer:
        issuer_ski = x509.SubjectKeyIdentifier.from_public_key(signer.public_key())
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski),
            critical=False,
        )
    return builder.sign(
        signer, hashes.SHA256() if isinstance(signer, ec.EllipticCurvePrivateKey) else None
    )


def _check_root_key_out(path: Path, directory: Path) -> None:
    """Where ``init`` may write a root key kept apart: not inside the CA directory (it
    would travel with every copy of it), not over an existing file, in a folder that
    exists."""
    if path.resolve().is_relative_to(directory.resolve()):
        raise PkiError(
            f"the root key's path {path} is inside the CA directory {directory}: the point"
            " of writing it apart is to keep it out of that directory (and offline)"
        )
    if path.exists() or path.is_symlink():
        raise PkiError(f"{path} already exists; refusing to overwrite a key")
    if not path.parent.is_dir():
        raise PkiError(f"{path.parent} is not a directory: cannot write the root key there")


def ca_id(issuing: x509.Certificate) -> int:
    """The number a store is bound to its CA by (SqlCaStore.claim): 56 bits of the
    SHA-256 of the issuing CA's public key, which renewals keep."""
    return int.from_bytes(hashlib.sha256(_spki(issuing.public_key())).digest()[:7], "big")


def _spki(key: CertificatePublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _aki(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _write_pem(path: Path, certs: list[x509.Certificate]) -> None:
    """Write atomically and durably: a crash leaves the old certificate or the new one,
    and once this returns the new one survives a power cut (file and directory are
    fsynced, as the database is)."""
    write_durably(path, b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs))
