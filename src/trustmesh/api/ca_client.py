"""The node's side of the CA API: enroll, rotate, fetch the CRL, revoke.

A node directory holds what enrollment produced (docs/protocols/pki.md)::

    node.key         the node's private key (PKCS#8, mode 0600, encrypted unless asked)
    node.crt         its certificate, then the issuing CA's: the chain it presents
    ca.crt           the mesh root it trusts
    enrollment.json  the CA's URL, the node_id, the serial and the mesh settings
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from trustmesh.crypto.keys import KeyKind, PrivateKey
from trustmesh.keystore.filestore import fsync_directory, load_key_file, save_key_file
from trustmesh.pki.errors import PkiError

DEFAULT_TIMEOUT = 30.0
ENROLLMENT_FILE = "enrollment.json"
NEXT_KEY, NEXT_CERT = "node.next.key", "node.next.crt"  # a rotation's new pair, in flight


class CaRequestFailed(PkiError):
    """The CA answered with an error (``status`` and its JSON ``error`` code) or could
    not be reached (``status`` 0)."""

    def __init__(self, message: str, *, status: int = 0, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class CaClient:
    """HTTPS calls to the CA at ``url``, trusting only the mesh root in ``ca_file``;
    with ``cert_file`` and ``key_file`` it authenticates with that certificate."""

    def __init__(
        self,
        url: str,
        ca_file: Path,
        *,
        cert_file: Path | None = None,
        key_file: Path | None = None,
        passphrase: bytes | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
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
            raise CaRequestFailed(f"cannot reach the CA at {self.url}: {reason}") from None


def _failure(path: str, exc: urllib.error.HTTPError) -> CaRequestFailed:
    try:
        body = json.loads(exc.read())
        message, code = str(body["message"]), str(body["error"])
    except (ValueError, KeyError, TypeError, OSError):
        message, code = exc.reason or "error", None
    return CaRequestFailed(f"{path}: {exc.code} {message}", status=exc.code, code=code)


# --- the node directory -----------------------------------------------------------------


def make_csr(key: PrivateKey, node_id: str) -> str:
    """A CSR naming ``node_id`` as its CN and a DNS SAN, signed by ``key``."""
    crypto_key = key.to_cryptography()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(node_id)]), critical=False)
        .sign(crypto_key, None if key.kind is KeyKind.ED25519 else hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


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
) -> NodeCertificate:
    """Make a key, enroll it, check what came back against ``ca_file``, and write the
    node directory. Refuses a directory that already holds a node key."""
    if (out / "node.key").exists():
        raise PkiError(f"{out / 'node.key'} exists: this directory is already enrolled")
    roots = _load_roots(ca_file)
    key = PrivateKey.generate(key_kind)
    client = CaClient(ca_url, ca_file)
    answer = client.enroll(token, make_csr(key, node_id), node_id=node_id, attestation=attestation)
    leaf, chain = _check_answer(answer, key, node_id, roots)
    out.mkdir(parents=True, exist_ok=True)
    save_key_file(key, out / "node.key", passphrase)
    _write_atomic(out / "node.crt", _pem_chain(leaf, *chain))
    _write_atomic(
        out / "ca.crt", b"".join(r.public_bytes(serialization.Encoding.PEM) for r in roots)
    )
    record = {
        "ca_url": ca_url,
        "node_id": node_id,
        "serial": format(leaf.serial_number, "x"),
        "not_after": leaf.not_valid_after_utc.isoformat(),
        "config": answer.get("config", {}),
    }
    _write_atomic(out / ENROLLMENT_FILE, json.dumps(record, indent=2).encode() + b"\n")
    return NodeCertificate(out, node_id, record["serial"], leaf.not_valid_after_utc)


def rotate_node(
    directory: Path,
    *,
    passphrase: bytes | None,
    ca_url: str | None = None,
    keep_key: bool = False,
    attestation: dict[str, str] | None = None,
) -> NodeCertificate:
    """Get a new certificate (for a new key unless ``keep_key``) over mTLS with the
    current one, then swap the files in. The previous pair is kept as node.prev.crt
    and node.prev.key; it stays valid until it expires, for links that still use it."""
    finish_interrupted_rotation(directory)
    info = _read_enrollment(directory)
    url = ca_url or str(info.get("ca_url", ""))
    if not url:
        raise PkiError(f"no CA URL: give --ca-url or enroll into {directory} first")
    current = x509.load_pem_x509_certificates((directory / "node.crt").read_bytes())[0]
    node_id = str(info.get("node_id", ""))
    old_key = load_key_file(directory / "node.key", passphrase)
    key = old_key if keep_key else PrivateKey.generate(old_key.kind)
    client = CaClient(
        url,
        directory / "ca.crt",
        cert_file=directory / "node.crt",
        key_file=directory / "node.key",
        passphrase=passphrase,
    )
    answer = client.rotate(
        make_csr(key, node_id),
        current_serial=format(current.serial_number, "x"),
        attestation=attestation,
    )
    leaf, chain = _check_answer(answer, key, node_id, _load_roots(directory / "ca.crt"))
    _keep_previous(directory)
    # Journalled: the complete new pair goes to node.next.*, the certificate last; then
    # both move into place. A crash in between is finished by the next rotate (or node
    # start), never left as a new key next to an old certificate.
    if not keep_key:
        save_key_file(key, directory / NEXT_KEY, passphrase, overwrite=True)
    _write_atomic(directory / NEXT_CERT, _pem_chain(leaf, *chain))
    finish_interrupted_rotation(directory)
    info.update(
        serial=format(leaf.serial_number, "x"),
        not_after=leaf.not_valid_after_utc.isoformat(),
        ca_url=url,
    )
    _write_atomic(directory / ENROLLMENT_FILE, json.dumps(info, indent=2).encode() + b"\n")
    return NodeCertificate(directory, node_id, str(info["serial"]), leaf.not_valid_after_utc)


def finish_interrupted_rotation(directory: Path) -> bool:
    """Move a complete new pair (node.next.crt, and node.next.key unless the key was
    kept) into place; True when there was one."""
    if not (directory / NEXT_CERT).exists():
        return False
    if (directory / NEXT_KEY).exists():
        os.replace(directory / NEXT_KEY, directory / "node.key")
    os.replace(directory / NEXT_CERT, directory / "node.crt")
    fsync_directory(directory)
    return True


def _check_answer(
    answer: dict[str, Any], key: PrivateKey, node_id: str, roots: list[x509.Certificate]
) -> tuple[x509.Certificate, list[x509.Certificate]]:
    """The leaf and the CA chain from a CA answer, after checking that the leaf is for
    our key and node_id and chains to our root."""
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
    verifier = PolicyBuilder().store(Store(roots)).time(datetime.now(UTC)).build_client_verifier()
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
    for name, previous in (("node.crt", "node.prev.crt"), ("node.key", "node.prev.key")):
        source = directory / name
        _write_atomic(directory / previous, source.read_bytes(), mode=source.stat().st_mode & 0o777)


def _write_atomic(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Write ``path`` so that a crash leaves the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_directory(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
