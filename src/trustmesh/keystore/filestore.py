"""Private keys in files: PKCS#8 PEM, encrypted at rest, mode 0600."""

from __future__ import annotations

import contextlib
import getpass
import os
import secrets
import stat
import sys
from pathlib import Path
from typing import ClassVar, NamedTuple

from trustmesh.crypto.keys import KeyKind, PrivateKey
from trustmesh.errors import (
    InvalidKeyError,
    KeyFilePermissionError,
    KeyStoreError,
    PassphraseError,
    PassphraseFileError,
)
from trustmesh.keystore.pkcs8 import decode_private_key, encode_private_key, is_encrypted

PASSPHRASE_ENV = "TRUSTMESH_PASSPHRASE"  # noqa: S105 (a variable name, not a secret)
CREDENTIALS_ENV = "CREDENTIALS_DIRECTORY"  # systemd's, for LoadCredential=
CREDENTIAL_NAME = "passphrase"  # LoadCredential=passphrase:/etc/trustmesh/NAME.passphrase
MAX_KEY_FILE = 64 * 1024  # a PEM key is a few hundred bytes; refuse to slurp anything huge
MAX_PASSPHRASE_FILE = 64 * 1024


class Passphrase(NamedTuple):
    """A passphrase found without asking, and where (for messages; never the secret)."""

    value: bytes
    source: str


class _Sources:
    """The process's passphrase file (the CLI's global ``--passphrase-file``), and the
    files already read: each is read once."""

    file: Path | None = None
    read: ClassVar[dict[Path, bytes]] = {}


def use_passphrase_file(path: Path | None) -> None:
    """Make ``path`` the first place every passphrase lookup of this process looks
    (None: no file); forgets the files read so far, so a changed file is read again."""
    _Sources.file = path
    _Sources.read.clear()


def read_passphrase_file(path: Path, *, credential: bool = False) -> bytes:
    """The passphrase in ``path``: read once, one trailing newline dropped. A file that
    others may read is refused, and, unless it is a systemd ``credential``, one that its
    group may read (systemd gives a credential to a service's user with an ACL, which
    shows as group bits; its directory is the service's alone)."""
    cached = _Sources.read.get(path)
    if cached is not None:
        return cached
    what = "credential" if credential else "passphrase file"
    try:
        with path.open("rb") as handle:
            mode = stat.S_IMODE(os.fstat(handle.fileno()).st_mode)  # the file we opened
            if mode & (0o007 if credential else 0o077):
                raise PassphraseFileError(
                    path,
                    f"{path} has mode {mode:04o}; a {what} must be private (chmod 600 {path})",
                )
            data = handle.read(MAX_PASSPHRASE_FILE + 1)
    except FileNotFoundError:
        raise PassphraseFileError(path, f"{path}: no such {what}") from None
    except IsADirectoryError:
        raise PassphraseFileError(path, f"{path} is a directory, not a {what}") from None
    except OSError as exc:
        raise PassphraseFileError(path, f"{path}: {exc.strerror}") from None
    if len(data) > MAX_PASSPHRASE_FILE:
        raise PassphraseFileError(path, f"{path} is larger than {MAX_PASSPHRASE_FILE} bytes")
    if data.endswith(b"\n"):  # one newline, as editors and `echo` leave it
        data = data[:-2] if data.endswith(b"\r\n") else data[:-1]
    if not data:
        raise PassphraseFileError(path, f"{path}: the {what} is empty")
    _Sources.read[path] = data
    return data


def configured_passphrase() -> Passphrase | None:
    """The passphrase given without a terminal, in this order: the file of
    ``--passphrase-file`` (:func:`use_passphrase_file`), ``$TRUSTMESH_PASSPHRASE``,
    ``$CREDENTIALS_DIRECTORY/passphrase``; None when there is none of them."""
    if _Sources.file is not None:
        value = read_passphrase_file(_Sources.file)
        return Passphrase(value, f"--passphrase-file {_Sources.file}")
    env = os.environ.get(PASSPHRASE_ENV)
    if env is not None:
        if not env:
            raise PassphraseError(f"{PASSPHRASE_ENV} is set but empty")
        return Passphrase(env.encode("utf-8"), f"${PASSPHRASE_ENV}")
    credentials = os.environ.get(CREDENTIALS_ENV)
    if credentials:
        path = Path(credentials) / CREDENTIAL_NAME
        if path.exists():  # the service may have other credentials and not this one
            value = read_passphrase_file(path, credential=True)
            return Passphrase(value, f"${CREDENTIALS_ENV}/{CREDENTIAL_NAME}")
    return None


