"""The throwaway PostgreSQL server the CA store's tests run against
(tests/cli/pgcluster.py): it starts, takes connections on its socket only, gives each
test an empty database of its own, and is gone, process and files, once stopped."""

from __future__ import annotations

import os
from collections.abc import Iterator

import psycopg
import pytest
from pgcluster import PostgresCluster


@pytest.fixture(scope="module")
def cluster() -> Iterator[PostgresCluster]:
    with PostgresCluster.start() as running:
        yield running


def test_the_server_answers_on_its_socket_only(cluster: PostgresCluster) -> None:
    with psycopg.connect(cluster.dsn()) as connection:
        version = connection.execute("SHOW server_version_num").fetchone()
        listen = connection.execute("SHOW listen_addresses").fetchone()
    assert version is not None and int(version[0]) >= 150000
    assert listen == ("",)  # no TCP port at all
    assert any(path.name.startswith(".s.PGSQL.") for path in cluster.socket_dir.iterdir())


def test_each_database_starts_empty_and_apart(cluster: PostgresCluster) -> None:
    first, second = cluster.create_database("apart_a"), cluster.create_database("apart_b")
    with psycopg.connect(first) as connection:
        connection.execute("CREATE TABLE kept (n int)")
        connection.execute("INSERT INTO kept VALUES (1)")
    with psycopg.connect(second) as connection:
        tables = connection.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchone()
    assert tables == (0,)
    with pytest.raises(ValueError, match="plain database name"):
        cluster.create_database('x"; DROP DATABASE postgres; --')


def test_stopping_ends_the_server_and_removes_its_files() -> None:
    cluster = PostgresCluster.start()
    os.kill(cluster.pid, 0)  # running
    cluster.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(cluster.pid, 0)
    assert not cluster.directory.exists()
