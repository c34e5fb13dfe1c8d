"""Human output for people, JSON for programs (issue 21, "Human output").

Every table has a header row; no Python repr (``['61e5..']``, ``[]``, ``None``, a dict)
leaks into human output; serials are printed as ``openssl x509 -serial -noout`` prints
them (uppercase hex, an even number of digits), so they can be grepped across tools,
while JSON keeps lowercase hex; ``--jsonl`` prints one JSON object per line and
``--json`` (except where it streamed before) exactly one JSON document.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from clitools import TRUSTMESH, clean_env
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from trustmesh.api.ca_client import make_csr
from trustmesh.cli import bundle as bundle_cli
from trustmesh.cli import main as cli_main
from trustmesh.cli import node as node_cli
from trustmesh.cli.output import emit, human_value, key_values, serial_text, table
from trustmesh.crypto.keys import KeyKind, PrivateKey
from trustmesh.pki import ca as pki_ca
from trustmesh.pki.ca import CertificateAuthority
from trustmesh.pki.enroll import EnrollmentPolicy, MeshSettings, Registrar

PASS = "ca passphrase for the human output tests"
WAIT = 30.0

# What a Python repr looks like in text meant for people.
REPR = re.compile(r"[\[\]{}']|\bNone\b|\bTrue\b|\bFalse\b")

# Serials chosen for their printed form: an odd number of hex digits (openssl keeps a
# leading zero), and a top bit set (DER adds a sign byte; openssl does not print it).
ODD_DIGITS = 0xABCDEF123
TOP_BIT = 0x80AB


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [TRUSTMESH, *map(str, args)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=WAIT,
        env=clean_env(TRUSTMESH_PASSPHRASE=PASS),
        check=False,
    )
    assert result.returncode == 0, f"trustmesh {' '.join(map(str, args))}: {result.stderr}"
    assert "Traceback" not in result.stderr
    return result


def openssl_serial(openssl: str, cert: Path) -> str:
    """What ``openssl x509 -serial -noout`` prints for ``cert``, without ``serial=``."""
    out = subprocess.run(
        [openssl, "x509", "-serial", "-noout", "-in", str(cert)],
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=True,
    ).stdout.strip()
    assert out.startswith("serial="), out
    return out.removeprefix("serial=")


def assert_no_repr(text: str) -> None:
    for line in text.splitlines():
        assert not REPR.search(line), f"a Python repr in human output: {line!r}"


def assert_header(text: str, *columns: str) -> list[list[str]]:
    """The table's rows split on whitespace, after checking its header row."""
    header, *rows = text.splitlines()
    assert header.split() == list(columns), header
    assert rows, "a table with no rows"
    return [row.split() for row in rows]


# --- the helpers themselves ---------------------------------------------------------


def test_serial_text_is_openssl_form() -> None:
    assert serial_text(0xABC) == "0ABC"
    assert serial_text("abc") == "0ABC"
    assert serial_text("0x0abc") == "0ABC"
    assert serial_text("0a:bc") == "0ABC"
    assert serial_text(0x1A2B) == "1A2B"
    assert serial_text(0) == "00"
    assert serial_text(None) == "-" and serial_text("") == "-"


def _self_signed(path: Path, serial: int) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"serial-{serial:x}")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


@pytest.mark.parametrize(
    "serial",
    [
        *(1, 0xA, 0x7F, 0x80, 0xFF, 0x100, TOP_BIT, ODD_DIGITS, 2**159 - 1),
        # One the CA would make, under a fixed id: workers must collect the same tests.
        pytest.param(pki_ca.random_serial(), id="random_serial"),
    ],
)
def test_serial_text_matches_openssl(tmp_path: Path, require_openssl: str, serial: int) -> None:
    cert = tmp_path / "c.pem"
    _self_signed(cert, serial)
    assert serial_text(serial) == openssl_serial(require_openssl, cert)
    assert serial_text(format(serial, "x")) == openssl_serial(require_openssl, cert)


