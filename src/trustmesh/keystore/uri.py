"""One ``--key`` for every key store: a file path, a ``pkcs11:`` URI or a ``tpm:`` URI.

    signer = open_signer("node.key")                                  # encrypted PKCS#8 file
    signer = open_signer("pkcs11:token=mesh;object=node?pin-source=file:/run/pin")
    signer = open_signer("tpm:device:/dev/tpmrm0;handle=0x81000100")
    signer, spec = generate_signer("pkcs11:token=mesh;object=node", KeyKind.P256, out=None)

A device that is not there at all (no PKCS#11 module file; a TPM whose TCTI cannot
connect) is *absent*: ``generate_signer`` then writes an encrypted file key instead when
it was given a path for one, and says so in one warning. A device that is there and
refuses (wrong PIN, unknown token, full TPM) is an error, never a fallback: falling back
then would hide a fault and leave the identity on disk without anyone asking.

TLS keys stay in software (``require_file_key``): the device identity key authorizes
short-lived TLS keys instead of doing every handshake itself (docs/protocols/keys.md).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from trustmesh.crypto.keys import KeyKind
from trustmesh.errors import KeyStoreError
from trustmesh.keystore.filestore import FileKeyStore, load_key_file
from trustmesh.keystore.signer import Signer

if TYPE_CHECKING:
    from trustmesh.keystore.tpm import TpmSigner

log = logging.getLogger("trustmesh.keystore")

PKCS11_SCHEME = "pkcs11:"
TPM_SCHEME = "tpm:"
DEVICE_SCHEMES = (PKCS11_SCHEME, TPM_SCHEME)
TPM_KINDS = frozenset({KeyKind.P256})  # what a TPM 2.0 signs with, of the kinds we use
DEFAULT_TPM_DEVICE = "/dev/tpmrm0"  # tpm2-tss's default for the device TCTI


class KeySpecError(KeyStoreError):
    """A ``--key`` value that cannot be used where it was given."""


class KeyKindMismatchError(KeySpecError):
    """The key is of another algorithm than the one needed here."""


class DeviceAbsentError(KeySpecError):
    """The key URI names a device (PKCS#11 module, TPM) that is not present."""


class SoftwareKeyRequiredError(KeySpecError):
    """A device key URI was given where only a key file can serve."""


def is_device_uri(spec: str) -> bool:
    """Whether ``spec`` names a key on a device rather than a key file."""
    return spec.startswith(DEVICE_SCHEMES)


def store_name(spec: str) -> str:
    """``"pkcs11"``, ``"tpm"`` or ``"file"``: which store ``spec`` names."""
    for scheme in DEVICE_SCHEMES:
        if spec.startswith(scheme):
            return scheme[:-1]
    return "file"


def _kinds_text(kinds: Collection[KeyKind]) -> str:
    return " or ".join(sorted(str(k) for k in kinds))


def open_signer(
    spec: str,
    *,
    passphrase: bytes | None = None,
    kinds: Collection[KeyKind] | None = None,
) -> Signer:
    """The key ``spec`` names: a key file, or a key on a PKCS#11 token or a TPM.

    ``passphrase`` opens an encrypted file (default: $TRUSTMESH_PASSPHRASE or the
    terminal); it is ignored for devices, whose PIN comes from the URI or the
    environment. ``kinds`` limits the algorithms accepted; another raises
    :class:`KeyKindMismatchError` naming what is needed and what was found.
    """
    if spec.startswith(TPM_SCHEME) and kinds is not None and not TPM_KINDS & set(kinds):
        # Said before touching the TPM: it would refuse anyway, with a vaguer message.
        raise KeyKindMismatchError(
            f"a {_kinds_text(kinds)} key is needed here, and a TPM holds P-256 keys only; "
            "use a pkcs11: URI or a key file"
        )
    signer: Signer
    if spec.startswith(PKCS11_SCHEME):
        signer = _open_pkcs11(spec)
    elif spec.startswith(TPM_SCHEME):
        signer = _open_tpm(spec)
    else:
        signer = load_key_file(spec, passphrase)
    if kinds is not None and signer.kind not in kinds:
        close_signer(signer)
        raise KeyKindMismatchError(
            f"a {_kinds_text(kinds)} key is needed here, {spec} holds a {signer.kind} key"
        )
    return signer


def generate_signer(
    store: str, kind: KeyKind, *, out: Path | None, encrypt: bool = True
) -> tuple[Signer, str]:
    """A new key in ``store`` (``file``, ``pkcs11:...`` or ``tpm:...``), and the spec
    that opens it again (the path for a file, the URI for a device).

    ``out`` is the key file for ``file``, and the fallback for a device that is absent:
    the key is then written there (encrypted unless ``encrypt`` is false, as for
    ``file``) with one warning on the ``trustmesh.keystore`` logger. A caller tells a
    fallback by the spec: a file path where a device URI was asked for.
    """
    if store == "file":
        if out is None:
            raise KeySpecError("the file store needs a path to write the key to")
        return FileKeyStore().generate(kind, out, encrypt=encrypt), str(out)
    if store.startswith(PKCS11_SCHEME):
        if kind not in (KeyKind.P256, KeyKind.SECP256K1):
            raise KeySpecError(f"a PKCS#11 token key is p256 or secp256k1, not {kind}")
        absent = _pkcs11_absence(store)
        if absent is None:
            return _generate_pkcs11(store, kind), store
    elif store.startswith(TPM_SCHEME):
        if kind not in TPM_KINDS:
            # Not a fallback reason: the TPM may be right there, it just has no such curve.
            raise KeySpecError(
                f"a TPM 2.0 has no {kind} keys (it does P-256 only); for {kind} use "
                "a pkcs11: URI or --store file"
            )
        absent = _tpm_absence(store)
        if absent is None:
            return _tpm_signer_class().generate(store, kind), store
    else:
        raise KeySpecError(
            f"unknown key store {store[:40]!r}: give file, pkcs11:token=...;object=... "
            "or tpm:<TCTI>;handle=0x81......"
        )
    if out is None:
        raise DeviceAbsentError(f"{absent}; give a file path to fall back to (--out)")
    key = FileKeyStore().generate(kind, out, encrypt=encrypt)
    log.warning(
        "%s; the new %s key went to the %sfile store instead: %s",
        absent,
        kind,
        "encrypted " if encrypt else "",
        out,
    )
    return key, str(out)


def require_file_key(spec: str, what: str) -> Path:
    """``spec`` as a key file path; a device URI raises :class:`SoftwareKeyRequiredError`.

    ``what`` names the key in the message (for example "the Catalyst TLS key (--key)").
    """
    if is_device_uri(spec):
        raise SoftwareKeyRequiredError(
            f"{what} must be a key file, not a {store_name(spec)} URI: TLS keys stay in "
            "software; put the identity on the device with `trustmesh node init --key ...`; "
            "see docs/protocols/keys.md"
        )
    return Path(spec)


# --- PKCS#11 --------------------------------------------------------------------------


def _open_pkcs11(uri: str) -> Signer:
    from trustmesh.keystore.pkcs11 import Pkcs11Signer

    absent = _pkcs11_absence(uri)
    if absent is not None:
        raise DeviceAbsentError(absent)
    return Pkcs11Signer.open(uri)


def _pkcs11_absence(uri: str) -> str | None:
    """Why no PKCS#11 module is there for ``uri``, or None when its module file exists.

    Only a missing module counts: a token label that is not found may be a typo, and a
    typo must not quietly put an identity in a file.
    """
    from trustmesh.keystore.pkcs11 import Pkcs11Error, Pkcs11Uri

    parsed = Pkcs11Uri.parse(uri)  # a malformed URI is an error, not an absent device
    try:
        module = parsed.module()
    except Pkcs11Error as exc:
        return f"no PKCS#11 device: {exc}"
    if not Path(module).is_file():
        return f"no PKCS#11 device: the module {module} does not exist"
    return None


def _generate_pkcs11(uri: str, kind: KeyKind) -> Signer:
    import pkcs11
    from pkcs11 import Attribute, ObjectClass

    from trustmesh.keystore.pkcs11 import Pkcs11Error, Pkcs11Signer, Pkcs11Uri, _session

    parsed = Pkcs11Uri.parse(uri)
    session = _session(parsed)
    try:
        # Keys are found by label: a second key of the same label would make both
        # unusable, as an overwritten file would lose the first.
        # Read to the end: a search left open is finalised on a closed session later.
        found = list(
            session.get_objects(
                {Attribute.LABEL: parsed.object, Attribute.CLASS: ObjectClass.PRIVATE_KEY}
            )
        )
    except pkcs11.PKCS11Error as exc:
        raise Pkcs11Error(f"cannot search token {parsed.token!r}: {exc!r}") from None
    finally:
        session.close()
    if found:
        raise KeySpecError(
            f"token {parsed.token!r} already holds a key {parsed.object!r}; "
            "refusing to make a second one (pick another object=)"
        )
    return Pkcs11Signer.generate(uri, kind)


# --- TPM ------------------------------------------------------------------------------


NO_TPM_SUPPORT = "no TPM support: tpm2-pytss is not installed (pip install 'trustmesh[tpm]')"


def _no_tpm_support(exc: ImportError) -> bool:
    """Whether ``exc`` says tpm2-pytss is missing (absent TPM support), not some bug."""
    return (exc.name or "").startswith("tpm2_pytss")


def _tpm_signer_class() -> type[TpmSigner]:
    """TpmSigner, imported on use: it needs the optional tpm2-pytss (trustmesh[tpm])."""
    try:
        from trustmesh.keystore.tpm import TpmSigner
    except ImportError as exc:
        if _no_tpm_support(exc):
            raise DeviceAbsentError(NO_TPM_SUPPORT) from None
        raise
    return TpmSigner


def _open_tpm(uri: str) -> Signer:
    absent = _tpm_absence(uri)
    if absent is not None:
        raise DeviceAbsentError(absent)
    return _tpm_signer_class().open(uri)


@contextlib.contextmanager
def _quiet_tss2() -> Iterator[None]:
    """Silence tpm2-tss's own stderr logging while probing: a missing TPM is reported
    once, by us, not as four ERROR lines from C. It is read per message, so the old
    setting is back as soon as the probe ends."""
    if "TSS2_LOG" in os.environ:  # the user asked for tss2 logs: keep them
        yield
        return
    os.environ["TSS2_LOG"] = "all+none"
    try:
        yield
    finally:
        os.environ.pop("TSS2_LOG", None)


def _tpm_absence(uri: str) -> str | None:
    """Why no TPM answers at the URI's TCTI, or None when one does. A malformed URI, an
    unknown TCTI, or a device node that exists but refuses is not "absent": those are
    errors (TpmUri and TpmSigner say what is wrong)."""
    try:
        from trustmesh.keystore.tpm import TpmUri
    except ImportError as exc:
        if _no_tpm_support(exc):
            return NO_TPM_SUPPORT
        raise
    tcti = TpmUri.parse(uri).tcti
    # tpm2-pytss ships no type hints: reached through importlib, as Any.
    ldr = importlib.import_module("tpm2_pytss.TCTILdr")
    tss2 = importlib.import_module("tpm2_pytss.TSS2_Exception")
    constants = importlib.import_module("tpm2_pytss.constants")
    name, _, conf = tcti.partition(":")
    if name == "device" and Path(conf or DEFAULT_TPM_DEVICE).exists():
        return None  # there, perhaps not ours to open: that is an error, not absence
    with _quiet_tss2():
        try:
            ldr.TCTILdr.parse(tcti).close()
        except tss2.TSS2_Exception as exc:
            if exc.rc == constants.TSS2_RC.TCTI_RC_IO_ERROR:
                return f"no TPM answers at TCTI {tcti!r}"
        except (RuntimeError, TypeError, ValueError):
            return None  # a malformed TCTI, not an absent TPM: TpmSigner says what is wrong
    return None


def close_signer(signer: Signer) -> None:
    """Release a device session (a file key has nothing to release)."""
    close = getattr(signer, "close", None)
    if callable(close):
        close()
