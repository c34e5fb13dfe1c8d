"""The node's side of the CA API: enroll, rotate, fetch the CRL, revoke.

A node directory holds what enrollment produced (docs/protocols/pki.md)::

    node.key         the node's private key (PKCS#8, mode 0600, encrypted unless asked)
    node.crt         its certificate, then the issuing CA's: the chain it presents
    ca.crt           the mesh root it trusts
    enrollment.json  the CA's URL, the node_id, the serial and the mesh settings
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import logging
import os
import socket
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable, Container
from dataclasses import dataclass
from datetime import datetime
from email.message import Message
from pathlib import Path
from typing import Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from trustmesh.clock import SYSTEM_CLOCK, Clock
from trustmesh.crypto.keys import KeyKind, PrivateKey
from trustmesh.keystore.filestore import (
    fsync_directory,
    load_key_file,
    save_key_file,
    write_durably,
)
from trustmesh.keystore.signer import Signer
from trustmesh.pki.ca import token_hash
from trustmesh.pki.challenge import Purpose
from trustmesh.pki.errors import PkiError
from trustmesh.pki.extensions import IdentityBinding, spki_der

log = logging.getLogger("trustmesh.api.ca_client")

DEFAULT_TIMEOUT = 30.0
RETRY_429 = 5  # a 429 is retried this many times
MAX_RETRY_AFTER = 30.0  # seconds; a CA asking for a longer wait gets its error reported
ENROLLMENT_FILE = "enrollment.json"
PENDING_KEY = "node.pending.key"  # an enrollment's key until its certificate is in
NEXT_KEY, NEXT_CERT = "node.next.key", "node.next.crt"  # a rotation's new pair, in flight
NEXT_PUB = "node.next.pub"  # the public half of node.next.key (read without a passphrase)
PREV_KEY, PREV_CERT = "node.prev.key", "node.prev.crt"  # the pair before the last rotation
PREVIOUS_RECHECK = 3600.0  # seconds between looks for a new node.prev.crt (runtime)
DROP_PENDING_ON = (400, 401, 403, 409)  # CA answers after which a pending key is useless
DER_CRL = "application/pkix-crl"
# What a kept-alive connection the server has closed meanwhile raises on its next use:
# the request is sent again, once, on a new connection.
CLOSED_BY_SERVER: tuple[type[Exception], ...] = (
    http.client.RemoteDisconnected,
    http.client.BadStatusLine,
    ConnectionResetError,
    ConnectionAbortedError,
    BrokenPipeError,
    ssl.SSLEOFError,
    ssl.SSLZeroReturnError,
)

T = TypeVar("T")


class CaRequestFailed(PkiError):
    """The CA answered with an error (``status`` and its JSON ``error`` code) or could
    not be reached (``status`` 0). ``unsent``: the request surely never reached the CA
    (no connection, or the CA's TLS certificate was refused)."""

    def __init__(
        self, message: str, *, status: int = 0, code: str | None = None, unsent: bool = False
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.unsent = unsent
        self.retry_after: float | None = None  # a 429's Retry-After, in seconds

    @property
    def definite(self) -> bool:
        """The CA did not act on the request: refused it (4xx) or never got it."""
        return self.unsent or 400 <= self.status < 500


class CaClient:
    """HTTPS calls to the CA at ``url``, trusting only the mesh root in ``ca_file``;
    with ``cert_file`` and ``key_file`` it authenticates with that certificate.

    A 429 is retried after the CA's ``Retry-After`` (at most ``RETRY_429`` times, each
    wait at most ``MAX_RETRY_AFTER`` seconds): a fleet behind one address enrolls at the
    pace the CA allows instead of failing. Every call is safe to repeat (enrollment and
    rotation retries with the same key get the same certificate).

    :meth:`crl_if_changed` is for polling: it keeps one HTTPS connection open across
    calls (the TLS context is built once, here) and asks with ``If-None-Match``, so an
    unchanged CRL costs one small request and a 304, not a handshake and a download.
    A client may live long and be called from threads (``asyncio.to_thread``), one call
    at a time or not: a lock guards the connection. :meth:`close` closes it."""

    def __init__(
        self,
        url: str,
        ca_file: Path,
        *,
        cert_file: Path | None = None,
        key_file: Path | None = None,
        passphrase: bytes | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._sleep = sleep
        self._address = urllib.parse.urlsplit(self.url)
        self._lock = threading.Lock()  # guards the kept-alive connection
        self._connection: http.client.HTTPSConnection | None = None
        self.connects = 0  # connections (TLS handshakes) the kept-alive path has opened
        try:
            self._ssl = ssl.create_default_context(cafile=str(ca_file))
            self._ssl.minimum_version = ssl.TLSVersion.TLSv1_3
            if cert_file is not None:
                self._ssl.load_cert_chain(str(cert_file), str(key_file), password=passphrase)
        except (OSError, ssl.SSLError) as exc:
            raise PkiError(f"cannot load the TLS files for the CA client: {exc}") from None

    def enroll(
        self,
        token: str,
        csr_pem: str,
        *,
        node_id: str | None = None,
        attestation: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"token": token, "csr": csr_pem}
        if node_id is not None:
            body["node_id"] = node_id
        if attestation is not None:
            body["attestation"] = attestation
        return self._json("POST", "/v1/enroll", body)

    def challenge(self, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /v1/enroll/challenge``: a nonce for an attested enrollment (``body``
        has the token) or rotation (this client's certificate authenticates it)."""
        return self._json("POST", "/v1/enroll/challenge", body)

    def report_attestation(self, serial: str, evidence: dict[str, Any]) -> dict[str, Any]:
        """``POST /v1/attestation/report``: a peer's failing quote, for the CA to judge."""
        return self._json(
            "POST", "/v1/attestation/report", {"serial": serial, "evidence": evidence}
        )

    def rotate(
        self, csr_pem: str, *, current_serial: str, attestation: dict[str, str] | None = None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"csr": csr_pem, "current_cert_serial": current_serial}
        if attestation is not None:
            body["attestation"] = attestation
        return self._json("POST", "/v1/rotate", body)

    def crl(self) -> x509.CertificateRevocationList:
        _, data = self._request("GET", "/v1/crl", None, {})
        try:
            return x509.load_der_x509_crl(data)
        except ValueError as exc:
            raise CaRequestFailed(f"the CA sent a CRL that does not parse: {exc}") from None

    def crl_if_changed(self, etag: str | None) -> tuple[bytes | None, str | None]:
        """Poll the CRL: ``(der, new_etag)`` when it differs from the one ``etag`` names
        (or ``etag`` is None), ``(None, etag)`` when the CA answers 304 Not Modified.

        The DER is as the CA sent it, not parsed or verified: check its signature before
        trusting it, and keep the old ETag if it fails. Reuses one kept-alive connection;
        one the server closed meanwhile is replaced transparently (the GET is sent again,
        once). Errors are :class:`CaRequestFailed`, as for the other calls."""
        headers = {"Accept": DER_CRL}
        if etag is not None:
            headers["If-None-Match"] = etag
        status, data, reply = self._retrying(lambda: self._kept_alive("GET", "/v1/crl", headers))
        new_etag = reply.get("ETag")
        if status == 304:
            return None, new_etag or etag
        return data, new_etag

    def close(self) -> None:
        """Close the kept-alive connection (the client stays usable: the next poll opens
        a new one)."""
        with self._lock:
            self._drop_connection()

    def __enter__(self) -> CaClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def revoke(
        self,
        *,
        serial: str | None = None,
        node_id: str | None = None,
        reason: str | None = None,
        admin_token: str | None = None,
    ) -> None:
        body = {
            k: v
            for k, v in (("serial", serial), ("node_id", node_id), ("reason", reason))
            if v is not None
        }
        headers = {"Authorization": f"Bearer {admin_token}"} if admin_token else {}
        self._request("POST", "/v1/revoke", body, headers)

    def _json(self, method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        _, data = self._request(method, path, body, {})
        try:
            result = json.loads(data)
        except ValueError:
            raise CaRequestFailed(f"{path}: the CA's answer is not JSON") from None
        if not isinstance(result, dict):
            raise CaRequestFailed(f"{path}: the CA's answer is not a JSON object")
        return result

    def _request(
        self, method: str, path: str, body: dict[str, Any] | None, headers: dict[str, str]
    ) -> tuple[int, bytes]:
        return self._retrying(lambda: self._request_once(method, path, body, headers))

    def _retrying(self, call: Callable[[], T]) -> T:
        """``call()``, again after each 429's Retry-After (see the class)."""
        for _ in range(RETRY_429):
            try:
                return call()
            except CaRequestFailed as exc:
                if exc.status != 429 or exc.retry_after is None:
                    raise
                if exc.retry_after > MAX_RETRY_AFTER:
                    raise
                self._sleep(exc.retry_after)
        return call()

    def _kept_alive(
        self, method: str, path: str, headers: dict[str, str]
    ) -> tuple[int, bytes, Message]:
        """One bodiless request on the kept-alive connection: status, body and headers
        of a 2xx or 304; an error status raises :class:`CaRequestFailed`."""
        with self._lock:
            for attempt in (1, 2):
                reused = self._connection is not None
                connection = self._connect()
                try:
                    connection.request(method, self._address.path + path, headers=headers)
                    response = connection.getresponse()
                    data = response.read()
                except CLOSED_BY_SERVER as exc:
                    self._drop_connection()
                    if reused and attempt == 1:
                        log.debug("the CA closed the kept-alive connection (%s): reconnecting", exc)
                        continue
                    raise CaRequestFailed(f"cannot reach the CA at {self.url}: {exc}") from None
                except (OSError, http.client.HTTPException) as exc:
                    self._drop_connection()
                    raise CaRequestFailed(f"cannot reach the CA at {self.url}: {exc}") from None
                if response.will_close:
                    self._drop_connection()
                status = response.status
                if status >= 400:
                    raise _failure_from(path, status, response.reason, data, response.headers)
                if not (200 <= status < 300 or status == 304):
                    raise CaRequestFailed(f"{path}: unexpected {status} {response.reason}")
                return status, data, response.headers
        raise AssertionError("unreachable")  # pragma: no cover

    def _connect(self) -> http.client.HTTPSConnection:
        """The kept-alive connection, opened (TCP and TLS) if there is none; a failure
        to open is :class:`CaRequestFailed`, ``unsent`` when the CA surely saw nothing."""
        if self._connection is not None:
            return self._connection
        address = self._address
        if address.scheme != "https" or not address.hostname:
            raise CaRequestFailed(
                f"the CA URL must be https://host[:port], not {self.url!r}", unsent=True
            )
        connection: http.client.HTTPSConnection | None = None
        try:
            connection = http.client.HTTPSConnection(
                address.hostname, address.port, timeout=self.timeout, context=self._ssl
            )
            connection.connect()
        except (OSError, ValueError) as exc:  # ValueError: a bad port in the URL
            if connection is not None:
                connection.close()
            unsent = isinstance(
                exc, ssl.SSLError | ConnectionRefusedError | socket.gaierror | ValueError
            )
            raise CaRequestFailed(
                f"cannot reach the CA at {self.url}: {exc}", unsent=unsent
            ) from None
        self.connects += 1
        self._connection = connection
        return connection

    def _drop_connection(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()

    def _request_once(
        self, method: str, path: str, body: dict[str, Any] | None, headers: dict[str, str]
    ) -> tuple[int, bytes]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(  # noqa: S310 (an https URL the operator gave)
            self.url + path, data=data, method=method, headers=headers
        )
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(  # noqa: S310
                request, context=self._ssl, timeout=self.timeout
            ) as response:
                return int(response.status), bytes(response.read())
        except urllib.error.HTTPError as exc:
            raise _failure(path, exc) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            unsent = isinstance(reason, ssl.SSLError | ConnectionRefusedError | socket.gaierror)
            raise CaRequestFailed(
                f"cannot reach the CA at {self.url}: {reason}", unsent=unsent
            ) from None


def _failure(path: str, exc: urllib.error.HTTPError) -> CaRequestFailed:
    try:
        data = exc.read()
    except OSError:
        data = b""
    return _failure_from(path, exc.code, exc.reason, data, exc.headers)


def _failure_from(
    path: str, status: int, reason: str | None, data: bytes, headers: Message | None
) -> CaRequestFailed:
    """The error for a CA answer with ``status`` >= 400: its JSON ``message`` and
    ``error`` code when it has them, and a 429's Retry-After."""
    try:
        body = json.loads(data)
        message, code = str(body["message"]), str(body["error"])
    except (ValueError, KeyError, TypeError):
        message, code = reason or "error", None
    failure = CaRequestFailed(f"{path}: {status} {message}", status=status, code=code)
    retry_after = headers.get("Retry-After") if headers is not None else None
    if retry_after is not None and retry_after.strip().isdigit():
        failure.retry_after = float(retry_after)
    return failure


# --- the node directory -----------------------------------------------------------------


def make_csr(
    key: PrivateKey, node_id: str, identity: Signer | None = None, context: bytes = b""
) -> str:
    """A CSR naming ``node_id`` as its CN and a DNS SAN, signed by ``key``; with an
    ``identity`` (a device key), it carries that key's binding of ``key`` for the
    request ``context`` names (``Purpose.enroll``/``rotate``'s bytes)."""
    crypto_key = key.to_cryptography()
    builder = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(node_id)]), critical=False)
    )
    if identity is not None:
        binding = IdentityBinding.make(identity, crypto_key.public_key(), context)
        builder = builder.add_extension(binding.extension(), critical=False)
    csr = builder.sign(crypto_key, None if key.kind is KeyKind.ED25519 else hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode()


# Makes an attestation for a CSR key: given a way to ask the CA for a challenge (the
# request body, less the token) and the CSR's DER SPKI, the ``attestation`` object.
Attester = Callable[[Callable[[dict[str, Any]], dict[str, Any]], bytes], dict[str, str]]


def _attest(
    attester: Attester | None,
    ask: Callable[[dict[str, Any]], dict[str, Any]],
    key: PrivateKey,
) -> dict[str, str] | None:
    if attester is None:
        return None
    return attester(ask, spki_der(key.to_cryptography().public_key()))


@dataclass(frozen=True)
class NodeCertificate:
    directory: Path
    node_id: str
    serial: str
    not_after: datetime


def enroll_node(
    ca_url: str,
    ca_file: Path,
    token: str,
    node_id: str,
    out: Path,
    *,
    passphrase: bytes | None,
    key_kind: KeyKind = KeyKind.P256,
    attestation: dict[str, str] | None = None,
    identity: Signer | None = None,
    identity_uri: str | None = None,
    attester: Attester | None = None,
    attest: str | None = None,
    clock: Clock = SYSTEM_CLOCK,
) -> NodeCertificate:
    """Make a key, enroll it, check what came back against ``ca_file``, and write the
    node directory. Refuses a directory that already holds a node key.

    The key is written (as ``node.pending.key``) *before* the CA is asked, and becomes
    ``node.key`` last. An enrollment whose answer was lost (the CA committed, then the
    connection or the CA died) is finished by running the same command again: the same
    key and token get the certificate the CA already issued, where a new key would find
    the token spent.

    ``identity`` (opened from ``identity_uri``, which the node directory records) is a
    device-held identity key that authorizes the software TLS key; ``attester`` makes
    an attestation over a challenge of the CA (a TPM quote), and ``attest`` (its
    ``tpm:<TCTI>``, recorded too) lets renewals attest again."""
    if (out / "node.key").exists():
        raise PkiError(f"{out / 'node.key'} exists: this directory is already enrolled")
    roots = _load_roots(ca_file)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    key = _pending_key(out / PENDING_KEY, key_kind, passphrase)
    client = CaClient(ca_url, ca_file)

    def ask(body: dict[str, Any]) -> dict[str, Any]:
        return client.challenge({**body, "token": token})

    try:
        attestation = _attest(attester, ask, key) or attestation
        context = Purpose.enroll(token_hash(token)).binding
        csr = make_csr(key, node_id, identity, context)
        answer = client.enroll(token, csr, node_id=node_id, attestation=attestation)
    except CaRequestFailed as exc:
        if exc.definite:
            # Refused or never sent: the CA holds nothing for this key, nothing to retry.
            (out / PENDING_KEY).unlink(missing_ok=True)
            if created and not any(out.iterdir()):
                out.rmdir()
        raise
    leaf, chain = _check_answer(answer, key, node_id, roots, clock.now())
    write_durably(out / "node.crt", _pem_chain(leaf, *chain))
    write_durably(
        out / "ca.crt", b"".join(r.public_bytes(serialization.Encoding.PEM) for r in roots)
    )
    record = {
        "ca_url": ca_url,
        "node_id": node_id,
        "serial": format(leaf.serial_number, "x"),
        "not_after": leaf.not_valid_after_utc.isoformat(),
        "config": answer.get("config", {}),
    }
    if identity_uri is not None:
        record["identity_key"] = identity_uri  # a device URI: never a PIN, only where it is
    if attest is not None:
        record["attest"] = attest
    write_durably(out / ENROLLMENT_FILE, json.dumps(record, indent=2).encode() + b"\n")
    os.replace(out / PENDING_KEY, out / "node.key")  # last: the directory is enrolled
    fsync_directory(out)
    return NodeCertificate(out, node_id, record["serial"], leaf.not_valid_after_utc)


def _pending_key(path: Path, kind: KeyKind, passphrase: bytes | None) -> PrivateKey:
    """The key of an earlier attempt that did not finish, or a new one written first."""
    if path.exists():
        key = load_key_file(path, passphrase)
        if key.kind is kind:
            return key
    key = PrivateKey.generate(kind)
    save_key_file(key, path, passphrase, overwrite=True)
    return key


def rotate_node(
    directory: Path,
    *,
    passphrase: bytes | None,
    ca_url: str | None = None,
    keep_key: bool = False,
    attestation: dict[str, str] | None = None,
    identity: Signer | None = None,
    attester: Attester | None = None,
    now: Callable[[], datetime] = SYSTEM_CLOCK.now,
) -> NodeCertificate:
    """Get a new certificate (for a new key unless ``keep_key``) over mTLS with the
    current one, then swap the files in. The previous pair is kept as node.prev.crt
    and node.prev.key; it stays valid until it expires, for links that still use it,
    and is deleted once it has expired or is revoked (checked here against the CA's CRL,
    and by a running node at the end of the overlap: :func:`forget_previous_key`).

    Journalled: a new key is written (node.next.key, with its public half in
    node.next.pub) *before* the CA is asked, so that a rotation interrupted after the
    CA answered is finished by the next one with the same key, which the CA answers
    with the certificate it already issued. The certificate then goes to node.next.crt
    and both move into place; a key is never paired with a certificate for another.

    A node whose identity is on a device passes it as ``identity``: the CA rotates a
    bound certificate only with that key's binding of the new key. With ``attester``,
    the rotation carries a fresh attestation over a challenge."""
    finish_interrupted_rotation(directory)
    info = _read_enrollment(directory)
    url = ca_url or str(info.get("ca_url", ""))
    if not url:
        raise PkiError(f"no CA URL: give --ca-url or enroll into {directory} first")
    current, *issuers = x509.load_pem_x509_certificates((directory / "node.crt").read_bytes())
    node_id = str(info.get("node_id", ""))
    old_key = load_key_file(directory / "node.key", passphrase)
    pending = directory / NEXT_KEY
    if keep_key and pending.exists():
        raise PkiError(
            f"a rotation to a new key was interrupted ({pending} is waiting for its"
            " certificate): run `trustmesh rotate` without --keep-key to finish it"
        )
    if keep_key:
        key = old_key
    elif pending.exists():
        key = load_key_file(pending, passphrase)  # resume: the CA may have certified it
        write_durably(directory / NEXT_PUB, _public_pem(key))
    else:
        key = PrivateKey.generate(old_key.kind)
        save_key_file(key, pending, passphrase, overwrite=True)
        write_durably(directory / NEXT_PUB, _public_pem(key))
    client = node_client(directory, passphrase, url)
    # The pair kept by the last rotation goes once it has expired or is revoked.
    _prune_with_crl(directory, client, issuers, now())
    try:
        attestation = _attest(attester, client.challenge, key) or attestation
        context = Purpose.rotate(current.serial_number).binding
        answer = client.rotate(
            make_csr(key, node_id, identity, context),
            current_serial=format(current.serial_number, "x"),
            attestation=attestation,
        )
    except CaRequestFailed as exc:
        if not keep_key and exc.status in DROP_PENDING_ON:
            _remove(directory, NEXT_KEY, NEXT_PUB)  # refused: nothing was certified for it
        raise
    roots = _load_roots(directory / "ca.crt")
    leaf, chain = _check_answer(answer, key, node_id, roots, now())
    _keep_previous(directory)
    write_durably(directory / NEXT_CERT, _pem_chain(leaf, *chain))
    finish_interrupted_rotation(directory)
    info.update(
        serial=format(leaf.serial_number, "x"),
        not_after=leaf.not_valid_after_utc.isoformat(),
        ca_url=url,
    )
    write_durably(directory / ENROLLMENT_FILE, json.dumps(info, indent=2).encode() + b"\n")
    return NodeCertificate(directory, node_id, str(info["serial"]), leaf.not_valid_after_utc)


def finish_interrupted_rotation(directory: Path) -> bool:
    """Move a complete new pair into place: node.next.crt with node.next.key (a new key)
    or alone (the key was kept); True when there was one.

    Needs no passphrase: the certificate's public key is compared with node.next.pub
    (or node.crt's, for a kept key). A certificate that matches neither is discarded, and
    a stale node.next.key beside a certificate for the current key is deleted, so a key is
    never paired with a certificate for another. A node.next.key without a certificate
    is left for the next rotation, which asks the CA again with it."""
    if not (directory / NEXT_CERT).exists():
        return False
    new = _spki(x509.load_pem_x509_certificates((directory / NEXT_CERT).read_bytes())[0])
    current = _spki(x509.load_pem_x509_certificates((directory / "node.crt").read_bytes())[0])
    pending_pub = directory / NEXT_PUB
    pending = (
        serialization.load_pem_public_key(pending_pub.read_bytes()).public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if pending_pub.exists()
        else None
    )
    if new == current:  # the key was kept; any node.next.key is from an earlier attempt
        os.replace(directory / NEXT_CERT, directory / "node.crt")
        _remove(directory, NEXT_KEY, NEXT_PUB)
        return True
    # node.next.pub is absent only if an older version wrote the pair (the key first).
    if pending in (None, new):
        if (directory / NEXT_KEY).exists():
            os.replace(directory / NEXT_KEY, directory / "node.key")
        # else the key was moved already: the crash came between the two moves
        os.replace(directory / NEXT_CERT, directory / "node.crt")
        _remove(directory, NEXT_PUB)
        return True
    log.warning("%s certifies a key this node does not hold; discarded", directory / NEXT_CERT)
    _remove(directory, NEXT_CERT)
    return False


def prune_previous(directory: Path, *, now: datetime, revoked: Container[int] = ()) -> bool:
    """Delete node.prev.key and node.prev.crt once the previous certificate has expired
    at ``now`` or its serial is in ``revoked``; True when they were deleted. A
    node.prev.key without its certificate is deleted too."""
    cert_path = directory / PREV_CERT
    if not cert_path.exists():
        if (directory / PREV_KEY).exists():
            _remove(directory, PREV_KEY)
            return True
        return False
    previous = x509.load_pem_x509_certificates(cert_path.read_bytes())[0]
    if previous.not_valid_after_utc > now and previous.serial_number not in revoked:
        return False
    _remove(directory, PREV_KEY, PREV_CERT)
    return True


async def forget_previous_key(
    directory: Path,
    *,
    now: Callable[[], datetime] = SYSTEM_CLOCK.now,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    recheck: float = PREVIOUS_RECHECK,
) -> None:
    """For a running node: delete node.prev.key (and .crt) at the end of the overlap,
    when the previous certificate expires; look again at least every ``recheck``
    seconds for the pair a later rotation keeps. Runs until cancelled."""
    while True:
        wait = recheck
        cert_path = directory / PREV_CERT
        try:
            if cert_path.exists():
                end = x509.load_pem_x509_certificates(cert_path.read_bytes())[0]
                left = (end.not_valid_after_utc - now()).total_seconds()
                if left <= 0 and prune_previous(directory, now=now()):
                    log.info("deleted the previous key of %s: its certificate expired", directory)
                wait = min(recheck, max(left, 0.0)) or recheck
        except (OSError, ValueError) as exc:  # a half-copied directory: try again later
            log.warning("cannot read %s: %s", cert_path, exc)
        await sleep(wait)


def _check_answer(
    answer: dict[str, Any],
    key: PrivateKey,
    node_id: str,
    roots: list[x509.Certificate],
    now: datetime,
) -> tuple[x509.Certificate, list[x509.Certificate]]:
    """The leaf and the CA chain from a CA answer, after checking that the leaf is for
    our key and node_id and chains to our root at ``now``."""
    try:
        leaf = x509.load_pem_x509_certificate(str(answer["certificate"]).encode())
        chain = x509.load_pem_x509_certificates(str(answer["ca_cert"]).encode())
    except (KeyError, ValueError) as exc:
        raise CaRequestFailed(f"the CA's answer has no usable certificate: {exc}") from None
    ours = (
        key.to_cryptography()
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    theirs = leaf.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if ours != theirs:
        raise CaRequestFailed("the CA certified another key than ours")
    verifier = PolicyBuilder().store(Store(roots)).time(now).build_client_verifier()
    try:
        verified = verifier.verify(leaf, chain)
    except VerificationError as exc:
        raise CaRequestFailed(f"the certificate does not chain to our CA: {exc}") from None
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    if node_id not in names.get_values_for_type(x509.DNSName):
        raise CaRequestFailed(f"the certificate does not name {node_id!r}")
    intermediates = [c for c in verified.chain[1:] if c not in roots]
    return leaf, intermediates


def _load_roots(path: Path) -> list[x509.Certificate]:
    try:
        roots = x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise PkiError(f"cannot read the CA certificate {path}: {exc}") from None
    return roots


def node_client(directory: Path, passphrase: bytes | None, ca_url: str) -> CaClient:
    """A client of the CA that authenticates as the node in ``directory`` (mTLS)."""
    return CaClient(
        ca_url,
        directory / "ca.crt",
        cert_file=directory / "node.crt",
        key_file=directory / "node.key",
        passphrase=passphrase,
    )


def report_attestation(
    directory: Path, passphrase: bytes | None, ca_url: str, serial: int, raw: bytes
) -> dict[str, Any]:
    """Report a peer's failing link quote (``raw``, QuoteEvidence JSON) to the CA, as the
    node in ``directory`` (mTLS with its certificate); the CA's verdict."""
    client = node_client(directory, passphrase, ca_url)
    try:
        return client.report_attestation(format(serial, "x"), json.loads(raw))
    finally:
        client.close()


def recorded_devices(directory: Path) -> dict[str, str]:
    """The identity key URI and the attesting TPM a node enrolled with (enrollment.json)."""
    try:
        record = json.loads((directory / ENROLLMENT_FILE).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(record, dict):
        return {}
    return {k: str(record[k]) for k in ("identity_key", "attest") if record.get(k)}


def _read_enrollment(directory: Path) -> dict[str, Any]:
    path = directory / ENROLLMENT_FILE
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PkiError(f"{directory} is not an enrolled node directory: {exc}") from None
    if not isinstance(info, dict):
        raise PkiError(f"{path} is not a JSON object")
    return info


def _pem_chain(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _keep_previous(directory: Path) -> None:
    for name, previous in (("node.crt", PREV_CERT), ("node.key", PREV_KEY)):
        source = directory / name
        write_durably(directory / previous, source.read_bytes(), mode=source.stat().st_mode & 0o777)


def _prune_with_crl(
    directory: Path, client: CaClient, chain: list[x509.Certificate], now: datetime
) -> None:
    """Delete the previous pair if it has expired or the CA's CRL lists it; a CRL that
    cannot be fetched or does not verify leaves it (a running node deletes it when it
    expires)."""
    revoked: set[int] = set()
    try:
        crl = client.crl()
        if chain and crl.is_signature_valid(chain[0].public_key()):  # type: ignore[arg-type]
            revoked = {entry.serial_number for entry in crl}
    except (PkiError, TypeError) as exc:
        log.warning("no CRL to check the previous certificate against: %s", exc)
    if prune_previous(directory, now=now, revoked=revoked):
        log.info("deleted the previous key of %s: its certificate expired or is revoked", directory)


def _remove(directory: Path, *names: str) -> None:
    """Delete ``names`` in ``directory`` (those that exist) durably."""
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            (directory / name).unlink()
    fsync_directory(directory)


def _spki(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _public_pem(key: PrivateKey) -> bytes:
    return (
        key.to_cryptography()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