def test_human_values_are_not_reprs() -> None:
    assert human_value(None) == "-"
    assert (human_value(True), human_value(False)) == ("yes", "no")
    assert human_value([]) == "none" and human_value({}) == "none"
    assert human_value(["61e5", "7a"]) == "61e5, 7a"
    assert human_value({"a": 1, "b": None, "c": {"d": [1, 2]}}) == "a=1 b=- c.d=1, 2"
    assert human_value({"replaces": "abc"}) == "replaces=0ABC"  # a serial, openssl's form
    lines = key_values(
        {
            "node_id": "n1",
            "serial": "abc",
            "revoked": [],
            "ok": False,
            "gossip": {"accepted": 3, "rejected": {}},
        }
    )
    assert lines.splitlines() == [
        "node_id  n1",
        "serial   0ABC",
        "revoked  none",
        "ok       no",
        "gossip",
        "  accepted  3",
        "  rejected  none",
    ]


def test_emit_falls_back_to_human_key_values(capsys: pytest.CaptureFixture[str]) -> None:
    data = {"serial": "abc12", "peers": ["a", "b"], "detail": {"k": "v"}, "gone": None}
    emit(data, as_json=False)
    human = capsys.readouterr().out
    assert_no_repr(human)
    assert "0ABC12" in human and "a, b" in human
    emit(data, as_json=True)
    assert json.loads(capsys.readouterr().out) == data  # JSON keeps its forms


def test_table_has_a_header_row_and_aligned_columns() -> None:
    text = table(("NAME", "COUNT", "TAGS"), [("a", 10, ["x", "y"]), ("long-name", 2, None)])
    assert text.splitlines() == [
        "NAME       COUNT  TAGS",
        "a          10     x, y",
        "long-name  2      -",
    ]
    right = table(("N", "SCORE"), [("a", "1.0"), ("b", "-59.9")], right={1})
    assert right.splitlines() == ["N  SCORE", "a    1.0", "b  -59.9"]


# --- the CA's listings, against openssl ----------------------------------------------


@dataclass
class Ca:
    directory: Path
    certs: dict[str, Path]  # node_id -> its certificate (PEM)
    old: int  # the serial node-3 rotated away from
    new: int  # and the one it rotated to


def _csr(node_id: str) -> x509.CertificateSigningRequest:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)])
    return x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Ca:
    """A CA with certificates whose serials print in every form (fixed serials for
    node-1 and node-2), a rotation (node-3), an admin certificate and an admin token."""
    root = tmp_path_factory.mktemp("human")
    directory = root / "ca"
    run("ca", "init", "--dir", directory)
    certs: dict[str, Path] = {}
    authority = CertificateAuthority(directory, PASS.encode())
    try:
        with pytest.MonkeyPatch.context() as patch:
            for node_id, serial in (("node-1", ODD_DIGITS), ("node-2", TOP_BIT)):
                patch.setattr(pki_ca, "random_serial", lambda serial=serial: serial)
                cert = authority.issue(_csr(node_id), node_id)
                certs[node_id] = root / f"{node_id}.crt"
                certs[node_id].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        desk = Registrar(authority, EnrollmentPolicy(), MeshSettings())
        csr = make_csr(PrivateKey.generate(KeyKind.P256), "node-3")
        enrolled = desk.enroll(authority.create_token("node-3"), csr)
        current = desk.authenticate([enrolled.certificate, authority.issuing_cert])
        rotated = desk.rotate(current, make_csr(PrivateKey.generate(KeyKind.P256), "node-3"))
        certs["node-3"] = root / "node-3.crt"
        certs["node-3"].write_bytes(rotated.certificate.public_bytes(serialization.Encoding.PEM))
        old, new = enrolled.record.serial, rotated.record.serial
    finally:
        authority.close()
    run("ca", "admin-cert", "--dir", directory, "--name", "alice", "--out", root / "admin")
    certs["admin:alice"] = root / "admin" / "admin.crt"
    run("ca", "admin-token", "create", "--dir", directory, "--label", "ops")
    return Ca(directory, certs, old, new)


