"""Enrolling, rotating and revoking against a real ``trustmesh ca serve`` process, as a user
does it: with curl and openssl only (the README's flow), then with ``trustmesh enroll``
and ``trustmesh rotate``.

One CA and one server serve the whole module (CA keys are scrypt-encrypted, so a CA costs
a fraction of a second to open); the server is stopped with SIGTERM at the end and must
exit 0. Each test uses node_ids of its own.
"""

from __future__ import annotations

import json
import re
import shlex
import sqlite3
import stat
import subprocess
from collections.abc import Iterator
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trustme
from catools import (
    JSON,
    NODE_PASS,
    PASS,
    Call,
    OpenSsl,
    SharedCa,
    concurrently,
    curl,
    one_line_failure,
    require_curl,
    shared_ca,
    split_pem,
    succeeds,
    trustmesh,
)
from cryptography import x509

import trustmesh.cli.main as cli_main
from trustmesh.api.ca_client import make_csr
from trustmesh.crypto.keys import KeyKind, PrivateKey
from trustmesh.pki.ca import token_hash
from trustmesh.pki.enroll import EnrollmentPolicy, MeshSettings, Registrar


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedCa]:
    with shared_ca(tmp_path_factory, "enroll-ca") as running:
        yield running


@pytest.fixture
def openssl(require_openssl: str, tmp_path: Path) -> OpenSsl:
    return OpenSsl(require_openssl, tmp_path)


# --- the README: curl and openssl only ---------------------------------------------------


