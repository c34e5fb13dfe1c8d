"""``trustmesh enroll`` and ``trustmesh rotate``: a node's side of the mesh CA."""

from __future__ import annotations

from pathlib import Path

import click

from trustmesh.api.ca_client import NodeCertificate, enroll_node, recorded_devices, rotate_node
from trustmesh.cli.output import emit
from trustmesh.cli.params import HttpsUrl, https_url_problem
from trustmesh.crypto.keys import KeyKind
from trustmesh.errors import ProtocolError
from trustmesh.keystore.filestore import load_key_file, passphrase_from_env_or_tty
from trustmesh.keystore.pkcs8 import is_encrypted
from trustmesh.keystore.signer import Signer
from trustmesh.keystore.uri import close_signer, is_device_uri, open_signer
from trustmesh.tpm.attester import TpmAttester

KEY_TYPES = {"p256": KeyKind.P256, "ed25519": KeyKind.ED25519}

IDENTITY_KEY_OPTION = click.option(
    "--key",
    "identity_key",
    metavar="URI",
    help="Keep the node's identity key apart from its TLS key, on a device:"
    " pkcs11:token=T;object=O (PIN from ?pin-source=file:... or $TRUSTMESH_PKCS11_PIN) or"
    " tpm:<TCTI>;handle=0x81..., made with `trustmesh keys generate --store ...` (P-256),"
    " or in the key file that command fell back to. It signs gossip, bundles and"
    " attestations, and authorizes node.key, which stays a short-lived software TLS key"
    " (docs/protocols/keys.md). Default: node.key is the identity too.",
)
ATTEST_OPTION = click.option(
    "--attest",
    metavar="tpm:TCTI",
    help="Attest with this TPM (a quote over the CA's challenge, at enrollment and every"
    " renewal), e.g. tpm:swtpm:host=127.0.0.1,port=2321 or tpm:device:/dev/tpmrm0"
    " (docs/protocols/attestation.md).",
)


def open_identity(spec: str | None) -> Signer | None:
    """The identity key ``--key`` names (P-256): on a device, or in a key file (where
    `keys generate --store` fell back when the device was absent), or None."""
    if spec is None:
        return None
    return open_signer(spec, kinds={KeyKind.P256})


def attester_for(spec: str | None) -> TpmAttester | None:
    if spec is None:
        return None
    try:
        return TpmAttester.from_spec(spec)
    except ProtocolError as exc:
        raise click.BadParameter(str(exc), param_hint="'--attest'") from None


@click.command()
@click.option(
    "--ca-url", type=HttpsUrl(), required=True, help="The CA API, e.g. https://127.0.0.1:8443."
)
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
@IDENTITY_KEY_OPTION
@ATTEST_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def enroll(
    ca_url: str,
    ca_cert: Path,
    token: str,
    node_id: str,
    out: Path,
    key_type: str,
    no_encrypt: bool,
    identity_key: str | None,
    attest: str | None,
    as_json: bool,
) -> None:
    """Make a node key, enroll it with the mesh CA, and write the node directory.

    node.key is encrypted with $TRUSTMESH_PASSPHRASE (or a prompt) unless --no-encrypt.
    The certificate is checked against --ca-cert before anything is written.

    \b
    With the identity on a TPM, attested:
      trustmesh keys generate --store 'tpm:device:/dev/tpmrm0;handle=0x81000001' --out id.key
      trustmesh enroll ... --key 'tpm:device:/dev/tpmrm0;handle=0x81000001' \\
          --attest tpm:device:/dev/tpmrm0
    """
    passphrase = None if no_encrypt else passphrase_from_env_or_tty(out, confirm=True)
    result = enroll_with_devices(
        ca_url, ca_cert, token, node_id, out, passphrase, key_type, identity_key, attest
    )
    _report(result, as_json)


def enroll_with_devices(
    ca_url: str,
    ca_cert: Path,
    token: str,
    node_id: str,
    out: Path,
    passphrase: bytes | None,
    key_type: str,
    identity_key: str | None,
    attest: str | None,
) -> NodeCertificate:
    """``enroll_node`` with the device identity (``--key``) and attesting TPM
    (``--attest``) the command line names, both recorded in the node directory."""
    problem = https_url_problem(ca_url)  # `node init` passes its --ca-url unchecked
    if problem is not None:
        raise click.BadParameter(problem, param_hint="'--ca-url'")
    identity = open_identity(identity_key)
    attester = attester_for(attest)
    if identity_key is not None and not is_device_uri(identity_key):
        identity_key = str(Path(identity_key).resolve())  # node run opens it from elsewhere
    try:
        return enroll_node(
            ca_url,
            ca_cert,
            token,
            node_id,
            out,
            passphrase=passphrase,
            key_kind=KEY_TYPES[key_type],
            identity=identity,
            identity_uri=identity_key,
            attester=attester,
            attest=attest,
        )
    finally:
        if identity is not None:
            close_signer(identity)


@click.command()
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    required=True,
    help="The node directory `trustmesh enroll` wrote.",
)
@click.option(
    "--ca-url", type=HttpsUrl(), help="The CA API (default: the one the node enrolled with)."
)
@click.option(
    "--keep-key", is_flag=True, help="Certify the current key again instead of a new one."
)
@ATTEST_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def rotate(
    directory: Path, ca_url: str | None, keep_key: bool, attest: str | None, as_json: bool
) -> None:
    """Renew this node's certificate, authenticated by the current one (mTLS).

    A new key is made unless --keep-key. The old certificate stays valid until it
    expires (kept as node.prev.crt and node.prev.key), so live links are not cut.
    A node enrolled with a device identity (--key) or --attest renews with them again
    (enrollment.json records both); --attest here overrides the recorded TPM.
    """
    key_file = directory / "node.key"
    passphrase = None
    if key_file.exists() and is_encrypted(key_file.read_bytes()):
        passphrase = passphrase_from_env_or_tty(key_file, confirm=False)
        load_key_file(key_file, passphrase)  # a wrong passphrase fails here, before the CA
    recorded = recorded_devices(directory)
    identity = open_identity(recorded.get("identity_key"))
    try:
        result = rotate_node(
            directory,
            passphrase=passphrase,
            ca_url=ca_url,
            keep_key=keep_key,
            identity=identity,
            attester=attester_for(attest or recorded.get("attest")),
        )
    finally:
        if identity is not None:
            close_signer(identity)
    _report(result, as_json)


def _report(result: NodeCertificate, as_json: bool) -> None:
    data = {
        "node_id": result.node_id,
        "serial": result.serial,
        "not_after": result.not_after.isoformat(),
        "dir": str(result.directory),
    }
    emit(data, as_json=as_json)
