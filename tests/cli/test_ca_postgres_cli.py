"""CA replicas on PostgreSQL from the command line (issue 23): ``ca init --db``, two
``ca serve --db`` replicas, each with its own copy of the CA directory, over one
database; ``$TRUSTMESH_CA_DB`` instead of the flag; and the refusals."""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import psycopg
from catools import JSON, PASS, curl, serving, succeeds, trustmesh
from clitools import TRUSTMESH, clean_env
from cryptography import x509

from trustmesh.api.ca_client import make_csr
from trustmesh.crypto.keys import KeyKind, PrivateKey
from trustmesh.pki.ca import CertificateAuthority, token_hash
from trustmesh.pki.enroll import EnrollmentPolicy, MeshSettings, Registrar
from trustmesh.pki.pgstore import PostgresStore, compare_stores
from trustmesh.pki.store import SqliteStore, admin_token_id


def node_csr(node_id: str) -> str:
    return make_csr(PrivateKey.generate(KeyKind.P256), node_id)


def enroll_body(token: str, node_id: str) -> str:
    return json.dumps({"token": token, "csr": node_csr(node_id)})


def test_two_replicas_share_one_database(tmp_path: Path, postgres_dsn: str) -> None:
    first, second = tmp_path / "replica-1", tmp_path / "replica-2"
    made = json.loads(succeeds("ca", "init", "--dir", first, "--db", postgres_dsn, "--json"))
    assert made["ca_cert"] == str(first / "ca.crt")
    assert not (first / "ca.db").exists()  # the records are in the database
    shutil.copytree(first, second)  # a replica: the same keys, encrypted, on another host
    made_token = succeeds(
        "ca", "token", "create", "--dir", first, "--db", postgres_dsn, "--node-id", "n-1", "--json"
    )
    token = json.loads(made_token)["token"]
    with serving(first, "--db", postgres_dsn) as one, serving(second, "--db", postgres_dsn) as two:
        ca = first / "ca.crt"
        for server in (one, two):
            health = curl(f"{server.url}/v1/health", "--cacert", ca)
            assert health.status == 200 and health.json()["store"] == "postgresql"
        body = enroll_body(token, "n-1")
        enrolled = curl(f"{one.url}/v1/enroll", "--cacert", ca, "-H", JSON, "-d", body)
        assert enrolled.status == 200, enrolled
        serial = enrolled.json()["serial"]
        again = enroll_body(token, "n-1")  # the same token at the other replica: spent
        refused = curl(f"{two.url}/v1/enroll", "--cacert", ca, "-H", JSON, "-d", again)
        assert refused.error(400, "invalid_token") == "the enrollment token was already used"
        listed = json.loads(succeeds("ca", "list", "--dir", second, "--db", postgres_dsn, "--json"))
        assert [c["serial"] for c in listed["certificates"] if c["node_id"] == "n-1"] == [serial]
        succeeds("ca", "revoke", "--dir", second, "--db", postgres_dsn, "--serial", serial)
        crl = curl(f"{one.url}/v1/crl", "--cacert", ca)  # the other replica's CRL
        assert crl.status == 200
        revoked = x509.load_der_x509_crl(crl.body)
        assert revoked.get_revoked_certificate_by_serial_number(int(serial, 16)) is not None
        assert one.terminate() == 0, one.errors()
        assert two.terminate() == 0, two.errors()


