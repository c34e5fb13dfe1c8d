"""Backup and restore of ca.db and mesh.db with SQLite's online backup (`trustmesh ca
backup`, `trustmesh node backup`), as docs/operations.md tells an operator: a copy taken
while a thread keeps writing is the database as of one commit, and a directory restored
from it serves, lists and revokes as the original did."""

from __future__ import annotations

import json
import shutil
import sqlite3
import ssl
import stat
import threading
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import pytest
from catools import PASS, WAIT, serving, succeeds
from click.testing import CliRunner
from cryptography import x509

from trustmesh.api.ca_client import make_csr
from trustmesh.cli import main as cli_main
from trustmesh.crypto.keys import KeyKind, PrivateKey
from trustmesh.mesh.peers import PeerRecord
from trustmesh.mesh.store import Indicator, MeshStore
from trustmesh.pki.ca import CertificateAuthority, load_csr
from trustmesh.pki.store import SqliteStore, backup_database

DOCS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"
# The commands docs/operations.md gives (checked below to be there).
BACKUP_COMMANDS = (
    "trustmesh ca backup --dir /var/lib/trustmesh/ca --out",
    "trustmesh node backup --dir /var/lib/trustmesh/nodes/n1 --out",
    "trustmesh node backup --dir /var/lib/trustmesh/nodes/n1 --database bundles --out",
)
CA_FILES = ("ca.crt", "issuing.crt", "issuing.key", "chain.pem", "root.key")
BEFORE = 30  # writes committed before the backup starts
AFTER = 30  # and after it ends: the backup ran while the writer went on
LIMIT = 5000  # the writer stops here whatever happens


class Writer:
    """A thread that calls ``step(i)`` for i = 0, 1, ... until stopped (or ``LIMIT``);
    ``wait_for(n)`` returns once n steps have committed."""

    def __init__(self, step: Callable[[int], None]) -> None:
        self.done = 0
        self.error: BaseException | None = None
        self._step = step
        self._stop = threading.Event()
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="writer", daemon=True)

    def _run(self) -> None:
        try:
            for i in range(LIMIT):
                if self._stop.is_set():
                    break
                self._step(i)
                with self._changed:
                    self.done = i + 1
                    self._changed.notify_all()
        except BaseException as exc:  # reported by wait_for and stop
            self.error = exc
        with self._changed:
            self._stop.set()
            self._changed.notify_all()

    def wait_for(self, count: int) -> int:
        with self._changed:
            ok = self._changed.wait_for(
                lambda: self.done >= count or self._stop.is_set(), timeout=WAIT * 4
            )
            assert self.error is None, self.error
            assert ok and self.done >= count, f"only {self.done} writes"
            return self.done

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(WAIT)
        assert not self._thread.is_alive()
        assert self.error is None, self.error
        return self.done


@contextmanager
def writing(step: Callable[[int], None]) -> Iterator[Writer]:
    writer = Writer(step)
    writer._thread.start()
    try:
        yield writer
    finally:
        writer.stop()


def check_backup_file(path: Path) -> None:
    """One self-contained file, private, that SQLite finds whole."""
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not path.with_name(path.name + "-wal").exists()
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def restore_ca(source: Path, backup: Path, target: Path) -> Path:
    """The restore of docs/operations.md: the CA's files, then the backup as ca.db."""
    target.mkdir()
    for name in CA_FILES:
        if (source / name).exists():
            shutil.copy2(source / name, target / name)
    shutil.copyfile(backup, target / "ca.db")
    return target


def _crl_serials(crl: x509.CertificateRevocationList) -> set[int]:
    return {entry.serial_number for entry in crl}


def _list(directory: Path) -> list[dict[str, Any]]:
    out = succeeds("ca", "list", "--dir", directory, "--jsonl")
    return [json.loads(line) for line in out.splitlines()]


def _fetch(url: str, ca_cert: Path) -> bytes:
    context = ssl.create_default_context(cafile=str(ca_cert))
    with urllib.request.urlopen(url, context=context, timeout=WAIT) as answer:
        body: bytes = answer.read()
        return body


def test_the_docs_give_the_backup_commands_tested_here() -> None:
    text = DOCS.read_text()
    for command in BACKUP_COMMANDS:
        assert command in text, command
    assert "python -c" not in text  # the commands, no Python one-liner any more


def test_a_backup_never_replaces_a_file_and_needs_a_database(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "ca.db")
    try:
        taken = tmp_path / "taken.db"
        taken.write_text("an older backup")
        with pytest.raises(FileExistsError):
            store.backup_to(taken)
        assert taken.read_text() == "an older backup"
    finally:
        store.close()
    with pytest.raises(FileNotFoundError):
        backup_database(tmp_path / "nothing.db", tmp_path / "copy.db")
    assert not (tmp_path / "nothing.db").exists()  # not created by looking
    assert sorted(p.name for p in tmp_path.iterdir() if "tmp" in p.name) == []


