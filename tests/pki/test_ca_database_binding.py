"""A CA database is bound to one CA (issue 23): a replica pointed at another CA's
database refuses to start, and of two `ca init` racing for one empty database, one
wins and the other leaves nothing behind."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest

from trustmesh.pki.ca import CertificateAuthority
from trustmesh.pki.errors import PkiError

PASS = b"database binding"


def test_a_replica_of_another_ca_refuses_the_database(tmp_path: Path, postgres_dsn: str) -> None:
    CertificateAuthority.init(tmp_path / "one", PASS, db=postgres_dsn).close()
    other = tmp_path / "two"
    CertificateAuthority.init(other, PASS).close()  # its own SQLite database
    with pytest.raises(PkiError, match="records of another CA"):
        CertificateAuthority(other, PASS, db=postgres_dsn)
    # And a SQLite database copied from another CA, the same.
    shutil.copy(other / "ca.db", tmp_path / "stray.db")
    third = tmp_path / "three"
    CertificateAuthority.init(third, PASS).close()
    shutil.copy(tmp_path / "stray.db", third / "ca.db")
    with pytest.raises(PkiError, match="records of another CA"):
        CertificateAuthority(third, PASS)


def test_two_inits_racing_for_one_empty_database(tmp_path: Path, postgres_dsn: str) -> None:
    outcomes: dict[str, str] = {}
    start = threading.Barrier(2)

    def init(name: str) -> None:
        start.wait(timeout=30)
        try:
            CertificateAuthority.init(tmp_path / name, PASS, db=postgres_dsn).close()
            outcomes[name] = "made"
        except PkiError as exc:
            outcomes[name] = str(exc)

    threads = [threading.Thread(target=init, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(outcomes.values())[0] == "made"
    (loser,) = [name for name, outcome in outcomes.items() if outcome != "made"]
    assert "already holds a CA's records" in outcomes[loser]
    assert not any((tmp_path / loser).glob("*.crt")) and not any((tmp_path / loser).glob("*.key"))
    winner = "b" if loser == "a" else "a"
    CertificateAuthority(tmp_path / winner, PASS, db=postgres_dsn).close()