def test_readme_flow_with_curl_and_openssl(
    shared: SharedCa, openssl: OpenSsl, tmp_path: Path
) -> None:
    ca = shared.ca_cert
    key, csr = openssl.csr("k", "node-x")
    made, admin_made = concurrently(
        (("ca", "token", "create", "--dir", shared.directory, "--node-id", "node-x"), PASS),
        (("ca", "admin-token", "create", "--dir", shared.directory, "--label", "ops"), PASS),
    )
    assert made.returncode == 0 and admin_made.returncode == 0, (made, admin_made)
    token, admin = made.stdout.strip(), admin_made.stdout.strip()  # printed alone
    assert token.startswith("tmenroll_") and admin.startswith("tmadmin_")

    # Enroll.
    body = tmp_path / "body.json"
    body.write_text(json.dumps({"token": token, "csr": csr.read_text()}))
    reply = curl(f"{shared.url}/v1/enroll", "--cacert", ca, "-H", JSON, "-d", f"@{body}")
    assert reply.status == 200, reply
    enrolled = reply.json()
    assert enrolled["node_id"] == "node-x"
    assert enrolled["config"] == {
        "bootstrap_peers": [],
        "gossip_fanout": 3,
        "crl_url": f"{shared.url}/v1/crl",
    }
    issuing_pem, root_pem = split_pem(enrolled["ca_cert"])
    assert root_pem == ca.read_text()
    (issuing := tmp_path / "issuing.pem").write_text(issuing_pem)
    (node := tmp_path / "node.crt").write_text(enrolled["certificate"])
    verified = openssl.run("verify", "-CAfile", ca, "-untrusted", issuing, node)
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.strip() == f"{node}: OK"
    assert openssl.serial(node) == int(enrolled["serial"], 16)
    assert openssl.public_key(cert=node) == openssl.public_key(key=key)
    extensions = openssl("x509", "-in", node, "-noout", "-ext", "subjectAltName,extendedKeyUsage")
    assert "DNS:node-x" in extensions
    assert "TLS Web Server Authentication, TLS Web Client Authentication" in extensions

    # Rotate over mTLS with the certificate just issued, for a new key. The serial is
    # given as openssl prints it (upper case, padded to whole bytes).
    new_key, new_csr = openssl.csr("k2", "node-x")
    printed_serial = openssl("x509", "-in", node, "-noout", "-serial").strip().split("=")[1]
    rotation = tmp_path / "rotate.json"
    rotation.write_text(
        json.dumps({"csr": new_csr.read_text(), "current_cert_serial": printed_serial})
    )
    mtls = ("--cacert", ca, "--cert", node, "--key", key, "-H", JSON)
    reply = curl(f"{shared.url}/v1/rotate", *mtls, "-d", f"@{rotation}")
    assert reply.status == 200, reply
    rotated = reply.json()
    assert rotated["node_id"] == "node-x"
    assert rotated["previous_serial"] == enrolled["serial"]
    assert rotated["serial"] != enrolled["serial"]
    (new_node := tmp_path / "node2.crt").write_text(rotated["certificate"])
    assert openssl.serial(new_node) == int(rotated["serial"], 16)
    assert openssl.public_key(cert=new_node) == openssl.public_key(key=new_key)
    # Overlap: the old certificate still verifies beside the new one.
    both = openssl.run("verify", "-CAfile", ca, "-untrusted", issuing, node, new_node)
    assert both.returncode == 0, both.stderr
    assert both.stdout.splitlines() == [f"{node}: OK", f"{new_node}: OK"]

    # Revoke the old certificate with the admin bearer token.
    revocation = json.dumps({"serial": enrolled["serial"], "reason": "superseded"})
    bearer = ("-H", f"Authorization: Bearer {admin}", "-H", JSON)
    reply = curl(f"{shared.url}/v1/revoke", "--cacert", ca, *bearer, "-d", revocation)
    assert (reply.status, reply.body) == (204, b""), reply

    # The CRL (DER by default) lists it; openssl -crl_check refuses it and still
    # accepts the new certificate.
    reply = curl(f"{shared.url}/v1/crl", "--cacert", ca)
    assert reply.status == 200, reply
    assert reply.headers["content-type"] == "application/pkix-crl"
    (der := tmp_path / "crl.der").write_bytes(reply.body)
    crl = tmp_path / "crl.pem"
    openssl("crl", "-inform", "DER", "-in", der, "-out", crl)
    (chain := tmp_path / "chain.pem").write_text(enrolled["ca_cert"])
    signed = openssl.run("crl", "-in", crl, "-CAfile", chain, "-noout")
    assert signed.returncode == 0 and "verify OK" in signed.stderr, signed
    crl_text = openssl("crl", "-in", crl, "-noout", "-text")
    listed = {int(s, 16) for s in re.findall(r"Serial Number: ([0-9A-F]+)", crl_text)}
    assert int(enrolled["serial"], 16) in listed
    assert int(rotated["serial"], 16) not in listed
    assert "Superseded" in crl_text
    crl_check = ("verify", "-crl_check", "-CAfile", ca, "-untrusted", issuing, "-CRLfile", crl)
    refused = openssl.run(*crl_check, node)
    assert refused.returncode != 0
    assert "certificate revoked" in refused.stdout + refused.stderr
    accepted = openssl.run(*crl_check, new_node)
    assert accepted.returncode == 0, accepted.stderr
    assert accepted.stdout.strip() == f"{new_node}: OK"

    # Rotation with the revoked certificate: 403.
    reply = curl(f"{shared.url}/v1/rotate", *mtls, "-d", f"@{rotation}")
    assert "revoked" in reply.error(403, "policy_denied")

    # Without a client certificate: 401.
    reply = curl(f"{shared.url}/v1/rotate", "--cacert", ca, "-H", JSON, "-d", f"@{rotation}")
    assert "client certificate" in reply.error(401, "unauthenticated")

    # With a certificate from another CA that copies ours as closely as it can: the
    # issuing CA's name and the serial of the valid new certificate.
    foreign = openssl.foreign_leaf(
        "impostor",
        "node-x",
        new_csr,
        issuer_cn="trustmesh mesh CA issuing",
        serial=int(rotated["serial"], 16),
    )
    impostor = ("--cacert", ca, "--cert", foreign, "--key", new_key, "-H", JSON)
    reply = curl(f"{shared.url}/v1/rotate", *impostor, "-d", f"@{rotation}")
    assert "does not verify" in reply.error(401, "unauthenticated")


