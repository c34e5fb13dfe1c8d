"""``trustmesh enroll`` and ``trustmesh rotate``: a node's side of the mesh CA."""

from __future__ import annotations

from pathlib import Path

import click

from trustmesh.api.ca_client import NodeCertificate, enroll_node, rotate_node
from trustmesh.cli.output import emit
from trustmesh.crypto.keys import KeyKind
from trustmesh.keystore.filestore import load_key_file, passphrase_from_env_or_tty
from trustmesh.keystore.pkcs8 import is_encrypted

KEY_TYPES = {"p256": KeyKind.P256, "ed25519": KeyKind.ED25519}


@click.command()
@click.option("--ca-url", required=True, help="The CA API, e.g. https://127.0.0.1:8443.")
@click.option(
    "--ca-cert",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    required=True,
    help="The mesh root (the CA's ca.crt): the only certificate the CA server may show.",
)
@click.option("--token", required=True, help="The enrollment token (`trustmesh ca token create`).")
@click.option("--node-id", required=True, help="This node's id; the token must be for it.")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="The node directory: node.key, node.crt, ca.crt, enrollment.json.",
)
@click.option(
    "--key-type",
    type=click.Choice(sorted(KEY_TYPES)),
    default="p256",
    show_default=True,
    help="The node key's type.",
)
@click.option("--no-encrypt", is_flag=True, help="Leave node.key unencrypted (mode 0600 still).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def enroll(
    ca_url: str,
    ca_cert: Path,
    token: str,
    node_id: str,
    out: Path,
    key_type: str,
    no_encrypt: bool,
    as_json: bool,
) -> None:
    """Make a node key, enroll it with the mesh CA, and write the node directory.

    node.key is encrypted with $TRUSTMESH_PASSPHRASE (or a prompt) unless --no-encrypt.
    The certificate is checked against --ca-cert before anything is written.
    """
    passphrase = None if no_encrypt else passphrase_from_env_or_tty(out, confirm=True)
    result = enroll_node(
        ca_url, ca_cert, token, node_id, out, passphrase=passphrase, key_kind=KEY_TYPES[key_type]
    )
    _report(result, as_json)


@click.command()
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    required=True,
    help="The node directory `trustmesh enroll` wrote.",
)
@click.option("--ca-url", help="The CA API (default: the one the node enrolled with).")
@click.option(
    "--keep-key", is_flag=True, help="Certify the current key again instead of a new one."
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def rotate(directory: Path, ca_url: str | None, keep_key: bool, as_json: bool) -> None:
    """Renew this node's certificate, authenticated by the current one (mTLS).

    A new key is made unless --keep-key. The old certificate stays valid until it
    expires (kept as node.prev.crt and node.prev.key), so live links are not cut.
    """
    key_file = directory / "node.key"
    passphrase = None
    if key_file.exists() and is_encrypted(key_file.read_bytes()):
        passphrase = passphrase_from_env_or_tty(key_file, confirm=False)
        load_key_file(key_file, passphrase)  # a wrong passphrase fails here, before the CA
    result = rotate_node(directory, passphrase=passphrase, ca_url=ca_url, keep_key=keep_key)
    _report(result, as_json)


def _report(result: NodeCertificate, as_json: bool) -> None:
    data = {
        "node_id": result.node_id,
        "serial": result.serial,
        "not_after": result.not_after.isoformat(),
        "dir": str(result.directory),
    }
    emit(data, as_json=as_json)
