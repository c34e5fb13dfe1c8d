"""``trustmesh ca``: the mesh CA, run locally on its directory."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import click

from trustmesh.cli.output import emit
from trustmesh.keystore.filestore import passphrase_from_env_or_tty
from trustmesh.pki.ca import REASONS, CertificateAuthority

DIR_OPTION = click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="The CA directory (ca.crt, the encrypted keys, ca.db).",
)


def _open(directory: Path) -> CertificateAuthority:
    ca = CertificateAuthority(directory, passphrase_from_env_or_tty(directory, confirm=False))
    for warning in ca.expiry_warnings():  # loudly, on every command
        click.echo(f"trustmesh: WARNING: {warning}", err=True)
    return ca


@click.group()
def ca() -> None:
    """The mesh CA: a root and an issuing CA, node certificates, revocation.

    The CA keys are encrypted with the passphrase from $TRUSTMESH_PASSPHRASE (or the
    terminal). Give nodes D/ca.crt, the root they trust.
    """


@ca.command()
@DIR_OPTION
@click.option("--name", default="trustmesh mesh CA", show_default=True, help="CA name (its CN).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def init(directory: Path, name: str, as_json: bool) -> None:
    """Create a root and an issuing CA (P-256) in an empty directory."""
    passphrase = passphrase_from_env_or_tty(directory, confirm=True)
    authority = CertificateAuthority.init(directory, passphrase, name=name)
    try:
        root, issuing = authority.root_cert, authority.issuing_cert
        emit(
            {
                "dir": str(directory),
                "ca_cert": str(directory / "ca.crt"),
                "root_expires": root.not_valid_after_utc.isoformat(),
                "issuing_expires": issuing.not_valid_after_utc.isoformat(),
            },
            as_json=as_json,
        )
    finally:
        authority.close()


@ca.command(name="list")
@DIR_OPTION
@click.option("--json", "as_json", is_flag=True, help="One JSON object per certificate.")
def list_certificates(directory: Path, as_json: bool) -> None:
    """Every certificate the CA issued, with its state (valid, expired, revoked)."""
    authority = _open(directory)
    try:
        now = datetime.now(UTC)
        for cert in authority.store.all():
            state = "revoked" if cert.revoked_at else "expired" if cert.not_after < now else "valid"
            row = {
                "serial": cert.serial_hex,
                "node_id": cert.node_id,
                "not_before": cert.not_before.isoformat(),
                "not_after": cert.not_after.isoformat(),
                "state": state,
                "reason": cert.reason,
            }
            human = f"{cert.serial_hex:>32}  {cert.node_id:<24} {state:<8} {row['not_after']}"
            emit(row, as_json=as_json, human=human)
    finally:
        authority.close()


@ca.command()
@DIR_OPTION
@click.option("--serial", help="Revoke this certificate (hex serial, as `ca list` shows it).")
@click.option("--node-id", help="Revoke every certificate of this node.")
@click.option(
    "--reason",
    type=click.Choice(sorted(REASONS)),
    default="unspecified",
    show_default=True,
    help="RFC 5280 reason.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def revoke(
    directory: Path, serial: str | None, node_id: str | None, reason: str, as_json: bool
) -> None:
    """Revoke by --serial or by --node-id; the next CRL lists it."""
    if (serial is None) == (node_id is None):
        raise click.UsageError("give --serial or --node-id (one of them)")
    number = None
    if serial is not None:
        try:
            number = int(serial.removeprefix("0x"), 16)
        except ValueError:
            raise click.BadParameter("not a hex serial", param_hint="'--serial'") from None
    authority = _open(directory)
    try:
        revoked = authority.revoke(serial=number, node_id=node_id, reason=reason)
        emit({"revoked": [format(s, "x") for s in revoked], "reason": reason}, as_json=as_json)
    finally:
        authority.close()