def test_the_crl_in_pem_and_its_cache_headers(
    shared: SharedCa, openssl: OpenSsl, tmp_path: Path
) -> None:
    ca = shared.ca_cert
    first = curl(f"{shared.url}/v1/crl?format=pem", "--cacert", ca)
    assert first.status == 200, first
    assert first.headers["content-type"] == "application/x-pem-file"
    (pem := tmp_path / "crl.pem").write_bytes(first.body)
    chain = shared.directory / "chain.pem"  # issuing CA, root
    checked = openssl.run("crl", "-in", pem, "-CAfile", chain, "-noout")
    assert checked.returncode == 0 and "verify OK" in checked.stderr, checked
    assert "max-age" in first.headers["cache-control"]
    etag = first.headers["etag"]
    again = curl(f"{shared.url}/v1/crl?format=pem", "--cacert", ca, "-H", f"If-None-Match: {etag}")
    assert (again.status, again.body) == (304, b"")
    health = curl(f"{shared.url}/v1/health", "--cacert", ca)
    assert health.status == 200 and health.json()["status"] == "ok"
    assert curl(f"{shared.url}/v1/crl?format=xml", "--cacert", ca).error(400, "bad_request")


# --- trustmesh enroll / rotate ----------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_enroll_and_rotate_write_the_node_directory(
    shared: SharedCa, openssl: OpenSsl, tmp_path: Path
) -> None:
    token = shared.authority.create_token("node-a")
    out = tmp_path / "node-a"
    enroll = (
        *("enroll", "--ca-url", shared.url, "--ca-cert", shared.ca_cert, "--token", token),
        *("--node-id", "node-a", "--out", out, "--json"),
    )
    enrolled = json.loads(succeeds(*enroll, passphrase=NODE_PASS))
    assert enrolled["node_id"] == "node-a"
    assert enrolled["dir"] == str(out)
    assert {p.name for p in out.iterdir()} == {"node.key", "node.crt", "ca.crt", "enrollment.json"}
    key, cert = out / "node.key", out / "node.crt"
    assert mode(key) == 0o600
    assert key.read_text().startswith("-----BEGIN ENCRYPTED PRIVATE KEY-----\n")
    assert (out / "ca.crt").read_bytes() == shared.ca_cert.read_bytes()
    _, issuing_pem = split_pem(cert.read_text())  # the chain a node presents
    assert issuing_pem == (shared.directory / "issuing.crt").read_text()
    assert json.loads((out / "enrollment.json").read_text()) == {
        "ca_url": shared.url,
        "node_id": "node-a",
        "serial": enrolled["serial"],
        "not_after": enrolled["not_after"],
        "config": {"bootstrap_peers": [], "gossip_fanout": 3, "crl_url": f"{shared.url}/v1/crl"},
    }
    # openssl reads what trustmesh wrote: the chain verifies, the encrypted key opens.
    verified = openssl.run("verify", "-CAfile", out / "ca.crt", "-untrusted", cert, cert)
    assert verified.returncode == 0, verified.stderr
    assert openssl.serial(cert) == int(enrolled["serial"], 16)
    public = openssl("pkey", "-in", key, "-passin", f"pass:{NODE_PASS}", "-pubout")
    assert public == openssl.public_key(cert=cert)

    # Rotate: a new key and certificate; the previous pair is kept beside them.
    before = {name: (out / name).read_bytes() for name in ("node.key", "node.crt")}
    rotated = json.loads(succeeds("rotate", "--dir", out, "--json", passphrase=NODE_PASS))
    assert rotated["node_id"] == "node-a"
    assert rotated["serial"] != enrolled["serial"]
    assert (out / "node.prev.crt").read_bytes() == before["node.crt"]
    assert (out / "node.prev.key").read_bytes() == before["node.key"]
    assert mode(out / "node.prev.key") == 0o600
    assert mode(key) == 0o600
    assert key.read_bytes() != before["node.key"]
    assert key.read_text().startswith("-----BEGIN ENCRYPTED PRIVATE KEY-----\n")
    assert openssl.serial(cert) == int(rotated["serial"], 16)
    info = json.loads((out / "enrollment.json").read_text())
    assert (info["serial"], info["not_after"]) == (rotated["serial"], rotated["not_after"])
    # Both are recorded and valid: the old one until its own expiry.
    old, new = (
        shared.authority.store.get(int(s, 16)) for s in (enrolled["serial"], rotated["serial"])
    )
    assert old is not None and new is not None
    assert old.revoked_at is None and new.revoked_at is None
    assert (old.node_id, new.node_id) == ("node-a", "node-a")

    # --keep-key certifies the same key again.
    key_before = key.read_bytes()
    again = json.loads(
        succeeds("rotate", "--dir", out, "--keep-key", "--json", passphrase=NODE_PASS)
    )
    assert again["serial"] not in (enrolled["serial"], rotated["serial"])
    assert key.read_bytes() == key_before

    # The spent token cannot enroll again (nothing is written); a wrong passphrase fails
    # before the CA is asked.
    reused, wrong = concurrently(
        ((*enroll[:-3], "--out", tmp_path / "again"), NODE_PASS),
        (("rotate", "--dir", out), "not it"),
    )
    assert one_line_failure(reused) == (
        "trustmesh: error: /v1/enroll: 400 the enrollment token was already used"
    )
    assert not (tmp_path / "again").exists()
    assert "wrong passphrase" in one_line_failure(wrong)

    # Once revoked, the node cannot rotate, and its directory is left as it was.
    shared.authority.revoke(node_id="node-a", reason="keyCompromise")
    refused = one_line_failure(trustmesh("rotate", "--dir", out, passphrase=NODE_PASS))
    assert "/v1/rotate: 403" in refused and "revoked (keyCompromise)" in refused
    assert json.loads((out / "enrollment.json").read_text())["serial"] == again["serial"]
    assert key.read_bytes() == key_before


