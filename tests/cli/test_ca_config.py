"""``D/ca.toml``: ``ca init`` writes every ``ca serve`` setting at its default, ``ca serve``
reads it, a flag on the command line overrides it, and a bad file is an error naming the
file and the key. Without the file ``ca serve`` runs as it always did."""

from __future__ import annotations

import json
import tomllib
from datetime import timedelta
from pathlib import Path

import click
import pytest
from catools import PASS, serving, succeeds, trustmesh
from cryptography import x509

import trustmesh.cli.main as cli_main
from trustmesh.api.ca_client import CaClient, CaRequestFailed, make_csr
from trustmesh.cli.ca import serve
from trustmesh.cli.ca_config import (
    CA_CONFIG_FILE,
    LIMITS_TABLE,
    SERVE_KEYS,
    ca_config_text,
    load_ca_config,
)
from trustmesh.crypto.keys import KeyKind, PrivateKey
from trustmesh.io.limits import LIMIT_FIELDS, ResourcePolicy
from trustmesh.pki.ca import CertificateAuthority

DOCS = Path(__file__).resolve().parents[2] / "docs" / "config.md"
# --db is not a ca.toml key: its URI may carry a password, and $TRUSTMESH_CA_DB (or
# PGPASSFILE) is how a service gets it.
NOT_IN_THE_FILE = {"directory", "as_json", "debug", "passphrase_file", "help", "db"}


