"""Key files: PKCS#8 PEM (plaintext or PBES2/scrypt), mode 0600, refusals."""

from __future__ import annotations

import base64
import io
import os
import stat
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

import trustmesh.keystore
from trustmesh.crypto.keys import KeyKind, PrivateKey
from trustmesh.errors import (
    KeyFilePermissionError,
    KeyStoreError,
    PassphraseError,
)
from trustmesh.keystore import (
    PASSPHRASE_ENV,
    FileKeyStore,
    Signer,
    check_permissions,
    decode_private_key,
    encode_private_key,
    load_key_file,
    passphrase_from_env_or_tty,
    save_key_file,
)
from trustmesh.keystore.filestore import MAX_KEY_FILE

ALL_KINDS = list(KeyKind)
PASSPHRASE = b"correct horse battery staple"
ENCRYPTED_HEADER = b"-----BEGIN ENCRYPTED PRIVATE KEY-----"
PLAIN_HEADER = b"-----BEGIN PRIVATE KEY-----"


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


@pytest.fixture(autouse=True)
def _no_passphrase_source(monkeypatch: pytest.MonkeyPatch) -> None:
    """No passphrase from the environment, no terminal, and a prompt would fail the test."""
    monkeypatch.delenv(PASSPHRASE_ENV, raising=False)
    monkeypatch.setattr(sys.stdin, "isatty", lambda: False, raising=False)

    def no_prompt(prompt: str = "") -> str:
        raise AssertionError(f"unexpected passphrase prompt: {prompt!r}")

    monkeypatch.setattr("getpass.getpass", no_prompt)


def _same_key(a: PrivateKey, b: PrivateKey) -> None:
    assert a.kind is b.kind
    assert a.public_key() == b.public_key()
    b.public_key().verify(a.sign(b"check"), b"check")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- save and load -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_plaintext_round_trip(tmp_path: Path, kind: KeyKind) -> None:
    key = PrivateKey.generate(kind)
    path = save_key_file(key, tmp_path / "key.pem", None)
    assert path == tmp_path / "key.pem"
    assert _mode(path) == 0o600
    data = path.read_bytes()
    assert data.startswith(PLAIN_HEADER)
    _same_key(load_key_file(path), key)
    _same_key(load_key_file(str(path)), key)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_encrypted_round_trip(tmp_path: Path, kind: KeyKind) -> None:
    key = PrivateKey.generate(kind)
    path = save_key_file(key, tmp_path / "key.pem", PASSPHRASE)
    assert _mode(path) == 0o600
    data = path.read_bytes()
    assert data.startswith(ENCRYPTED_HEADER)
    assert data.rstrip().endswith(b"-----END ENCRYPTED PRIVATE KEY-----")
    _same_key(load_key_file(path, PASSPHRASE), key)
    # cryptography reads it on its own
    native = serialization.load_pem_private_key(data, PASSPHRASE)
    _same_key(PrivateKey.from_cryptography(native), key)


def test_mode_is_0600_despite_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        path = save_key_file(PrivateKey.generate(KeyKind.ED25519), tmp_path / "k.pem", None)
    finally:
        os.umask(old)
    assert _mode(path) == 0o600


def test_encrypted_files_differ_for_the_same_key(tmp_path: Path) -> None:
    key = PrivateKey.generate(KeyKind.ED25519)
    a = save_key_file(key, tmp_path / "a.pem", PASSPHRASE).read_bytes()
    b = save_key_file(key, tmp_path / "b.pem", PASSPHRASE).read_bytes()
    assert a != b  # fresh salt and IV each time


def test_loaded_keys_are_signers(tmp_path: Path) -> None:
    for kind in ALL_KINDS:
        path = save_key_file(PrivateKey.generate(kind), tmp_path / f"{kind}.pem", None)
        key = load_key_file(path)
        assert isinstance(key, Signer)
        assert isinstance(key, trustmesh.keystore.Signer)
        assert key.kind is kind
    assert not isinstance(object(), Signer)