LIST_COLUMNS = ("SERIAL", "NODE_ID", "ROLE", "STATE", "NOT_AFTER", "REPLACES", "REPLACED_BY")


def test_ca_list_is_a_table_with_openssl_serials(ca: Ca, require_openssl: str) -> None:
    human = run("ca", "list", "--dir", ca.directory).stdout
    assert_no_repr(human)
    rows = {row[0]: row for row in assert_header(human, *LIST_COLUMNS)}
    for node_id, cert in ca.certs.items():
        serial = openssl_serial(require_openssl, cert)
        assert serial in rows, f"{node_id}: openssl's {serial} is not in `ca list`"
        assert rows[serial][1] == node_id.removeprefix("admin:")
    assert rows[serial_text(ODD_DIGITS)][0] == "0ABCDEF123"  # the leading zero kept
    assert rows[serial_text(ca.new)][5] == serial_text(ca.old)
    assert rows[serial_text(ca.old)][6] == serial_text(ca.new)
    # JSON keeps lowercase hex, one object a line under --jsonl.
    lines = run("ca", "list", "--dir", ca.directory, "--jsonl").stdout.splitlines()
    listed = [json.loads(line) for line in lines]
    assert all(isinstance(row, dict) for row in listed) and len(listed) == len(rows)
    assert {row["serial"] for row in listed} >= {format(ODD_DIGITS, "x"), format(TOP_BIT, "x")}


def test_ca_audit_and_tokens_are_tables(ca: Ca, require_openssl: str) -> None:
    audit = run("ca", "audit", "--dir", ca.directory).stdout
    assert_no_repr(audit)
    rows = assert_header(audit, "AT", "EVENT", "NODE_ID", "SERIAL", "ACTOR", "DETAIL")
    serials = {row[3] for row in rows}
    for cert in ca.certs.values():
        assert openssl_serial(require_openssl, cert) in serials
    rotation = next(row for row in rows if row[1] == "rotate")
    assert f"replaces={serial_text(ca.old)}" in rotation
    entries = [
        json.loads(line)
        for line in run("ca", "audit", "--dir", ca.directory, "--jsonl").stdout.splitlines()
    ]
    assert len(entries) == len(rows) and all(isinstance(e, dict) for e in entries)

    tokens = run("ca", "admin-token", "list", "--dir", ca.directory).stdout
    assert_no_repr(tokens)
    (ops,) = assert_header(tokens, "ID", "LABEL", "STATE", "CREATED_AT", "EXPIRES_AT", "REVOKED_AT")
    assert (ops[1], ops[2], ops[5]) == ("ops", "valid", "-")
    (line,) = run("ca", "admin-token", "list", "--dir", ca.directory, "--jsonl").stdout.splitlines()
    assert json.loads(line)["label"] == "ops"


def test_single_results_show_openssl_serials(ca: Ca, require_openssl: str) -> None:
    cert = ca.certs["node-2"]
    serial = openssl_serial(require_openssl, cert)
    shown = run("keys", "show", "--cert", cert).stdout
    assert_no_repr(shown)
    assert dict(line.split(None, 1) for line in shown.splitlines())["serial"] == serial
    as_json = json.loads(run("keys", "show", "--cert", cert, "--json").stdout)  # one document
    assert as_json["serial"] == format(TOP_BIT, "x")

    admin = run(
        *("ca", "admin-cert", "--dir", ca.directory, "--name", "bob", "--out"),
        *(ca.directory.parent / "bob", "--no-encrypt"),
    ).stdout
    bob = openssl_serial(require_openssl, ca.directory.parent / "bob" / "admin.crt")
    assert dict(line.split(None, 1) for line in admin.splitlines())["serial"] == bob

    # Revoke by openssl's form; the answer names it in the same form, the JSON in its own.
    revoked = run("ca", "revoke", "--dir", ca.directory, "--serial", bob).stdout
    assert revoked == f"revoked {bob} (unspecified)\n"
    again = run("ca", "revoke", "--dir", ca.directory, "--serial", bob, "--json").stdout
    assert json.loads(again) == {
        "revoked": [],
        "reason": "unspecified",
        "already_revoked": [format(int(bob, 16), "x")],
    }
    said = run("ca", "revoke", "--dir", ca.directory, "--serial", bob).stdout
    assert f"was already revoked: {bob} on " in said


