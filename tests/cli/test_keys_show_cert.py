"""`trustmesh keys show --cert F`: a certificate's key and peer ID (a node's PSEC
identity), the same peer ID as its key file's."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from trustmesh.cli import main as cli_main
from trustmesh.crypto.keys import KeyKind, PrivateKey
from trustmesh.keystore.filestore import FileKeyStore


def test_a_certificate_shows_the_peer_id_of_its_key(tmp_path: Path) -> None:
    key_file = tmp_path / "node.key"
    key = FileKeyStore().generate(KeyKind.P256, key_file, encrypt=False)
    assert isinstance(key, PrivateKey)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "node-z")])
    now = datetime.now(UTC)
    signer = key.to_cryptography()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(signer.public_key())
        .serial_number(7)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .sign(signer, hashes.SHA256())
    )
    cert_file = tmp_path / "node.crt"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    runner = CliRunner()
    of_key = runner.invoke(cli_main.cli, ["keys", "show", str(key_file), "--json"])
    of_cert = runner.invoke(cli_main.cli, ["keys", "show", "--cert", str(cert_file), "--json"])
    assert of_key.exit_code == 0 and of_cert.exit_code == 0, of_cert.output
    shown = json.loads(of_cert.output)
    assert shown["peer_id"] == json.loads(of_key.output)["peer_id"]
    assert shown["subject"] == "CN=node-z" and shown["type"] == "p256"
    # --field: the one value alone, for $(...) in scripts; the same from key and cert.
    for source in ([str(key_file)], ["--cert", str(cert_file)]):
        for field in ("public_key", "peer_id", "type"):
            result = runner.invoke(cli_main.cli, ["keys", "show", *source, "--field", field])
            assert result.exit_code == 0 and result.output == f"{shown[field]}\n", result.output
    result = runner.invoke(
        cli_main.cli, ["keys", "show", str(key_file), "--field", "type", "--json"]
    )
    assert result.exit_code == 2 and "not both" in result.output


def test_one_of_a_key_file_or_a_certificate(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli_main.cli, ["keys", "show"])
    assert result.exit_code == 2 and "Missing argument 'FILE'" in result.output
    both = ["keys", "show", str(not_pem := tmp_path / "junk.crt"), "--cert", str(not_pem)]
    not_pem.write_text("junk")
    result = CliRunner().invoke(cli_main.cli, both)
    assert result.exit_code == 2 and "not both" in result.output
    result = CliRunner().invoke(cli_main.cli, ["keys", "show", "--cert", str(not_pem)])
    assert result.exit_code == 1