def test_passphrase_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = PrivateKey.generate(KeyKind.SECP256K1)
    path = save_key_file(key, tmp_path / "k.pem", b"from env")
    monkeypatch.setenv(PASSPHRASE_ENV, "from env")
    _same_key(load_key_file(path), key)
    # an explicit passphrase wins over the environment
    monkeypatch.setenv(PASSPHRASE_ENV, "wrong")
    _same_key(load_key_file(path, b"from env"), key)


def test_unicode_passphrase_is_utf8(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = PrivateKey.generate(KeyKind.ED25519)
    path = save_key_file(key, tmp_path / "k.pem", "pässwörd ✓".encode())
    monkeypatch.setenv(PASSPHRASE_ENV, "pässwörd ✓")
    _same_key(load_key_file(path), key)


def test_plaintext_file_ignores_passphrase(tmp_path: Path) -> None:
    key = PrivateKey.generate(KeyKind.P256)
    path = save_key_file(key, tmp_path / "k.pem", None)
    _same_key(load_key_file(path, b"irrelevant"), key)


# --- the PBES2 / scrypt structure ------------------------------------------------------------


def _der_read(data: bytes, pos: int) -> tuple[int, bytes, int]:
    """(tag, body, next position) of the DER element at ``pos``."""
    tag = data[pos]
    size = data[pos + 1]
    pos += 2
    if size & 0x80:
        count = size & 0x7F
        size = int.from_bytes(data[pos : pos + count], "big")
        pos += count
    return tag, data[pos : pos + size], pos + size


def _der_children(body: bytes) -> list[tuple[int, bytes]]:
    out = []
    pos = 0
    while pos < len(body):
        tag, child, pos = _der_read(body, pos)
        out.append((tag, child))
    return out


def _oid(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    body = bytearray([40 * arcs[0] + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body += bytes(reversed(chunk))
    return bytes(body)


def test_encrypted_file_is_pbes2_scrypt_aes256cbc(tmp_path: Path) -> None:
    path = save_key_file(PrivateKey.generate(KeyKind.P256), tmp_path / "k.pem", PASSPHRASE)
    lines = path.read_bytes().decode("ascii").strip().splitlines()
    assert lines[0] == ENCRYPTED_HEADER.decode()
    assert all(len(line) <= 64 for line in lines[1:-1])
    der = base64.b64decode("".join(lines[1:-1]))

    tag, body, end = _der_read(der, 0)
    assert (tag, end) == (0x30, len(der))  # EncryptedPrivateKeyInfo, nothing after it
    (alg_tag, alg), (data_tag, ciphertext) = _der_children(body)
    assert (alg_tag, data_tag) == (0x30, 0x04)
    assert len(ciphertext) % 16 == 0 and ciphertext  # AES-CBC blocks
    (oid_tag, oid), (_, pbes2_params) = _der_children(alg)
    assert (oid_tag, oid) == (0x06, _oid("1.2.840.113549.1.5.13"))  # PBES2
    (_, kdf), (_, enc) = _der_children(pbes2_params)
    (_, kdf_oid), (_, scrypt_params) = _der_children(kdf)
    assert kdf_oid == _oid("1.3.6.1.4.1.11591.4.11")  # scrypt (RFC 7914)
    params = _der_children(scrypt_params)
    assert [t for t, _ in params] == [0x04, 0x02, 0x02, 0x02]
    salt, n, r, p = (params[0][1], *(int.from_bytes(v, "big") for _, v in params[1:]))
    assert len(salt) >= 8
    assert n >= 2**14 and n & (n - 1) == 0
    assert (r, p) == (8, 1)
    assert n * r * 128 <= 32 * 1024 * 1024  # within OpenSSL's default scrypt memory limit
    (_, enc_oid), (iv_tag, iv) = _der_children(enc)
    assert enc_oid == _oid("2.16.840.1.101.3.4.1.42")  # aes256-CBC
    assert (iv_tag, len(iv)) == (0x04, 16)


# --- refusals ---------------------------------------------------------------------------------


def test_wrong_passphrase(tmp_path: Path) -> None:
    path = save_key_file(PrivateKey.generate(KeyKind.ED25519), tmp_path / "k.pem", PASSPHRASE)
    with pytest.raises(PassphraseError) as info:
        load_key_file(path, b"not the passphrase")
    assert str(path) in str(info.value)


def test_wrong_passphrase_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_key_file(PrivateKey.generate(KeyKind.ED25519), tmp_path / "k.pem", PASSPHRASE)
    monkeypatch.setenv(PASSPHRASE_ENV, "nope")
    with pytest.raises(PassphraseError):
        load_key_file(path)


def test_missing_passphrase_without_tty(tmp_path: Path) -> None:
    path = save_key_file(PrivateKey.generate(KeyKind.SECP256K1), tmp_path / "k.pem", PASSPHRASE)
    assert not sys.stdin.isatty()
    with pytest.raises(PassphraseError, match=PASSPHRASE_ENV):
        load_key_file(path)


def test_missing_passphrase_with_only_stderr_a_tty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", _Stream(tty=False))
    monkeypatch.setattr("sys.stderr", _Stream(tty=True))
    with pytest.raises(PassphraseError, match=PASSPHRASE_ENV):
        passphrase_from_env_or_tty(tmp_path / "k.pem", confirm=False)


def test_passphrase_prompt_on_a_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = PrivateKey.generate(KeyKind.ED25519)
    path = save_key_file(key, tmp_path / "k.pem", b"typed")
    prompts: list[str] = []

    def prompt(text: str = "") -> str:
        prompts.append(text)
        return "typed"

    monkeypatch.setattr("sys.stdin", _Stream(tty=True))
    monkeypatch.setattr("sys.stderr", _Stream(tty=True))
    monkeypatch.setattr("getpass.getpass", prompt)
    _same_key(load_key_file(path), key)
    assert len(prompts) == 1
    assert str(path) in prompts[0]
    # generating asks twice and refuses a mismatch
    assert passphrase_from_env_or_tty(path, confirm=True) == b"typed"
    answers = iter(["one", "two"])
    monkeypatch.setattr("getpass.getpass", lambda text="": next(answers))
    with pytest.raises(PassphraseError):
        passphrase_from_env_or_tty(path, confirm=True)
    monkeypatch.setattr("getpass.getpass", lambda text="": "")
    with pytest.raises(PassphraseError):
        passphrase_from_env_or_tty(path, confirm=False)


def test_empty_passphrase_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = PrivateKey.generate(KeyKind.ED25519)
    with pytest.raises(PassphraseError):
        save_key_file(key, tmp_path / "k.pem", b"")
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temporary file
    with pytest.raises(PassphraseError):
        encode_private_key(key, b"")
    monkeypatch.setenv(PASSPHRASE_ENV, "")
    with pytest.raises(PassphraseError, match=PASSPHRASE_ENV):
        passphrase_from_env_or_tty(tmp_path / "k.pem", confirm=True)
    with pytest.raises(PassphraseError):
        FileKeyStore().generate(KeyKind.ED25519, tmp_path / "k.pem")
    assert not (tmp_path / "k.pem").exists()


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o602, 0o620, 0o666, 0o777])
def test_group_or_other_access_is_refused(tmp_path: Path, mode: int) -> None:
    path = save_key_file(PrivateKey.generate(KeyKind.ED25519), tmp_path / "k.pem", None)
    path.chmod(mode)
    with pytest.raises(KeyFilePermissionError, match="chmod 600"):
        check_permissions(path)
    with pytest.raises(KeyFilePermissionError) as info:
        load_key_file(path)
    assert oct(mode)[2:] in str(info.value)
    assert _mode(path) == mode  # and left alone


def test_permission_check_comes_before_parsing(tmp_path: Path) -> None:
    # garbage and an encrypted file with no passphrase: both would fail later, differently
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"not a key")
    garbage.chmod(0o644)
    with pytest.raises(KeyFilePermissionError):
        load_key_file(garbage)
    encrypted = save_key_file(PrivateKey.generate(KeyKind.P256), tmp_path / "e.pem", PASSPHRASE)
    encrypted.chmod(0o640)
    with pytest.raises(KeyFilePermissionError):
        load_key_file(encrypted)


@pytest.mark.parametrize("mode", [0o400, 0o600, 0o700])
def test_owner_only_modes_are_accepted(tmp_path: Path, mode: int) -> None:
    key = PrivateKey.generate(KeyKind.ED25519)
    path = save_key_file(key, tmp_path / "k.pem", None)
    path.chmod(mode)
    _same_key(load_key_file(path), key)


def test_existing_file_is_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    first = PrivateKey.generate(KeyKind.SECP256K1)
    save_key_file(first, path, None)
    before = path.read_bytes()
    with pytest.raises(KeyStoreError, match="exists"):
        save_key_file(PrivateKey.generate(KeyKind.SECP256K1), path, None)
    assert path.read_bytes() == before
    _same_key(load_key_file(path), first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.pem"]  # no stray temporary file


def test_existing_non_key_file_is_not_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(b"precious")
    with pytest.raises(KeyStoreError):
        save_key_file(PrivateKey.generate(KeyKind.ED25519), path, PASSPHRASE)
    assert path.read_bytes() == b"precious"


def test_overwrite_when_asked(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    save_key_file(PrivateKey.generate(KeyKind.ED25519), path, None)
    path.chmod(0o644)
    second = PrivateKey.generate(KeyKind.ED25519)
    save_key_file(second, path, None, overwrite=True)
    assert _mode(path) == 0o600
    _same_key(load_key_file(path), second)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(KeyStoreError, match="no such key file"):
        load_key_file(tmp_path / "absent.pem")


def test_missing_directory_on_save(tmp_path: Path) -> None:
    with pytest.raises(KeyStoreError):
        save_key_file(PrivateKey.generate(KeyKind.ED25519), tmp_path / "no" / "k.pem", None)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    directory = tmp_path / "dir.pem"
    directory.mkdir(mode=0o700)
    with pytest.raises(KeyStoreError):
        load_key_file(directory)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"garbage",
        b"\x00\xff" * 100,
        b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        b"-----BEGIN PRIVATE KEY-----\nnot base64 !!\n-----END PRIVATE KEY-----\n",
        b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n",
    ],
)
def test_garbage_content(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "k.pem"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(KeyStoreError) as info:
        load_key_file(path, PASSPHRASE)
    assert str(path) in str(info.value)


def test_truncated_key_file(tmp_path: Path) -> None:
    path = save_key_file(PrivateKey.generate(KeyKind.P256), tmp_path / "k.pem", PASSPHRASE)
    data = path.read_bytes()
    cut = tmp_path / "cut.pem"
    fd = os.open(cut, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, data[: len(data) // 2] + b"\n-----END ENCRYPTED PRIVATE KEY-----\n")
    os.close(fd)
    with pytest.raises(KeyStoreError):
        load_key_file(cut, PASSPHRASE)


def test_huge_file_is_refused(tmp_path: Path) -> None:
    # a valid key followed by padding: refused on size alone
    path = save_key_file(PrivateKey.generate(KeyKind.ED25519), tmp_path / "k.pem", None)
    with path.open("ab") as handle:
        handle.write(b"\n" * MAX_KEY_FILE)
    assert path.stat().st_size > 64 * 1024
    with pytest.raises(KeyStoreError, match="larger"):
        load_key_file(path)
    big = tmp_path / "big.pem"
    big.write_bytes(b"A" * (10 * 1024 * 1024))
    big.chmod(0o600)
    with pytest.raises(KeyStoreError, match="larger"):
        load_key_file(big)


def test_unsupported_key_type_in_file(tmp_path: Path) -> None:
    pem = ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path = tmp_path / "p384.pem"
    path.write_bytes(pem)
    path.chmod(0o600)
    with pytest.raises(KeyStoreError, match=r"p384\.pem: unsupported elliptic curve secp384r1"):
        load_key_file(path)


# --- other PEM forms -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", [KeyKind.SECP256K1, KeyKind.P256])
def test_sec1_pem_loads(tmp_path: Path, kind: KeyKind) -> None:
    key = PrivateKey.generate(kind)
    pem = key.to_cryptography().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    assert pem.startswith(b"-----BEGIN EC PRIVATE KEY-----")
    _same_key(decode_private_key(pem, None), key)


def test_legacy_encrypted_sec1_pem_loads() -> None:
    key = PrivateKey.generate(KeyKind.P256)
    pem = key.to_cryptography().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.BestAvailableEncryption(PASSPHRASE),
    )
    assert b"Proc-Type: 4,ENCRYPTED" in pem
    _same_key(decode_private_key(pem, PASSPHRASE), key)
    with pytest.raises(PassphraseError):
        decode_private_key(pem, b"wrong")
    with pytest.raises(PassphraseError):
        decode_private_key(pem, None)


def test_pbkdf2_pkcs8_from_cryptography_loads() -> None:
    key = PrivateKey.generate(KeyKind.ED25519)
    pem = key.to_cryptography().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(PASSPHRASE),
    )
    _same_key(decode_private_key(pem, PASSPHRASE), key)


def test_encode_decode_without_files() -> None:
    key = PrivateKey.generate(KeyKind.SECP256K1)
    _same_key(decode_private_key(encode_private_key(key, None), None), key)
    with pytest.raises(PassphraseError):
        decode_private_key(encode_private_key(key, PASSPHRASE), None)


# --- FileKeyStore ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_file_key_store_with_passphrase(tmp_path: Path, kind: KeyKind) -> None:
    store = FileKeyStore(passphrase=PASSPHRASE)
    key = store.generate(kind, tmp_path / "k.pem")
    assert (tmp_path / "k.pem").read_bytes().startswith(ENCRYPTED_HEADER)
    assert _mode(tmp_path / "k.pem") == 0o600
    loaded = store.load(tmp_path / "k.pem")
    assert isinstance(loaded, Signer)
    _same_key(loaded, key)
    with pytest.raises(PassphraseError):
        FileKeyStore(passphrase=b"other").load(tmp_path / "k.pem")


def test_file_key_store_unencrypted(tmp_path: Path) -> None:
    store = FileKeyStore()
    key = store.generate(KeyKind.P256, tmp_path / "k.pem", encrypt=False)
    assert (tmp_path / "k.pem").read_bytes().startswith(PLAIN_HEADER)
    _same_key(store.load(tmp_path / "k.pem"), key)
    with pytest.raises(KeyStoreError):
        store.generate(KeyKind.P256, tmp_path / "k.pem", encrypt=False)
    _same_key(store.load(tmp_path / "k.pem"), key)


def test_file_key_store_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PASSPHRASE_ENV, "env secret")
    key = FileKeyStore().generate(KeyKind.SECP256K1, tmp_path / "k.pem")
    _same_key(FileKeyStore().load(tmp_path / "k.pem"), key)
    _same_key(load_key_file(tmp_path / "k.pem", b"env secret"), key)
    monkeypatch.delenv(PASSPHRASE_ENV)
    with pytest.raises(PassphraseError, match=PASSPHRASE_ENV):
        FileKeyStore().load(tmp_path / "k.pem")
    with pytest.raises(PassphraseError, match=PASSPHRASE_ENV):
        FileKeyStore().generate(KeyKind.SECP256K1, tmp_path / "k2.pem")
    assert not (tmp_path / "k2.pem").exists()


def test_new_file_is_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o277)  # would make a plain 0600 create come out 0400
    try:
        path = save_key_file(PrivateKey.generate(KeyKind.ED25519), tmp_path / "k.pem", None)
    finally:
        os.umask(old)
    assert _mode(path) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["k.pem"]  # no temporary file left