# --- the node's listings (its API answers faked) -------------------------------------


PEERS = {
    "node_id": "node-1",
    "peers": [
        {
            "node_id": "node-2",
            "status": "connected",
            "last_seen": "2026-01-05T12:10:00+00:00",
            "last_seen_ms": 1767615000000,
            "address": "127.0.0.1:7002",
            "direction": "outbound",
            "serial": format(ODD_DIGITS, "x"),
            "score": 0.0,
            "graylisted_until": None,
        },
        {
            "node_id": "node-3",
            "status": "disconnected",
            "last_seen": "2026-01-05T12:09:00+00:00",
            "last_seen_ms": 1767614940000,
            "address": None,
            "direction": None,
            "serial": None,
            "score": -1.5,
            "graylisted_until": None,
        },
    ],
}
ANOMALIES = {
    "node_id": "node-1",
    "anomalies": [
        {
            "message_id": "m1",
            "origin": "node-2",
            "hash": "9f86d081884c7d65",
            "kind": "port-scan",
            "risk": 0.8,
            "meta": {"ports": [22, 80]},
            "timestamp": 1767615000000,
            "received_at": 1767615001000,
        },
        {
            "message_id": "m2",
            "origin": "node-3",
            "hash": "aa" * 32,
            "kind": "brute-force",
            "risk": 0.5,
            "meta": {},
            "timestamp": 1767615002000,
            "received_at": 1767615003000,
        },
    ],
}
HEALTH = {
    "node_id": "node-1",
    "status": "ok",
    "links": 2,
    "serial": format(ODD_DIGITS, "x"),
    "crl_number": None,
    "gossip": {"accepted": 3, "rejected": {}},
    "limits": {"links": {"connections": 0}},
}
ANSWERS = {"/v1/mesh/peers": PEERS, "/v1/mesh/anomalies": ANOMALIES, "/v1/mesh/health": HEALTH}


