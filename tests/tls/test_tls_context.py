"""TlsContext loading: encrypted private keys never prompt; every failure is TlsConfigError."""

from __future__ import annotations

from pathlib import Path

import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from trustmesh.tls import TlsConfig, TlsConfigError, TlsContext


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("tls-context")
    ca = trustme.CA()
    leaf = ca.issue_cert("node-a")
    paths = {
        "ca": directory / "ca.pem",
        "cert": directory / "node-a.pem",
        "key": directory / "node-a.key",
        "encrypted": directory / "node-a.enc.key",
    }
    ca.cert_pem.write_to_path(str(paths["ca"]))
    leaf.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    leaf.private_key_pem.write_to_path(str(paths["key"]))
    key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), password=None)
    paths["encrypted"].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"hunter22"),
        )
    )
    return paths


def test_encrypted_key_loads_with_its_passphrase(files: dict[str, Path]) -> None:
    config = TlsConfig(files["cert"], files["encrypted"], files["ca"], key_passphrase=b"hunter22")
    assert TlsContext(config, server=True).server


def test_plain_key_ignores_a_passphrase(files: dict[str, Path]) -> None:
    config = TlsConfig(files["cert"], files["key"], files["ca"], key_passphrase=b"unused")
    assert not TlsContext(config, server=False).server


@pytest.mark.parametrize(
    ("passphrase", "message"),
    [(None, "no passphrase was given"), (b"wrong", "cannot load private key")],
)
def test_encrypted_key_without_the_right_passphrase_is_refused(
    files: dict[str, Path], passphrase: bytes | None, message: str
) -> None:
    config = TlsConfig(files["cert"], files["encrypted"], files["ca"], key_passphrase=passphrase)
    with pytest.raises(TlsConfigError, match=message):
        TlsContext(config, server=True)


def test_key_that_does_not_match_the_certificate_is_refused(
    files: dict[str, Path], tmp_path: Path
) -> None:
    other = tmp_path / "other.key"
    trustme.CA().issue_cert("x").private_key_pem.write_to_path(str(other))
    with pytest.raises(TlsConfigError, match="cannot load"):
        TlsContext(TlsConfig(files["cert"], other, files["ca"]), server=True)


def test_missing_files_are_config_errors(files: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(TlsConfigError):
        TlsContext(TlsConfig(files["cert"], tmp_path / "absent.key", files["ca"]), server=True)
    with pytest.raises(TlsConfigError):
        TlsContext(TlsConfig(tmp_path / "absent.pem", files["key"], files["ca"]), server=True)