def test_enroll_refusals_name_the_problem(shared: SharedCa, tmp_path: Path) -> None:
    def enroll(token: str, node_id: str, out: Path, ca_cert: Path | None = None) -> Call:
        args = (
            *("enroll", "--ca-url", shared.url, "--ca-cert", ca_cert or shared.ca_cert),
            *("--token", token, "--node-id", node_id, "--out", out, "--no-encrypt"),
        )
        return args, None  # --no-encrypt: no passphrase at all

    token_b = shared.authority.create_token("node-b")
    token_e = shared.authority.create_token("node-e")
    other_root = tmp_path / "other-root.pem"
    trustme.CA().cert_pem.write_to_path(str(other_root))
    create = ("ca", "token", "create", "--dir", shared.directory, "--node-id", "node-d")
    made, other_node, untrusted = concurrently(
        ((*create, "--ttl", "1m", "--json"), PASS),
        enroll(token_b, "node-c", tmp_path / "c"),  # a token for another node_id
        enroll(token_e, "node-e", tmp_path / "e", ca_cert=other_root),  # not our root
    )
    assert one_line_failure(other_node) == (
        "trustmesh: error: /v1/enroll: 400 the enrollment token is for another node_id,"
        " not 'node-c'"
    )
    # The TLS handshake fails against a root that is not the CA's.
    assert "certificate verify failed" in one_line_failure(untrusted)
    for refused in ("c", "e"):
        assert not (tmp_path / refused).exists()  # nothing written
    found = shared.authority.store.token(token_hash(token_e))
    assert found is not None and found.used_at is None

    # An expired token. The shortest TTL the CLI makes is a minute; rather than wait,
    # move its expiry into the past in the CA's database.
    assert made.returncode == 0, made.stderr
    created = json.loads(made.stdout)
    assert created["node_id"] == "node-d"
    expires = datetime.fromisoformat(created["expires_at"])
    assert timedelta(seconds=50) < expires - datetime.now(UTC) <= timedelta(seconds=60)
    past = int(datetime.now(UTC).timestamp()) - 1
    with closing(sqlite3.connect(shared.directory / "ca.db")) as db, db:
        changed = db.execute(
            "UPDATE tokens SET expires_at = ? WHERE hash = ?", (past, token_hash(created["token"]))
        ).rowcount
    assert changed == 1

    # The token refused for node-c was not spent: node-b enrolls with it, unencrypted.
    out = tmp_path / "b"
    expired, enrolled = concurrently(
        enroll(created["token"], "node-d", tmp_path / "d"),
        enroll(token_b, "node-b", out),
    )
    assert one_line_failure(expired) == (
        "trustmesh: error: /v1/enroll: 400 the enrollment token has expired"
    )
    assert enrolled.returncode == 0, enrolled.stderr
    assert (out / "node.key").read_text().startswith("-----BEGIN PRIVATE KEY-----\n")
    assert mode(out / "node.key") == 0o600

    # It rotates without a passphrase; an enrolled directory is not enrolled again
    # (refused before the CA is asked, so the fresh token stays unspent).
    fresh = shared.authority.create_token("node-b")
    rotated, already = concurrently((("rotate", "--dir", out), None), enroll(fresh, "node-b", out))
    assert rotated.returncode == 0, rotated.stderr
    assert mode(out / "node.key") == 0o600
    assert (out / "node.prev.key").read_text().startswith("-----BEGIN PRIVATE KEY-----\n")
    assert "this directory is already enrolled" in one_line_failure(already)
    unspent = shared.authority.store.token(token_hash(fresh))
    assert unspent is not None and unspent.used_at is None


