"""``trustmesh keys``: generate and inspect key files."""

from __future__ import annotations

from pathlib import Path

import click
from cryptography import x509

from trustmesh.cli.output import emit
from trustmesh.crypto.keys import KeyKind, PrivateKey, PublicKey
from trustmesh.errors import InvalidKeyError
from trustmesh.keystore.filestore import PASSPHRASE_ENV, FileKeyStore


def describe(key: PrivateKey, path: Path | None = None) -> dict[str, object]:
    public = key.public_key()
    info: dict[str, object] = {
        "type": str(key.kind),
        "public_key": public.hex(),
        "peer_id": str(public.peer_id()),
    }
    if path is not None:
        info["path"] = str(path)
    return info


@click.group()
def keys() -> None:
    """Generate and inspect private key files.

    Key files are PKCS#8 PEM, so keys written by `openssl genpkey` load too. New files
    are encrypted (scrypt + AES-256-CBC) with the passphrase from $TRUSTMESH_PASSPHRASE,
    or asked on the terminal, and are created with mode 0600. A key file that group or
    others can read is refused.
    """


@keys.command()
@click.option(
    "--type",
    "key_type",
    type=click.Choice([k.value for k in KeyKind]),
    required=True,
    help="Key algorithm: secp256k1 (BOTD, BRC-103), ed25519, or p256 (mesh certificates).",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Where to write the key; an existing file is never overwritten.",
)
@click.option("--no-encrypt", is_flag=True, help="Write the key unencrypted (it is still 0600).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
def generate(key_type: str, out: Path, no_encrypt: bool, as_json: bool) -> None:
    """Generate a new private key and write it to --out.

    \b
    Examples:
      TRUSTMESH_PASSPHRASE=... trustmesh keys generate --type secp256k1 --out node.key
      trustmesh keys generate --type ed25519 --out dev.key --no-encrypt
    """
    key = FileKeyStore().generate(KeyKind(key_type), out, encrypt=not no_encrypt)
    info = describe(key, out)
    info["encrypted"] = not no_encrypt
    emit(info, as_json=as_json)


@keys.command()
@click.argument("file", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--cert",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Show the key of this certificate (PEM, the first one) instead of a key file: "
    "the peer ID a node has in PSEC.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
def show(file: Path | None, cert: Path | None, as_json: bool) -> None:
    """Show the type, public key and libp2p peer ID of a key file or a certificate.

    The public key is hex (compressed SEC1 for secp256k1 and P-256). An encrypted file
    needs its passphrase, from $TRUSTMESH_PASSPHRASE or the terminal.

    \b
    trustmesh keys show node.key
    trustmesh keys show --cert node.crt --json
    """
    if file is None and cert is None:
        raise click.UsageError("Missing argument 'FILE' (or give --cert with a certificate)")
    if file is not None and cert is not None:
        raise click.UsageError("give a key FILE or --cert, not both")
    if cert is not None:
        emit(describe_certificate(cert), as_json=as_json)
        return
    assert file is not None
    emit(describe(FileKeyStore().load(file), file), as_json=as_json)


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


__all__ = ["PASSPHRASE_ENV", "describe", "keys"]