@pytest.fixture
def invoke(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """``trustmesh node SUBCOMMAND --dir D ...`` in-process, the node's API faked."""
    monkeypatch.setattr(node_cli, "_get", lambda directory, path, **params: ANSWERS[path])

    def invoke(*args: str) -> str:
        result = CliRunner().invoke(
            cli_main.cli, ["node", *args[:1], "--dir", str(tmp_path), *args[1:]]
        )
        assert result.exit_code == 0, result.output
        return result.output

    return invoke


def test_node_peers(invoke: Any) -> None:
    human = invoke("peers")
    assert_no_repr(human)
    two, three = assert_header(
        human, "NODE_ID", "STATUS", "SCORE", "LAST_SEEN", "ADDRESS", "SERIAL"
    )
    assert two[5] == "0ABCDEF123" and three[4:] == ["-", "-"]
    assert json.loads(invoke("peers", "--json")) == PEERS  # exactly one document
    lines = invoke("peers", "--jsonl").splitlines()
    assert [json.loads(line) for line in lines] == PEERS["peers"]


def test_node_anomalies(invoke: Any) -> None:
    human = invoke("anomalies")
    assert_no_repr(human)
    first, second = assert_header(human, "HASH", "KIND", "RISK", "ORIGIN", "RECEIVED_AT")
    assert first[:4] == ["9f86d081884c7d65", "port-scan", "0.8", "node-2"]
    assert second[1:4] == ["brute-force", "0.5", "node-3"]
    assert json.loads(invoke("anomalies", "--json")) == ANOMALIES
    lines = invoke("anomalies", "--jsonl").splitlines()
    assert [json.loads(line) for line in lines] == ANOMALIES["anomalies"]


def test_node_health(invoke: Any) -> None:
    human = invoke("health")
    assert_no_repr(human)
    assert human.splitlines() == [
        "node_id     node-1",
        "status      ok",
        "links       2",
        "serial      0ABCDEF123",
        "crl_number  -",
        "gossip",
        "  accepted  3",
        "  rejected  none",
        "limits",
        "  links",
        "    connections  0",
    ]
    assert json.loads(invoke("health", "--json")) == HEALTH


def test_node_bundle_inbox(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    answer: dict[str, Any] = {
        "node_id": "node-2",
        "role": "inbox",
        "bundles": [
            {
                "bundle_id": "node-1:818000000000:42",
                "source": "node-1",
                "destination": "dtn://node-2/inbox",
                "payload": "aGVsbG8=",
                "created_at": "2026-01-05T12:00:00.000+00:00",
                "created_at_ms": 1767614400000,
                "expires_at": "2026-01-05T13:00:00.000+00:00",
                "expires_at_ms": 1767618000000,
                "role": "inbox",
                "copies": 1,
            }
        ],
        "more": False,
    }
    monkeypatch.setattr(bundle_cli, "_running", lambda directory: True)
    monkeypatch.setattr(bundle_cli, "_client", lambda *args: answer)

    def invoke(*extra: str) -> str:
        argv = ["node", "bundle", "inbox", "--dir", str(tmp_path), *extra]
        result = CliRunner().invoke(cli_main.cli, argv)
        assert result.exit_code == 0, result.output
        return result.output

    human = invoke()
    assert_no_repr(human)
    (row,) = assert_header(human, "BUNDLE_ID", "SOURCE", "DESTINATION", "EXPIRES_AT", "BYTES")
    assert row[:2] == ["node-1:818000000000:42", "node-1"] and row[-1] == "5"
    assert json.loads(invoke("--json")) == answer
    (line,) = invoke("--jsonl").splitlines()
    assert json.loads(line) == answer["bundles"][0]


# --- streams: --jsonl ----------------------------------------------------------------


STREAMS = [
    ("botd", "listen"),
    ("botd", "connect"),
    ("botd", "ping"),
    ("psec", "listen"),
    ("psec", "connect"),
    ("catalyst", "listen"),
    ("catalyst", "connect"),
    ("brc103", "serve"),
    ("ca", "serve"),
    ("node", "run"),
    ("ca", "list"),
    ("ca", "audit"),
    ("ca", "admin-token", "list"),
    ("node", "peers"),
    ("node", "anomalies"),
    ("node", "bundle", "inbox"),
]


@pytest.mark.parametrize("command", STREAMS, ids=" ".join)
def test_streams_and_listings_offer_jsonl(command: tuple[str, ...]) -> None:
    result = CliRunner().invoke(cli_main.cli, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "--jsonl" in result.output


def test_a_stream_prints_json_lines_under_jsonl(tmp_path: Path) -> None:
    """``botd listen --jsonl``: its events, one JSON object a line."""
    key = tmp_path / "b.key"
    run("keys", "generate", "--type", "secp256k1", "--out", key, "--no-encrypt")
    with subprocess.Popen(
        [TRUSTMESH, "botd", "listen", "--key", str(key), "--port", "0", "--jsonl"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(),
    ) as proc:
        assert proc.stdout is not None
        first = json.loads(proc.stdout.readline())
        proc.send_signal(signal.SIGTERM)
        rest, errors = proc.communicate(timeout=WAIT)
    assert first["event"] == "listening" and first["port"] > 0, errors
    assert proc.returncode == 0, errors
    assert all(isinstance(json.loads(line), dict) for line in rest.splitlines())