def test_a_ca_url_that_is_not_https_is_a_usage_error(tmp_path: Path) -> None:
    # The CA API is HTTPS only: an http:// URL used to fail later, with no hint.
    root = tmp_path / "ca.crt"
    trustme.CA().cert_pem.write_to_path(str(root))
    out = tmp_path / "node"
    out.mkdir()
    common = ("--ca-cert", root, "--token", "t", "--node-id", "node-h", "--no-encrypt")
    calls: list[Call] = [
        (("enroll", "--ca-url", url, *common, "--out", tmp_path / "n"), None)
        for url in ("http://127.0.0.1:8443", "ftp://127.0.0.1", "127.0.0.1:8443")
    ]
    calls.append((("rotate", "--dir", out, "--ca-url", "http://127.0.0.1:8443"), None))
    # `node init` enrolls through the same code, after its own checks.
    init = ("node", "init", "--dir", tmp_path / "n", "--listen", "127.0.0.1:0")
    calls.append(
        ((*init, "--api", "127.0.0.1:0", "--ca-url", "http://127.0.0.1:8443", *common), None)
    )
    for result in concurrently(*calls):
        assert result.returncode == 2, result
        assert "Invalid value for '--ca-url': the CA API is HTTPS only" in result.stderr
        assert "give https://HOST:PORT" in result.stderr
    assert not (tmp_path / "n").exists()


