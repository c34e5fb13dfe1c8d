"""`trustmesh ca init|list|revoke` as a user runs them (subprocesses, exit codes, JSON)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from clitools import TRUSTMESH, clean_env
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from trustmesh.pki.ca import CertificateAuthority

PASS = "ca passphrase for tests"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = clean_env(TRUSTMESH_PASSPHRASE=PASS)
    return subprocess.run(
        [TRUSTMESH, *args], capture_output=True, text=True, timeout=60, env=env, check=False
    )


def issue(directory: Path, node_id: str) -> int:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)]))
        .sign(key, hashes.SHA256())
    )
    ca = CertificateAuthority(directory, PASS.encode())
    try:
        return ca.issue(csr, node_id).serial_number
    finally:
        ca.close()


def test_init_list_revoke(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    made = run("ca", "init", "--dir", str(d), "--name", "edge fleet", "--json")
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["ca_cert"] == str(d / "ca.crt")
    root = x509.load_pem_x509_certificate((d / "ca.crt").read_bytes())
    assert root.subject.rfc4514_string() == "CN=edge fleet root"

    again = run("ca", "init", "--dir", str(d))
    assert again.returncode == 1 and "already holds a CA" in again.stderr

    first, second = issue(d, "n1"), issue(d, "n2")
    listed = [
        json.loads(line)
        for line in run("ca", "list", "--dir", str(d), "--json").stdout.splitlines()
    ]
    assert {(r["serial"], r["node_id"], r["state"]) for r in listed} == {
        (format(first, "x"), "n1", "valid"),
        (format(second, "x"), "n2", "valid"),
    }

    by_serial = run("ca", "revoke", "--dir", str(d), "--serial", format(first, "x"), "--json")
    assert by_serial.returncode == 0, by_serial.stderr
    assert json.loads(by_serial.stdout) == {
        "revoked": [format(first, "x")],
        "reason": "unspecified",
    }
    by_node = run("ca", "revoke", "--dir", str(d), "--node-id", "n2", "--reason", "keyCompromise")
    assert by_node.returncode == 0, by_node.stderr
    states = {
        json.loads(line)["node_id"]: json.loads(line)["state"]
        for line in run("ca", "list", "--dir", str(d), "--json").stdout.splitlines()
    }
    assert states == {"n1": "revoked", "n2": "revoked"}


def test_errors_and_usage(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    assert run("ca", "init", "--dir", str(d)).returncode == 0
    unknown = run("ca", "revoke", "--dir", str(d), "--node-id", "nobody")
    assert unknown.returncode == 1 and "no certificate was issued to 'nobody'" in unknown.stderr
    assert run("ca", "revoke", "--dir", str(d)).returncode == 2
    assert run("ca", "revoke", "--dir", str(d), "--serial", "xyz").returncode == 2
    assert (
        run("ca", "revoke", "--dir", str(d), "--node-id", "n", "--reason", "bored").returncode == 2
    )
    env = clean_env(TRUSTMESH_PASSPHRASE="wrong")
    wrong = subprocess.run(
        [TRUSTMESH, "ca", "list", "--dir", str(d)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert wrong.returncode == 1 and "wrong passphrase" in wrong.stderr
    assert "Traceback" not in wrong.stderr


def test_bad_option_values_are_usage_errors_before_the_ca_opens(tmp_path: Path) -> None:
    """Exit 2 and a message naming the option; the CA directory need not even exist."""
    missing = str(tmp_path / "no-ca")
    cases = [
        (["ca", "token", "create", "--dir", missing, "--node-id", "n1", "--ttl", "30s"], "--ttl"),
        (["ca", "token", "create", "--dir", missing, "--node-id", "N_1"], "--node-id"),
        (["ca", "token", "create", "--dir", missing, "--node-id", "n1", "--ttl", "5"], "unit"),
        (["ca", "serve", "--dir", missing, "--validity", "30m"], "--validity"),
        (["ca", "serve", "--dir", missing, "--host", "0.0.0.0"], "--san"),
    ]
    for args, message in cases:
        result = run(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)