def passphrase_from_env_or_tty(path: Path, *, confirm: bool) -> bytes:
    """The passphrase from :func:`configured_passphrase` (``--passphrase-file``,
    ``$TRUSTMESH_PASSPHRASE``, ``$CREDENTIALS_DIRECTORY/passphrase``), else from a
    prompt on a terminal."""
    found = configured_passphrase()
    if found is not None:
        return found.value
    if not (sys.stdin.isatty() and sys.stderr.isatty()):
        raise PassphraseError(
            f"{path}: a passphrase is needed; give --passphrase-file FILE, set"
            f" {PASSPHRASE_ENV}, or run on a terminal"
        )
    first = getpass.getpass(f"Passphrase for {path}: ")
    if not first:
        raise PassphraseError("empty passphrase")
    if confirm and getpass.getpass("Repeat passphrase: ") != first:
        raise PassphraseError("the two passphrases differ")
    return first.encode("utf-8")


def check_permissions(path: Path, mode: int | None = None) -> None:
    """Refuse a key file that group or others may read or write."""
    if mode is None:
        mode = path.stat().st_mode
    mode = stat.S_IMODE(mode)
    if mode & 0o077:
        raise KeyFilePermissionError(
            f"{path} has mode {mode:04o}; a private key must be private (chmod 600 {path})"
        )


def load_key_file(path: str | os.PathLike[str], passphrase: bytes | None = None) -> PrivateKey:
    """Load a private key file. Without ``passphrase``, an encrypted file asks for one."""
    p = Path(path)
    try:
        with p.open("rb") as handle:
            # Check the file we opened, not the path: it cannot be swapped in between.
            check_permissions(p, os.fstat(handle.fileno()).st_mode)
            pem = handle.read(MAX_KEY_FILE + 1)
    except FileNotFoundError:
        raise KeyStoreError(f"{p}: no such key file") from None
    except OSError as exc:
        raise KeyStoreError(f"{p}: {exc.strerror}") from None
    if len(pem) > MAX_KEY_FILE:
        raise KeyStoreError(f"{p} is larger than {MAX_KEY_FILE} bytes: not a key file")
    if is_encrypted(pem) and passphrase is None:
        passphrase = passphrase_from_env_or_tty(p, confirm=False)
    try:
        return decode_private_key(pem, passphrase)
    except KeyStoreError as exc:
        raise type(exc)(f"{p}: {exc}") from None
    except InvalidKeyError as exc:  # a well-formed key of a type we do not support
        raise KeyStoreError(f"{p}: {exc}") from None


def save_key_file(
    key: PrivateKey,
    path: str | os.PathLike[str],
    passphrase: bytes | None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write ``key`` to ``path`` atomically with mode 0600; encrypted unless ``passphrase`` is None.

    An existing file is never replaced unless ``overwrite`` is set: losing a key is
    worse than a failed command.
    """
    p = Path(path)
    data = encode_private_key(key, passphrase)
    tmp = p.with_name(f".{p.name}.{secrets.token_hex(8)}.tmp")  # never a stale name
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o600)  # exactly 0600, whatever the umask
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if overwrite:
            os.replace(tmp, p)
        else:
            os.link(tmp, p)  # fails if p exists, unlike rename
            tmp.unlink()
        fsync_directory(p.parent)  # the new name survives a crash, the tmp name does not
    except FileExistsError:
        raise KeyStoreError(f"{p} already exists; refusing to overwrite a key") from None
    except OSError as exc:
        raise KeyStoreError(f"{p}: {exc.strerror}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return p


def fsync_directory(directory: Path) -> None:
    """Make a rename or a new file in ``directory`` survive a crash."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileKeyStore:
    """Keys kept as files; passphrases from the environment or a terminal by default."""

    def __init__(self, *, passphrase: bytes | None = None) -> None:
        self._passphrase = passphrase

    def generate(
        self, kind: KeyKind, path: str | os.PathLike[str], *, encrypt: bool = True
    ) -> PrivateKey:
        key = PrivateKey.generate(kind)
        secret = None
        if encrypt:
            secret = self._passphrase or passphrase_from_env_or_tty(Path(path), confirm=True)
        save_key_file(key, path, secret)
        return key

    def load(self, path: str | os.PathLike[str]) -> PrivateKey:
        return load_key_file(path, self._passphrase)


def write_durably(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Write ``path`` so that a crash leaves the old file or the new one, never half, and
    the new one is on disk (file, then directory, fsynced) when this returns."""
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