def _readme_commands(program: str) -> list[str]:
    """The README's ``program`` commands in its sh blocks, continuation lines joined."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)```", readme, flags=re.DOTALL)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return [" ".join(line.split()) for line in lines if line.lstrip().startswith(program + " ")]


def test_the_readme_s_curl_commands_that_write_files_fail_on_an_error(
    shared: SharedCa, openssl: OpenSsl, tmp_path: Path
) -> None:
    writers = [c for c in _readme_commands("curl") if " -o " in c]
    assert len(writers) == 3, writers  # enroll, rotate, the CRL
    assert all("--fail-with-body" in c for c in writers), writers
    # The enrollment as written, with a token the CA refuses: curl exits 22 (it used to
    # exit 0 with the JSON error in node.crt, and the next command read it as PEM).
    enroll = next(c for c in writers if "/v1/enroll" in c)
    _, csr = openssl.csr("readme", "node-1")
    (tmp_path / "ca").mkdir()
    (tmp_path / "ca" / "ca.crt").write_bytes(shared.ca_cert.read_bytes())
    argv = shlex.split(enroll.replace("https://127.0.0.1:8443", shared.url))
    csr_name = next(a.removeprefix("csr@") for a in argv if a.startswith("csr@"))
    (tmp_path / csr_name).write_bytes(csr.read_bytes())
    out = tmp_path / argv[argv.index("-o") + 1]
    result = subprocess.run(
        [require_curl(), "-q", "-sS", *argv[1:]],
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 22, result
    assert json.loads(out.read_text())["error"] == "invalid_token"  # "token=$TOKEN", as is


# --- help ---------------------------------------------------------------------------------


def test_help_names_the_key_options(capsys: pytest.CaptureFixture[str]) -> None:
    expected = {
        ("ca", "serve"): (
            *("--dir", "--host", "--port", "--allow", "--max-nodes", "--attestation"),
            *("--validity", "--bootstrap", "--gossip-fanout", "--crl-url", "--rate", "--burst"),
            *("--json", "SIGTERM", "/v1/enroll", "/v1/rotate", "/v1/crl", "/v1/revoke"),
        ),
        ("enroll",): (
            *("--ca-url", "--ca-cert", "--token", "--node-id", "--out", "--no-encrypt"),
            *("--key-type", "--json", "TRUSTMESH_PASSPHRASE"),
        ),
        ("rotate",): ("--dir", "--ca-url", "--keep-key", "--json", "node.prev.crt"),
        ("ca", "token", "create"): ("--dir", "--node-id", "--ttl", "--json"),
    }
    for command, words in expected.items():
        # In this process: the text is the same, and a process would spend 0.7 s importing.
        with pytest.raises(SystemExit) as stopped:
            cli_main.main([*command, "--help"])
        assert stopped.value.code in (0, None)
        out = capsys.readouterr().out
        text = " ".join(out.split())  # click wraps long lines
        missing = [word for word in words if word not in text]
        assert not missing, f"trustmesh {' '.join(command)} --help lacks {missing}:\n{out}"


def test_rotate_deletes_a_revoked_previous_key_and_a_superseded_certificate_gets_409(
    shared: SharedCa, tmp_path: Path
) -> None:
    out = tmp_path / "node-p"
    token = shared.authority.create_token("node-p")
    enroll = (
        *("enroll", "--ca-url", shared.url, "--ca-cert", shared.ca_cert, "--token", token),
        *("--node-id", "node-p", "--out", out, "--json"),
    )
    enrolled = json.loads(succeeds(*enroll, passphrase=NODE_PASS))
    rotated = json.loads(succeeds("rotate", "--dir", out, "--json", passphrase=NODE_PASS))
    assert (out / "node.prev.key").exists()
    # The previous certificate is revoked, and the current one is superseded behind the
    # node's back (its successor issued to another key).
    shared.authority.revoke(serial=int(enrolled["serial"], 16), reason="keyCompromise")
    desk = Registrar(shared.authority, EnrollmentPolicy(), MeshSettings())
    chain = x509.load_pem_x509_certificates((out / "node.crt").read_bytes())
    current = desk.authenticate(chain)
    desk.rotate(current, make_csr(PrivateKey.generate(KeyKind.P256), "node-p"))
    key_before = (out / "node.key").read_bytes()
    refused = one_line_failure(trustmesh("rotate", "--dir", out, passphrase=NODE_PASS))
    assert "/v1/rotate: 409" in refused and "already replaced" in refused
    assert not (out / "node.prev.key").exists() and not (out / "node.prev.crt").exists()
    assert (out / "node.key").read_bytes() == key_before
    assert not (out / "node.next.key").exists()  # refused: the pending key is useless
    assert json.loads((out / "enrollment.json").read_text())["serial"] == rotated["serial"]