def test_the_database_can_come_from_the_environment(tmp_path: Path, postgres_dsn: str) -> None:
    directory = tmp_path / "ca"
    env = clean_env(TRUSTMESH_PASSPHRASE=PASS, TRUSTMESH_CA_DB=postgres_dsn)
    for args in (["init"], ["token", "create", "--node-id", "n-2"], ["list", "--json"]):
        done = subprocess.run(
            [TRUSTMESH, "ca", *args, "--dir", str(directory)],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
    assert not (directory / "ca.db").exists()
    audit = succeeds("ca", "audit", "--dir", directory, "--db", postgres_dsn, "--json")
    assert any(entry["event"] == "token" for entry in json.loads(audit)["entries"])


def test_refusals(tmp_path: Path, postgres_dsn: str) -> None:
    succeeds("ca", "init", "--dir", tmp_path / "one", "--db", postgres_dsn)
    succeeds(
        "ca", "token", "create", "--dir", tmp_path / "one", "--db", postgres_dsn, "--node-id", "x"
    )
    backup = trustmesh("ca", "backup", "--dir", tmp_path / "one", "--out", tmp_path / "b.db")
    assert backup.returncode == 1 and "pg_dump" in backup.stderr
    assert not (tmp_path / "b.db").exists()
    mixed = trustmesh("ca", "init", "--dir", tmp_path / "two", "--db", postgres_dsn)
    assert mixed.returncode == 1 and "already holds a CA's records" in mixed.stderr
    assert not (tmp_path / "two" / "ca.crt").exists()
    other = trustmesh("ca", "init", "--dir", tmp_path / "three", "--db", "mysql://db/ca")
    assert other.returncode == 1 and "takes a PostgreSQL URI" in other.stderr
    gone = postgres_dsn.replace("host=", "host=/nonexistent")
    unreachable = trustmesh("ca", "list", "--dir", tmp_path / "one", "--db", gone)
    assert unreachable.returncode == 1 and "cannot open the CA database" in unreachable.stderr


def test_ca_migrate_moves_every_record_to_postgresql(tmp_path: Path, postgres_dsn: str) -> None:
    directory = tmp_path / "ca"
    now = datetime.now(UTC)
    with CertificateAuthority.init(directory, PASS.encode()) as ca:
        desk = Registrar(ca, EnrollmentPolicy(), MeshSettings())
        issued = [
            desk.enroll(
                ca.create_token(node_id), make_csr(PrivateKey.generate(KeyKind.P256), node_id)
            )
            for node_id in ("n-1", "n-2", "n-3")
        ]
        current = desk.authenticate([issued[0].certificate, ca.issuing_cert])
        desk.rotate(current, make_csr(PrivateKey.generate(KeyKind.P256), "n-1"))
        ca.revoke(node_id="n-2", reason="keyCompromise")
        ca.create_token("n-4")  # not spent
        admin = ca.create_admin_token("ops")
        ca.revoke_admin_token(admin_token_id(token_hash(admin)))
    source = directory / "ca.db"
    before = succeeds("ca", "list", "--dir", directory, "--json")

    moved = json.loads(succeeds("ca", "migrate", "--from", source, "--to", postgres_dsn, "--json"))
    assert moved["crl"] == "identical"
    assert moved["copied"]["certificates"] == 4 and moved["copied"]["tokens"] == 4
    assert succeeds("ca", "list", "--dir", directory, "--db", postgres_dsn, "--json") == before
    sqlite, postgres = SqliteStore(source), PostgresStore(postgres_dsn)
    try:
        assert compare_stores(sqlite, postgres) == []
        # What the CA's own reads do not show is compared too: a hash, a counter.
        with psycopg.connect(postgres_dsn, autocommit=True) as tamper:
            tamper.execute("UPDATE admin_tokens SET hash = substr(hash, 1, 16) || 'x'")
            tamper.execute("UPDATE meta SET value = value + 1 WHERE key = 'crl_number'")
        assert compare_stores(sqlite, postgres) == ["admin_tokens rows differ", "meta rows differ"]
        with psycopg.connect(postgres_dsn, autocommit=True) as mend:
            mend.execute("UPDATE meta SET value = value - 1 WHERE key = 'crl_number'")
        assert [c.serial for c in postgres.by_node("n-1")] == [
            c.serial for c in sqlite.by_node("n-1")
        ]
        # The CA goes on in PostgreSQL: new audit entries follow the copied ones.
        last = postgres.audit(limit=1)[0]
        postgres.audit_event("after-migration", detail={}, now=now)
        assert postgres.audit(limit=2)[1] == last
    finally:
        sqlite.close()
        postgres.close()

    moved_away = trustmesh("ca", "revoke", "--dir", directory, "--node-id", "n-3")
    assert moved_away.returncode == 1 and "are in PostgreSQL" in moved_away.stderr
    again = trustmesh("ca", "migrate", "--from", source, "--to", postgres_dsn)
    assert again.returncode == 1 and "already holds records" in again.stderr
    wrong = trustmesh("ca", "migrate", "--from", source, "--to", "sqlite:///x.db")
    assert wrong.returncode == 2 and "PostgreSQL URI" in wrong.stderr


def test_a_ca_on_postgresql_refuses_commands_without_its_database(
    tmp_path: Path, postgres_dsn: str
) -> None:
    """Without --db, a command would open (or create) D/ca.db, whose records are stale
    or empty: a revocation there would reach no replica."""
    directory = tmp_path / "ca"
    succeeds("ca", "init", "--dir", directory, "--db", postgres_dsn)
    for args in (["list"], ["token", "create", "--node-id", "n-1"], ["crl"]):
        refused = trustmesh("ca", *args, "--dir", directory)
        assert refused.returncode == 1, refused
        assert "are in PostgreSQL: give --db URI or $TRUSTMESH_CA_DB" in refused.stderr
    assert not (directory / "ca.db").exists()


def test_the_ca_commands_need_no_postgresql_client_for_sqlite(tmp_path: Path) -> None:
    """psycopg is an extra: without it, every command of a SQLite CA works, and --db
    says what to install."""
    blocker = tmp_path / "blocker" / "psycopg"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text('raise ImportError("psycopg is not installed")\n')
    env = clean_env(TRUSTMESH_PASSPHRASE=PASS, PYTHONPATH=str(blocker.parent))

    def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [TRUSTMESH, *map(str, args)],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )

    directory = tmp_path / "ca"
    for args in (("ca", "init", "--dir", directory), ("ca", "list", "--dir", directory)):
        done = run(*args)
        assert done.returncode == 0, done.stderr
    wanted = run("ca", "list", "--dir", directory, "--db", "postgresql:///x")
    assert wanted.returncode == 1
    assert "needs psycopg: pip install 'trustmesh[postgres]'" in wanted.stderr