def _serve_options() -> set[str]:
    return {p.name for p in serve.params if isinstance(p, click.Option) and p.name}


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA made by `trustmesh ca init`, as an operator makes one."""
    directory = tmp_path_factory.mktemp("config") / "ca"
    made = json.loads(succeeds("ca", "init", "--dir", directory, "--json"))
    assert made["config"] == str(directory / CA_CONFIG_FILE)
    return directory


def test_ca_init_writes_every_serve_option_at_its_default(ca_dir: Path) -> None:
    text = (ca_dir / CA_CONFIG_FILE).read_text()
    assert text == ca_config_text(serve)
    assert "A flag given to `ca serve` overrides the value here" in text
    data = tomllib.loads(text)
    # Every option of ca serve is a key, but --dir and --json (and the global flags).
    keys = set(data) - {LIMITS_TABLE}
    commented = {"max_nodes", "attestation_policy", "crl_url", "metrics"}  # no default
    assert keys | commented == set(SERVE_KEYS)
    assert set(SERVE_KEYS) | set(LIMIT_FIELDS) == _serve_options() - NOT_IN_THE_FILE
    for key in commented:
        assert f"\n# {key} = " in text, key
    assert data["host"] == "127.0.0.1" and data["port"] == 8443
    assert data["validity"] == "72h" and data["attestation"] == "none"
    assert data["san"] == data["allow"] == data["bootstrap"] == []
    defaults = ResourcePolicy()
    assert data[LIMITS_TABLE] == {name: getattr(defaults, name) for name in LIMIT_FIELDS}
    # Each key is explained on the line above it, with its flag.
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if line and not line.startswith(("#", "[")):
            key = line.split(" = ")[0]
            assert lines[index - 1].startswith("# "), key
            flag = "--" + key.replace("_", "-")
            assert flag in " ".join(lines[max(0, index - 4) : index]), key
    assert not (ca_dir / CA_CONFIG_FILE).stat().st_mode & 0o022


def test_ca_init_keeps_an_existing_ca_toml(tmp_path: Path) -> None:
    directory = tmp_path / "ca"
    directory.mkdir()
    (directory / CA_CONFIG_FILE).write_text("max_nodes = 3\n")
    succeeds("ca", "init", "--dir", directory)
    assert (directory / CA_CONFIG_FILE).read_text() == "max_nodes = 3\n"


def test_every_key_is_documented() -> None:
    text = DOCS.read_text()
    for key in [*SERVE_KEYS, *LIMIT_FIELDS]:
        assert f"`{key}`" in text, key
    assert "docs/limits.md" in text or "limits.md" in text


# --- ca serve reads it ----------------------------------------------------------------------


def _enroll(server_url: str, ca_cert: Path, ca_dir: Path, node_id: str) -> x509.Certificate:
    with CertificateAuthority(ca_dir, PASS.encode()) as ca:
        token = ca.create_token(node_id)
    with CaClient(server_url, ca_cert) as client:
        answer = client.enroll(token, make_csr(PrivateKey.generate(KeyKind.P256), node_id))
    return x509.load_pem_x509_certificate(answer["certificate"].encode())


def _lifetime(cert: x509.Certificate) -> timedelta:
    """The validity the CA was told (certificates are back-dated by a few minutes, for
    clock skew): to the hour."""
    span = cert.not_valid_after_utc - cert.not_valid_before_utc
    return timedelta(hours=round(span.total_seconds() / 3600))


def test_ca_serve_takes_the_file_s_values_and_flags_override_them(
    ca_dir: Path, tmp_path: Path
) -> None:
    path = ca_dir / CA_CONFIG_FILE
    text = path.read_text()
    text = text.replace("# max_nodes = 1000", "max_nodes = 1")
    text = text.replace('validity = "72h"', 'validity = "2h"')
    text = text.replace("rate = 5.0", "rate = 1000.0").replace("burst = 20", "burst = 1000")
    path.write_text(text)

    with serving(ca_dir) as server:
        first = _enroll(server.url, server.ca_cert, ca_dir, "node-a")
        assert _lifetime(first) == timedelta(hours=2)  # validity from the file
        with pytest.raises(CaRequestFailed) as refused:
            _enroll(server.url, server.ca_cert, ca_dir, "node-b")  # max_nodes = 1
        assert refused.value.status == 403, refused.value
        assert server.terminate() == 0

    # Flags win over the file, for that run.
    with serving(ca_dir, "--validity", "3h", "--max-nodes", "2") as server:
        second = _enroll(server.url, server.ca_cert, ca_dir, "node-b")
        assert _lifetime(second) == timedelta(hours=3)
        assert server.terminate() == 0


def test_without_the_file_ca_serve_runs_on_its_flags(tmp_path: Path) -> None:
    directory = tmp_path / "ca"
    CertificateAuthority.init(directory, PASS.encode()).close()  # an older CA directory
    assert load_ca_config(directory) is None
    with serving(directory, "--rate", "1000", "--burst", "1000") as server:
        cert = _enroll(server.url, server.ca_cert, directory, "node-a")
        assert _lifetime(cert) == timedelta(hours=72)  # --validity's default
        assert server.terminate() == 0


@pytest.mark.parametrize(
    ("content", "said"),
    [
        ("maxnodes = 3\n", "unknown key 'maxnodes'"),
        ("[limits]\nmax_conections = 3\n", "unknown key 'limits.max_conections'"),
        ("limits = 3\n", "limits must be a table"),
        ('validity = "9d"\n', "validity must be between 1h and 7d"),
        ("validity = 5\n", "validity: give a unit"),
        ('gossip_fanout = "abc"\n', "gossip_fanout:"),
        ('san = "ca.example.net"\n', "san must be a list"),
        ("max_nodes = true\n", "max_nodes must be a string or a number"),
        ("[limits]\nheader_timeout = 1\n", "header_timeout must be at least 5"),
        ('[limits]\nmax_tasks = "x"\n', "limits.max_tasks: limit max_tasks must be a number"),
        ("port = [\n", "cannot read"),
    ],
)
def test_a_bad_file_is_an_error_naming_the_file_and_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, said: str
) -> None:
    directory = tmp_path / "ca"
    directory.mkdir()
    (directory / CA_CONFIG_FILE).write_text(content)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        # Refused before the CA is opened: no passphrase, no CA needed.
        cli_main.main(["ca", "serve", "--dir", str(directory), "--port", "0"])
    out, err = capsys.readouterr()
    assert info.value.code == 1, err
    assert out == ""
    assert err.startswith(f"trustmesh: error: {directory / CA_CONFIG_FILE}") or (
        f"cannot read {directory / CA_CONFIG_FILE}" in err
    ), err
    assert said in err, err


def test_a_flag_given_skips_the_file_s_bad_value_for_it(tmp_path: Path) -> None:
    directory = tmp_path / "ca"
    CertificateAuthority.init(directory, PASS.encode()).close()
    (directory / CA_CONFIG_FILE).write_text('validity = "9d"\nport = 1\n')
    with serving(directory, "--validity", "1h") as server:  # --port 0 too
        assert server.port != 1
        assert server.terminate() == 0
    refused = trustmesh("ca", "serve", "--dir", directory, "--port", "0")
    assert refused.returncode == 1 and "validity must be between 1h and 7d" in refused.stderr