def test_ca_db_backed_up_while_issuing_restores_a_working_ca(tmp_path: Path) -> None:
    original = tmp_path / "ca"
    authority = CertificateAuthority.init(original, PASS.encode())
    issued: list[int] = []  # serials in the order they were committed
    revoked: set[int] = set()

    def issue(i: int) -> None:
        # Every third certificate is revoked right after it is issued (two commits).
        node_id = f"node-{i}"
        csr = load_csr(make_csr(PrivateKey.generate(KeyKind.P256), node_id))
        cert = authority.issue(csr, node_id)
        issued.append(cert.serial_number)
        if i % 3 == 0:
            authority.revoke(serial=cert.serial_number, reason="keyCompromise")
            revoked.add(cert.serial_number)

    backups = tmp_path / "backups"
    backups.mkdir()
    live_copy = backups / "ca-live.db"
    try:
        with writing(issue) as writer:
            before = writer.wait_for(BEFORE)
            # From another process, as an operator (or cron) would: the documented
            # command, with no passphrase at all.
            said = succeeds(
                "ca", "backup", "--dir", original, "--out", live_copy, "--json", passphrase=None
            )
            writer.wait_for(before + AFTER)
        total = len(issued)
        check_backup_file(live_copy)
        assert json.loads(said) == {
            "database": str(original / "ca.db"),
            "out": str(live_copy),
            "bytes": live_copy.stat().st_size,
        }

        # The copy is the database as of one commit: the first n certificates, each
        # revoked if it was by then (only the last one's revocation may be missing).
        restored = restore_ca(original, live_copy, tmp_path / "restored-live")
        with CertificateAuthority(restored, PASS.encode()) as copy:
            serials = [c.serial for c in copy.store.all()]
            n = len(serials)
            assert before <= n < total
            assert set(serials) == set(issued[:n])
            copy_revoked = {c.serial for c in copy.store.revoked()}
            expected = {s for s in issued[:n] if s in revoked}
            assert copy_revoked <= expected
            assert expected - copy_revoked <= {issued[n - 1]}
            assert _crl_serials(copy.crl()) == copy_revoked

        # Once the writer has stopped, a backup is the whole database: the restored CA
        # lists the same certificates, and serves a CRL with the same revocations.
        quiet_copy = backups / "ca-quiet.db"
        assert isinstance(authority.store, SqliteStore)
        authority.store.backup_to(quiet_copy)
        check_backup_file(quiet_copy)
        restored = restore_ca(original, quiet_copy, tmp_path / "restored")
        assert _list(restored) == _list(original)
        with serving(restored) as server:
            served = x509.load_der_x509_crl(_fetch(f"{server.url}/v1/crl", restored / "ca.crt"))
            assert _crl_serials(served) == revoked
            assert _crl_serials(authority.crl()) == revoked
            assert server.terminate() == 0, server.errors()
    finally:
        authority.close()


def _indicator(batch: int, n: int) -> Indicator:
    return Indicator(
        message_id=f"{batch:06d}-{n}",
        origin="node-2",
        hash=f"{batch:016x}",
        kind="port-scan",
        risk=0.5,
        meta={"batch": batch},
        timestamp=1_000 + batch,
        received_at=1_000 + batch,
    )


def _peer(batch: int) -> PeerRecord:
    return PeerRecord(
        node_id=f"node-{batch % 7}",
        addresses=(f"127.0.0.1:{7000 + batch % 7}",),
        seq=batch + 1,
        expires=10**13,
        signature=b"s" * 64,
        chain=(b"c",),
    )


PER_BATCH = 5
NOW_MS = 2_000


def node_backup(node: Path, out: Path) -> None:
    """``trustmesh node backup --dir NODE --out OUT``, in this process (the writer's)."""
    result = CliRunner().invoke(
        cli_main.cli, ["node", "backup", "--dir", str(node), "--out", str(out)]
    )
    assert result.exit_code == 0, (result.output, result.exception)
    assert result.output.startswith(f"backed up {node / 'mesh.db'} to {out} ")


def test_mesh_db_backed_up_while_the_node_writes(tmp_path: Path) -> None:
    node = tmp_path / "n1"
    node.mkdir()
    (node / "node.toml").write_text('node_id = "node-1"\n')  # a node directory
    store = MeshStore(node / "mesh.db")

    def batch(i: int) -> None:
        # A node's batch: seen ids and indicators in one commit, then a CRL and a peer.
        store.save(
            [(f"{i:06d}-{n}", 10**13) for n in range(PER_BATCH)],
            [_indicator(i, n) for n in range(PER_BATCH)],
            capacity=10**6,
            now_ms=NOW_MS,
        )
        store.save_crl(i + 1, f"crl {i + 1}".encode())
        store.save_peer_records([_peer(i)], capacity=1024, now_ms=NOW_MS)

    copy = tmp_path / "mesh-live.db"
    try:
        with writing(batch) as writer:
            before = writer.wait_for(BEFORE)
            node_backup(node, copy)  # from the node's own process, another connection
            writer.wait_for(before + AFTER)
        total = writer.done
        check_backup_file(copy)

        target = tmp_path / "restored"
        target.mkdir()
        shutil.copyfile(copy, target / "mesh.db")
        restored = MeshStore(target / "mesh.db")
        try:
            found = restored.indicators(limit=10**6)
            assert len(found) % PER_BATCH == 0
            k = len(found) // PER_BATCH  # whole batches, and the first k of them
            assert before <= k < total
            assert [i.message_id for i in found] == [
                f"{b:06d}-{n}" for b in range(k) for n in range(PER_BATCH)
            ]
            assert found == sorted(found, key=lambda i: (i.received_at, i.message_id))
            assert {m for m, _ in restored.seen()} == {i.message_id for i in found}
            crl = restored.crl()
            assert crl in (f"crl {k}".encode(), f"crl {k - 1}".encode())  # its own commit
        finally:
            restored.close()

        # Quiet: the copy holds exactly what the node holds.
        whole = tmp_path / "mesh-quiet.db"
        node_backup(node, whole)
        again = MeshStore(whole)
        try:
            assert again.indicators(limit=10**6) == store.indicators(limit=10**6)
            assert again.seen() == store.seen()
            assert again.crl() == store.crl() == f"crl {total}".encode()
            assert again.peer_records() == store.peer_records()
            assert len(again.peer_records()) == 7
        finally:
            again.close()
    finally:
        store.close()
