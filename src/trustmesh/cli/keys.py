"""``trustmesh keys``: generate and inspect keys in files, on PKCS#11 tokens and in TPMs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from cryptography import x509

from trustmesh.cli.output import emit
from trustmesh.crypto.keys import KeyKind, PublicKey
from trustmesh.errors import InvalidKeyError, KeyStoreError
from trustmesh.keystore.filestore import PASSPHRASE_ENV, check_permissions
from trustmesh.keystore.signer import Signer
from trustmesh.keystore.uri import (
    close_signer,
    generate_signer,
    is_device_uri,
    open_signer,
    store_name,
)


class KeySpec(click.ParamType):  # type: ignore[type-arg]
    """A key file path or a device key URI (``pkcs11:...``, ``tpm:...``), kept as text:
    a URI is not a path (``Path`` would fold its ``//``)."""

    name = "FILE|URI"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        return str(value)


class FileKeyPath(click.Path):
    """A key file path where a device key URI cannot serve: ``refuse(uri)`` raises the
    error that says why, and it becomes a usage error rather than "no such file".

    An existing file that group or others may read is refused as ``keys show`` refuses
    it (KeyFilePermissionError, exit 1): the TLS and JWS keys are read by libraries
    that would take it as it is."""

    def __init__(self, refuse: Callable[[str], object], *, exists: bool = False) -> None:
        super().__init__(exists=exists, dir_okay=False, path_type=Path)
        self.refuse = refuse

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and is_device_uri(value):
            try:
                self.refuse(value)
            except KeyStoreError as exc:
                self.fail(str(exc), param, ctx)
        path = super().convert(value, param, ctx)
        if isinstance(path, Path) and path.is_file():
            check_permissions(path)
        return path


def describe(key: Signer, spec: str | Path | None = None) -> dict[str, object]:
    """What `keys generate` and `keys show` print about a key: its type, public key and
    peer ID, and, given its spec, where it lives (``path`` for a file)."""
    public = key.public_key()
    info: dict[str, object] = {
        "type": str(key.kind),
        "public_key": public.hex(),
        "peer_id": str(public.peer_id()),
    }
    if spec is not None:
        text = str(spec)
        if not is_device_uri(text):
            info["path"] = text
        info["store"] = store_name(text)
        info["key"] = text
    return info


@click.group()
def keys() -> None:
    """Generate and inspect private keys: files, PKCS#11 tokens and TPMs.

    Key files are PKCS#8 PEM, so keys written by `openssl genpkey` load too. New files
    are encrypted (scrypt + AES-256-CBC) with the passphrase from $TRUSTMESH_PASSPHRASE,
    or asked on the terminal, and are created with mode 0600. A key file that group or
    others can read is refused.

    A key on a device is named by a URI, given as --key where an identity key signs
    (botd; the mesh node's identity):

    \b
      pkcs11:token=LABEL;object=LABEL?pin-source=file:PATH    (RFC 7512)
      tpm:TCTI;handle=0x81000100       (TCTI as tpm2-tss: device:/dev/tpmrm0,
                                        swtpm:host=127.0.0.1,port=2321)

    The PIN comes from pin-source=file:... or $TRUSTMESH_PKCS11_PIN, never from the
    command line; the module from module-path=... or $TRUSTMESH_PKCS11_MODULE, else
    SoftHSM2's. TLS keys (catalyst, psec) stay in files: the identity on the device
    authorizes them (docs/protocols/keys.md). BRC-103 identities stay in files too:
    their BRC-42 child keys need the private scalar.
    """


STORE_HELP = (
    "Where the key is made: file (at --out), a PKCS#11 token "
    "(pkcs11:token=...;object=...) or a TPM (tpm:<TCTI>;handle=0x81......). "
    "A device that is absent falls back to an encrypted file at --out, with a warning."
)


@keys.command()
@click.option(
    "--type",
    "key_type",
    type=click.Choice([k.value for k in KeyKind]),
    required=True,
    help="Key algorithm: secp256k1 (BOTD, BRC-103), ed25519, or p256 (mesh certificates). "
    "Tokens hold p256 and secp256k1; a TPM holds p256 only.",
)
@click.option(
    "--store",
    default="file",
    show_default=True,
    metavar="file|pkcs11:...|tpm:...",
    help=STORE_HELP,
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The key file to write (needed with --store file; with a device, the fallback "
    "when the device is absent). An existing file is never overwritten.",
)
@click.option("--no-encrypt", is_flag=True, help="Write the key unencrypted (it is still 0600).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
def generate(key_type: str, store: str, out: Path | None, no_encrypt: bool, as_json: bool) -> None:
    """Generate a new private key in a file, on a PKCS#11 token or in a TPM.

    Prints the type, public key and peer ID, the store it went to ("file", "pkcs11"
    or "tpm"), and "key": what to pass as --key to use it. "fallback" is true when the
    device was absent and the key went to the file at --out instead.

    \b
    Examples:
      TRUSTMESH_PASSPHRASE=... trustmesh keys generate --type secp256k1 --out node.key
      trustmesh keys generate --type ed25519 --out dev.key --no-encrypt
      trustmesh keys generate --type p256 \\
          --store 'pkcs11:token=mesh;object=node-1?pin-source=file:/run/pin'
      trustmesh keys generate --type p256 --out node.key \\
          --store 'tpm:device:/dev/tpmrm0;handle=0x81000100'
    """
    if store != "file" and not is_device_uri(store):
        raise click.BadParameter(
            "give file, pkcs11:token=...;object=... or tpm:<TCTI>;handle=0x81......",
            param_hint="'--store'",
        )
    if store == "file" and out is None:
        raise click.UsageError("Missing option '--out' (the key file that --store file writes)")
    signer, spec = generate_signer(store, KeyKind(key_type), out=out, encrypt=not no_encrypt)
    try:
        info = describe(signer, spec)
    finally:
        close_signer(signer)
    if not is_device_uri(spec):
        info["encrypted"] = not no_encrypt
    info["fallback"] = is_device_uri(store) and not is_device_uri(spec)
    emit(info, as_json=as_json)


@keys.command()
@click.argument("file", required=False, type=KeySpec())
@click.option(
    "--key",
    "key_spec",
    type=KeySpec(),
    help="The key to show: a key file, or a pkcs11: or tpm: key URI (as FILE).",
)
@click.option(
    "--cert",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Show the key of this certificate (PEM, the first one) instead of a key file: "
    "the peer ID a node has in PSEC.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@click.option(
    "--field",
    type=click.Choice(["public_key", "peer_id", "type"]),
    help="Print only this field's value, for scripts: "
    "PEER=$(trustmesh keys show b.key --field public_key).",
)
def show(
    file: str | None, key_spec: str | None, cert: Path | None, as_json: bool, field: str | None
) -> None:
    """Show the type, public key and libp2p peer ID of a key or a certificate.

    FILE is a key file or a key URI on a device (pkcs11:..., tpm:...). The public key
    is hex (compressed SEC1 for secp256k1 and P-256). An encrypted file needs its
    passphrase, from $TRUSTMESH_PASSPHRASE or the terminal; a token its PIN, from the
    URI's pin-source or $TRUSTMESH_PKCS11_PIN.

    \b
    trustmesh keys show node.key
    trustmesh keys show 'pkcs11:token=mesh;object=node-1?pin-source=file:/run/pin'
    trustmesh keys show --key 'tpm:device:/dev/tpmrm0;handle=0x81000100' --json
    trustmesh keys show --cert node.crt --json
    trustmesh keys show b.key --field public_key
    """
    if field is not None and as_json:
        raise click.UsageError("give --field or --json, not both")
    given = [v for v in (file, key_spec, cert) if v is not None]
    if not given:
        raise click.UsageError(
            "Missing argument 'FILE' (a key file or key URI; or --key, or --cert)"
        )
    if len(given) > 1:
        raise click.UsageError("give one of a key FILE, --key or --cert, not both")
    if cert is not None:
        info = describe_certificate(cert)
    else:
        spec = file if file is not None else key_spec
        assert spec is not None
        signer = open_signer(spec)
        try:
            info = describe(signer, spec)
        finally:
            close_signer(signer)
    if field is not None:
        click.echo(info[field])
        return
    emit(info, as_json=as_json)


def describe_certificate(path: Path) -> dict[str, object]:
    try:
        certificate = x509.load_pem_x509_certificates(path.read_bytes())[0]
    except ValueError as exc:
        raise InvalidKeyError(f"{path} holds no PEM certificate: {exc}") from None
    public = PublicKey.from_cryptography(certificate.public_key())
    return {
        "type": str(public.kind),
        "public_key": public.hex(),
        "peer_id": str(public.peer_id()),
        "subject": certificate.subject.rfc4514_string(),
        "serial": format(certificate.serial_number, "x"),
        "path": str(path),
    }


__all__ = [
    "PASSPHRASE_ENV",
    "FileKeyPath",
    "KeySpec",
    "describe",
    "keys",
]
