"""The CA key ceremony (docs/operations.md): ``ca init --root-key-out`` writes the root key
apart from the CA directory, the issuing CA then serves, enrolls, rotates, revokes and
signs CRLs without it, and ``ca renew`` says which key it needs and takes it with
``--root-key``."""

from __future__ import annotations

import json
import ssl
import stat
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from catools import PASS, WAIT, one_line_failure, serving, succeeds, trustmesh
from cryptography import x509

from trustmesh.pki.ca import CertificateAuthority
from trustmesh.pki.errors import PkiError

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def _json(stdout: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(stdout)
    return data


def _fetch(url: str, ca_cert: Path) -> bytes:
    context = ssl.create_default_context(cafile=str(ca_cert))
    with urllib.request.urlopen(url, context=context, timeout=WAIT) as answer:
        body: bytes = answer.read()
        return body


def _revoked(crl: x509.CertificateRevocationList) -> set[int]:
    return {entry.serial_number for entry in crl}


# --- the library ------------------------------------------------------------------------


def test_init_refuses_a_root_key_path_inside_the_ca_directory(tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    for inside in (ca / "root.key", ca / "keys" / "root.key", tmp_path / "ca" / ".." / "ca" / "r"):
        with pytest.raises(PkiError, match="inside the CA directory"):
            CertificateAuthority.init(ca, PASS.encode(), root_key_out=inside, now=NOW)
    assert not ca.exists()  # refused before anything was written
    with pytest.raises(PkiError, match="not a directory"):
        CertificateAuthority.init(ca, PASS.encode(), root_key_out=tmp_path / "no" / "r.key")
    taken = tmp_path / "taken.key"
    taken.write_text("something precious")
    with pytest.raises(PkiError, match="refusing to overwrite"):
        CertificateAuthority.init(ca, PASS.encode(), root_key_out=taken)
    assert taken.read_text() == "something precious"
    assert not ca.exists()


def test_renew_takes_the_root_key_from_elsewhere_and_checks_it(tmp_path: Path) -> None:
    offline = tmp_path / "offline"
    offline.mkdir()
    root_key = offline / "root.key"
    with CertificateAuthority.init(
        tmp_path / "ca", PASS.encode(), root_key_out=root_key, now=NOW
    ) as ca:
        assert not (ca.directory / "root.key").exists()
        assert stat.S_IMODE(root_key.stat().st_mode) == 0o600
        assert b"ENCRYPTED" in root_key.read_bytes()
        with pytest.raises(PkiError, match=r"--root-key PATH"):
            ca.renew(PASS.encode(), force=True, now=NOW)
        with (
            CertificateAuthority.init(tmp_path / "other", PASS.encode(), now=NOW) as other,
            pytest.raises(PkiError, match="is not this CA's root key"),
        ):
            ca.renew(PASS.encode(), force=True, now=NOW, root_key=other.directory / "root.key")
        with pytest.raises(PkiError, match="is absent"):
            ca.renew(PASS.encode(), force=True, now=NOW, root_key=offline / "missing.key")
        old_root = ca.root_cert
        assert ca.renew(PASS.encode(), force=True, now=NOW, root_key=root_key) == [
            "root",
            "issuing",
        ]
        # Same keys: the new issuing CA chains to the old root and to the new one.
        ca.issuing_cert.verify_directly_issued_by(old_root)
        ca.issuing_cert.verify_directly_issued_by(ca.root_cert)


# --- the command line, as an operator runs the ceremony --------------------------------


def test_an_issuing_ca_without_its_root_key_serves_enrolls_rotates_and_revokes(
    tmp_path: Path,
) -> None:
    ca, offline = tmp_path / "ca", tmp_path / "offline"
    offline.mkdir()
    root_key = offline / "root.key"

    inside = one_line_failure(
        trustmesh("ca", "init", "--dir", ca, "--root-key-out", ca / "root.key")
    )
    assert "inside the CA directory" in inside
    assert not ca.exists()

    made = _json(succeeds("ca", "init", "--dir", ca, "--root-key-out", root_key, "--json"))
    assert made["root_key"] == str(root_key)
    assert root_key.exists()
    assert sorted(p.name for p in ca.iterdir()) == [
        "ca.crt",
        "ca.db",
        "ca.toml",  # ca serve's settings
        "chain.pem",
        "issuing.crt",
        "issuing.key",
    ]

    node = tmp_path / "node-1"
    with serving(ca) as server:
        token = succeeds("ca", "token", "create", "--dir", ca, "--node-id", "node-1").strip()
        enrolled = _json(
            succeeds(
                *("enroll", "--ca-url", server.url, "--ca-cert", ca / "ca.crt"),
                *("--token", token, "--node-id", "node-1", "--out", node, "--no-encrypt"),
                "--json",
                passphrase=None,
            )
        )
        rotated = _json(succeeds("rotate", "--dir", node, "--json", passphrase=None))
        assert rotated["serial"] != enrolled["serial"]
        revoked = _json(succeeds("ca", "revoke", "--dir", ca, "--node-id", "node-1", "--json"))
        serials = {int(enrolled["serial"], 16), int(rotated["serial"], 16)}
        assert {int(s, 16) for s in revoked["revoked"]} == serials
        # The CRL, from the API and from the command line, signed by the issuing CA.
        issuing = x509.load_pem_x509_certificate((ca / "issuing.crt").read_bytes())
        served = x509.load_der_x509_crl(_fetch(f"{server.url}/v1/crl", ca / "ca.crt"))
        assert served.is_signature_valid(issuing.public_key())  # type: ignore[arg-type]
        assert _revoked(served) == serials
        health = json.loads(_fetch(f"{server.url}/v1/health", ca / "ca.crt"))
        assert health["status"] == "ok", health

        # The key-compromise runbook: revoked by node_id, then enrolled again with a new
        # token and key; the node's new certificate is valid and not on the CRL.
        token = succeeds("ca", "token", "create", "--dir", ca, "--node-id", "node-1").strip()
        again = _json(
            succeeds(
                *("enroll", "--ca-url", server.url, "--ca-cert", ca / "ca.crt"),
                *("--token", token, "--node-id", "node-1", "--out", tmp_path / "node-1b"),
                *("--no-encrypt", "--json"),
                passphrase=None,
            )
        )
        states = {
            row["serial"]: row["state"]
            for row in map(json.loads, succeeds("ca", "list", "--dir", ca, "--jsonl").splitlines())
        }
        assert states[again["serial"]] == "valid"
        assert [states[format(s, "x")] for s in serials] == ["revoked", "revoked"]
        fresh = x509.load_der_x509_crl(_fetch(f"{server.url}/v1/crl", ca / "ca.crt"))
        assert _revoked(fresh) == serials
        assert server.terminate() == 0, server.errors()
    written = tmp_path / "crl.der"
    succeeds("ca", "crl", "--dir", ca, "--out", written)
    local = x509.load_der_x509_crl(written.read_bytes())
    assert local.is_signature_valid(issuing.public_key())  # type: ignore[arg-type]
    assert _revoked(local) == serials
    assert not (ca / "root.key").exists()  # nothing above needed it

    # Renewal is the one step that needs the root key, and says so.
    needs = one_line_failure(trustmesh("ca", "renew", "--dir", ca, "--force"))
    assert "root key" in needs and "--root-key PATH" in needs, needs
    old_root = x509.load_pem_x509_certificate((ca / "ca.crt").read_bytes())
    renewed = _json(
        succeeds("ca", "renew", "--dir", ca, "--force", "--root-key", root_key, "--json")
    )
    assert renewed["renewed"] == ["root", "issuing"]
    new_root = x509.load_pem_x509_certificate((ca / "ca.crt").read_bytes())
    new_issuing = x509.load_pem_x509_certificate((ca / "issuing.crt").read_bytes())
    new_issuing.verify_directly_issued_by(old_root)  # nodes may keep the old ca.crt
    new_issuing.verify_directly_issued_by(new_root)
    assert not (ca / "root.key").exists()  # read where it is, never copied in