def test_replicas_share_an_issuing_key_on_a_token(
    tmp_path: Path, postgres_dsn: str, token: str
) -> None:
    """`ca init --issuing-key pkcs11:...`: D holds only the key's URI, and two replicas
    (copies of D) sign with the one key on the token (SoftHSM2 here, an HSM in use)."""
    path, _, query = token.partition("?")
    uri = f"{path};object=cli-ca-issuing-{secrets.token_hex(4)}?{query}"
    first, second = tmp_path / "replica-1", tmp_path / "replica-2"
    made = json.loads(
        succeeds("ca", "init", "--dir", first, "--db", postgres_dsn, "--issuing-key", uri, "--json")
    )
    assert made["issuing_key"] == uri and not (first / "issuing.key").exists()
    shutil.copytree(first, second)
    tokens = [
        json.loads(
            succeeds(
                "ca",
                "token",
                "create",
                "--dir",
                first,
                "--db",
                postgres_dsn,
                "--node-id",
                f"n-{n}",
                "--json",
            )
        )["token"]
        for n in (1, 2)
    ]
    with serving(first, "--db", postgres_dsn) as one, serving(second, "--db", postgres_dsn) as two:
        ca = first / "ca.crt"
        for n, server in ((1, one), (2, two)):
            body = enroll_body(tokens[n - 1], f"n-{n}")
            enrolled = curl(f"{server.url}/v1/enroll", "--cacert", ca, "-H", JSON, "-d", body)
            assert enrolled.status == 200, enrolled
            cert = x509.load_pem_x509_certificate(enrolled.json()["certificate"].encode())
            issuing = x509.load_pem_x509_certificate((first / "issuing.crt").read_bytes())
            cert.verify_directly_issued_by(issuing)
        assert one.terminate() == 0, one.errors()
        assert two.terminate() == 0, two.errors()
