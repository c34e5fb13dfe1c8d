"""Key files and signatures interoperate with the ``openssl`` command-line tool."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from trustmesh.crypto.keys import KeyKind, PrivateKey, PublicKey
from trustmesh.errors import InvalidSignatureError, PassphraseError
from trustmesh.keystore import load_key_file, save_key_file

OPENSSL = shutil.which("openssl")

pytestmark = pytest.mark.usefixtures("require_openssl")  # fails, never skips, without it

PASSWORD = "interop-Passw0rd"
MESSAGE = b"signed by trustmesh, checked by openssl\n"

GENPKEY_ARGS = {
    KeyKind.ED25519: ["-algorithm", "ed25519"],
    KeyKind.P256: ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
    KeyKind.SECP256K1: ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:secp256k1"],
}
ORDER = {
    KeyKind.SECP256K1: 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141,
    KeyKind.P256: 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
}
ALL_KINDS = list(KeyKind)
EC_KINDS = [KeyKind.SECP256K1, KeyKind.P256]


def openssl(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    assert OPENSSL is not None
    return subprocess.run(
        [OPENSSL, *(str(a) for a in args)], capture_output=True, check=check, timeout=30
    )


def genpkey(kind: KeyKind, out: Path, *extra: str) -> Path:
    openssl("genpkey", *GENPKEY_ARGS[kind], *extra, "-out", out)
    out.chmod(0o600)
    return out


def openssl_public_bytes(key_file: Path, *passin: str) -> bytes:
    """The public key openssl sees in ``key_file``, in trustmesh's encoding."""
    spki = openssl("pkey", "-in", key_file, *passin, "-pubout", "-outform", "DER").stdout
    public = serialization.load_der_public_key(spki)
    if isinstance(public, ed25519.Ed25519PublicKey):
        return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    return public.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
    )


def asn1_objects(pem_file: Path) -> list[str]:
    """The OBJECT names ``openssl asn1parse`` finds, in order."""
    dump = openssl("asn1parse", "-in", pem_file).stdout.decode()
    return [line.rsplit(":", 1)[1].strip() for line in dump.splitlines() if "OBJECT" in line]


# --- openssl writes, trustmesh reads --------------------------------------------------------


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_openssl_plaintext_key_loads(tmp_path: Path, kind: KeyKind) -> None:
    path = genpkey(kind, tmp_path / "key.pem")
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    key = load_key_file(path)
    assert key.kind is kind
    assert key.public_key().to_bytes() == openssl_public_bytes(path)
    key.public_key().verify(key.sign(MESSAGE), MESSAGE)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_openssl_encrypted_key_loads(tmp_path: Path, kind: KeyKind) -> None:
    path = genpkey(kind, tmp_path / "key.pem", "-aes256", "-pass", f"pass:{PASSWORD}")
    assert path.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    key = load_key_file(path, PASSWORD.encode())
    assert key.kind is kind
    assert key.public_key().to_bytes() == openssl_public_bytes(path, "-passin", f"pass:{PASSWORD}")
    with pytest.raises(PassphraseError):
        load_key_file(path, b"wrong")


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_openssl_scrypt_pkcs8_loads(tmp_path: Path, kind: KeyKind) -> None:
    plain = genpkey(kind, tmp_path / "plain.pem")
    scrypt = tmp_path / "scrypt.pem"
    openssl(
        "pkcs8", "-topk8", "-scrypt", "-in", plain, "-out", scrypt,
        "-passout", f"pass:{PASSWORD}",
    )  # fmt: skip
    scrypt.chmod(0o600)
    assert scrypt.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    key = load_key_file(scrypt, PASSWORD.encode())
    assert key.kind is kind
    assert key.public_key() == load_key_file(plain).public_key()
    with pytest.raises(PassphraseError):
        load_key_file(scrypt, b"wrong")


