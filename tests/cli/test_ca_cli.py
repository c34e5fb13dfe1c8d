"""`trustmesh ca init|list|revoke` as a user runs them (subprocesses, exit codes, JSON)."""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

from clitools import TRUSTMESH, clean_env
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from trustmesh.api.ca_client import make_csr
from trustmesh.cli.output import serial_text
from trustmesh.crypto.keys import KeyKind, PrivateKey
from trustmesh.pki.ca import CertificateAuthority, token_hash
from trustmesh.pki.enroll import EnrollmentPolicy, MeshSettings, Registrar
from trustmesh.pki.store import admin_token_id

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


def node_csr(node_id: str) -> str:
    return make_csr(PrivateKey.generate(KeyKind.P256), node_id)


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
        for line in run("ca", "list", "--dir", str(d), "--jsonl").stdout.splitlines()
    ]
    assert {(r["serial"], r["node_id"], r["state"]) for r in listed} == {
        (format(first, "x"), "n1", "valid"),
        (format(second, "x"), "n2", "valid"),
    }

    # --json is one document; --jsonl one certificate a line (above).
    document = json.loads(run("ca", "list", "--dir", str(d), "--json").stdout)
    assert [r["serial"] for r in document["certificates"]] == [r["serial"] for r in listed]
    audit = json.loads(run("ca", "audit", "--dir", str(d), "--json").stdout)
    assert {e["event"] for e in audit["entries"]} >= {"issue"}
    by_serial = run("ca", "revoke", "--dir", str(d), "--serial", format(first, "x"), "--json")
    assert by_serial.returncode == 0, by_serial.stderr
    assert json.loads(by_serial.stdout) == {
        "revoked": [format(first, "x")],
        "reason": "unspecified",
        "already_revoked": [],
    }
    # Again: not an error, and it says so rather than looking like news.
    again = run("ca", "revoke", "--dir", str(d), "--serial", format(first, "x"))
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith(f"certificate {format(first, 'x')} was already revoked: ")
    again_json = run("ca", "revoke", "--dir", str(d), "--serial", format(first, "x"), "--json")
    assert json.loads(again_json.stdout)["already_revoked"] == [format(first, "x")]
    by_node = run("ca", "revoke", "--dir", str(d), "--node-id", "n2", "--reason", "keyCompromise")
    assert by_node.returncode == 0, by_node.stderr
    assert by_node.stdout.startswith("revoked ")
    states = {
        json.loads(line)["node_id"]: json.loads(line)["state"]
        for line in run("ca", "list", "--dir", str(d), "--jsonl").stdout.splitlines()
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


def test_ca_list_shows_rotation_lineage(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    assert run("ca", "init", "--dir", str(d)).returncode == 0
    ca = CertificateAuthority(d, PASS.encode())
    try:
        desk = Registrar(ca, EnrollmentPolicy(), MeshSettings())
        enrolled = desk.enroll(ca.create_token("n1"), node_csr("n1"))
        current = desk.authenticate([enrolled.certificate, ca.issuing_cert])
        rotated = desk.rotate(current, node_csr("n1"))
    finally:
        ca.close()
    old, new = enrolled.record.serial_hex, rotated.record.serial_hex
    listed = {
        row["serial"]: row
        for row in map(
            json.loads, run("ca", "list", "--dir", str(d), "--jsonl").stdout.split("\n")[:-1]
        )
    }
    assert (listed[old]["replaces"], listed[old]["replaced_by"]) == (None, new)
    assert (listed[new]["replaces"], listed[new]["replaced_by"]) == (old, None)
    header, *rows = run("ca", "list", "--dir", str(d)).stdout.splitlines()
    assert header.split() == [
        *("SERIAL", "NODE_ID", "ROLE", "STATE", "NOT_AFTER", "REPLACES", "REPLACED_BY")
    ]
    table = {row.split()[0]: row.split() for row in rows}
    assert table[serial_text(new)][5] == serial_text(old)  # REPLACES, as openssl prints it
    assert table[serial_text(old)][6] == serial_text(new)  # REPLACED_BY


def test_admin_tokens_expire_list_and_revoke(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    assert run("ca", "init", "--dir", str(d)).returncode == 0
    made = [
        json.loads(run("ca", "admin-token", "create", "--dir", str(d), *args, "--json").stdout)
        for args in (("--label", "ops", "--ttl", "2s"), ("--label", "oncall"))
    ]
    assert [m["label"] for m in made] == ["ops", "oncall"]
    short, default = made
    assert short["id"] == admin_token_id(token_hash(short["token"]))
    lifetimes = [
        datetime.fromisoformat(m["expires_at"]) - datetime.now(UTC) for m in (short, default)
    ]
    assert lifetimes[0] <= timedelta(seconds=2)
    assert timedelta(hours=23) < lifetimes[1] <= timedelta(hours=24)

    revoked = run("ca", "admin-token", "revoke", "--dir", str(d), default["id"], "--json")
    assert revoked.returncode == 0, revoked.stderr
    assert json.loads(revoked.stdout) == {"id": default["id"], "revoked": True, "already": False}
    listed = [
        json.loads(line)
        for line in run("ca", "admin-token", "list", "--dir", str(d), "--jsonl").stdout.splitlines()
    ]
    assert [(t["id"], t["label"], t["revoked"]) for t in listed] == [
        (short["id"], "ops", False),
        (default["id"], "oncall", True),
    ]
    assert listed[1]["state"] == "revoked"
    assert all("token" not in t for t in listed)  # only hashes are kept
    human = run("ca", "admin-token", "list", "--dir", str(d)).stdout
    assert default["id"] in human and "revoked" in human

    unknown = run("ca", "admin-token", "revoke", "--dir", str(d), "0" * 16)
    assert unknown.returncode == 1 and "no admin token has the id" in unknown.stderr
    for args in (("--ttl", "0s"), ("--ttl", "91d"), ("--ttl", "5")):
        bad = run("ca", "admin-token", "create", "--dir", str(d), *args)
        assert bad.returncode == 2, bad.stderr
        assert "--ttl" in bad.stderr, bad.stderr
    cert = run(
        *("ca", "admin-cert", "--dir", str(d), "--name", "alice", "--out", str(tmp_path / "a")),
        *("--ttl", "10m", "--no-encrypt", "--json"),
    )
    assert cert.returncode == 0, cert.stderr
    left = datetime.fromisoformat(json.loads(cert.stdout)["not_after"]) - datetime.now(UTC)
    assert timedelta(minutes=9) < left <= timedelta(minutes=10)