# --- trustmesh writes, openssl reads --------------------------------------------------------


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_openssl_reads_our_encrypted_file(tmp_path: Path, kind: KeyKind) -> None:
    key = PrivateKey.generate(kind)
    path = save_key_file(key, tmp_path / "ours.pem", PASSWORD.encode())
    passin = ("-passin", f"pass:{PASSWORD}")
    assert openssl_public_bytes(path, *passin) == key.public_key().to_bytes()
    # openssl sees the same structure as in its own `pkcs8 -topk8 -scrypt` output ...
    assert asn1_objects(path) == ["PBES2", "scrypt", "aes-256-cbc"]
    reference = tmp_path / "reference.pem"
    openssl(
        "pkcs8", "-topk8", "-scrypt", "-in", path, "-passin", f"pass:{PASSWORD}",
        "-out", reference, "-passout", f"pass:{PASSWORD}",
    )  # fmt: skip
    assert asn1_objects(reference) == asn1_objects(path)
    # ... and really needs the passphrase
    wrong = openssl("pkey", "-in", path, "-passin", "pass:wrong", "-noout", check=False)
    assert wrong.returncode != 0


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_openssl_reads_our_plaintext_file(tmp_path: Path, kind: KeyKind) -> None:
    key = PrivateKey.generate(kind)
    path = save_key_file(key, tmp_path / "ours.pem", None)
    assert openssl_public_bytes(path) == key.public_key().to_bytes()


# --- signatures -----------------------------------------------------------------------------


def _public_pem(tmp_path: Path, key_file: Path) -> Path:
    pub = tmp_path / "pub.pem"
    openssl("pkey", "-in", key_file, "-passin", f"pass:{PASSWORD}", "-pubout", "-out", pub)
    return pub


@pytest.mark.parametrize("kind", EC_KINDS)
def test_openssl_verifies_our_ecdsa_signature(tmp_path: Path, kind: KeyKind) -> None:
    key = PrivateKey.generate(kind)
    key_file = save_key_file(key, tmp_path / "ours.pem", PASSWORD.encode())
    pub = _public_pem(tmp_path, key_file)  # the public key as openssl derives it
    msg = tmp_path / "msg"
    msg.write_bytes(MESSAGE)
    sig = tmp_path / "sig.der"
    sig.write_bytes(key.sign(MESSAGE))
    result = openssl("dgst", "-sha256", "-verify", pub, "-signature", sig, msg)
    assert b"Verified OK" in result.stdout
    # openssl does reject a signature over another message
    msg.write_bytes(MESSAGE + b"tampered")
    bad = openssl("dgst", "-sha256", "-verify", pub, "-signature", sig, msg, check=False)
    assert bad.returncode != 0
    assert b"Verified OK" not in bad.stdout


def test_openssl_verifies_our_ed25519_signature(tmp_path: Path) -> None:
    key = PrivateKey.generate(KeyKind.ED25519)
    key_file = save_key_file(key, tmp_path / "ours.pem", PASSWORD.encode())
    pub = _public_pem(tmp_path, key_file)
    msg = tmp_path / "msg"
    msg.write_bytes(MESSAGE)
    sig = tmp_path / "sig.bin"
    sig.write_bytes(key.sign(MESSAGE))
    args = ("pkeyutl", "-verify", "-pubin", "-inkey", pub, "-rawin", "-in", msg, "-sigfile", sig)
    result = openssl(*args)
    assert b"Signature Verified Successfully" in result.stdout
    msg.write_bytes(MESSAGE + b"tampered")
    assert openssl(*args, check=False).returncode != 0


@pytest.mark.parametrize("kind", EC_KINDS)
def test_we_verify_openssl_ecdsa_signatures(tmp_path: Path, kind: KeyKind) -> None:
    key_file = genpkey(kind, tmp_path / "key.pem")
    public = load_key_file(key_file).public_key()
    n = ORDER[kind]
    msg = tmp_path / "msg"
    for i in range(4):
        message = MESSAGE + bytes([i])
        msg.write_bytes(message)
        signature = openssl("dgst", "-sha256", "-sign", key_file, msg).stdout
        r, s = decode_dss_signature(signature)
        low = encode_dss_signature(r, min(s, n - s))
        public.verify(low, message)
        if s > n // 2:  # OpenSSL does not normalise S; trustmesh accepts only low-S
            with pytest.raises(InvalidSignatureError):
                public.verify(signature, message)
        else:
            public.verify(signature, message)


def test_we_verify_openssl_ed25519_signature(tmp_path: Path) -> None:
    key_file = genpkey(KeyKind.ED25519, tmp_path / "key.pem")
    msg = tmp_path / "msg"
    msg.write_bytes(MESSAGE)
    signature = openssl("pkeyutl", "-sign", "-inkey", key_file, "-rawin", "-in", msg).stdout
    assert len(signature) == 64
    key = load_key_file(key_file)
    key.public_key().verify(signature, MESSAGE)
    assert signature == key.sign(MESSAGE)  # Ed25519 is deterministic
    raw_public = PublicKey.from_bytes(KeyKind.ED25519, openssl_public_bytes(key_file))
    with pytest.raises(InvalidSignatureError):
        raw_public.verify(signature, MESSAGE + b"x")
