"""Fixtures shared across the test tree."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pgcluster import PostgresCluster

from trustmesh.pki.ca import CertificateAuthority
from trustmesh.tpm import swtpm

# Fixtures of the CA API tests (tests/api/ca_support.py; tests/api is on pythonpath).
pytest_plugins = ["ca_support"]


@pytest.fixture
def require_openssl() -> str:
    """The openssl command line. Interop tests fail, never skip, without it: the README's
    test command (scripts/dev test) installs it, so its absence is a broken setup."""
    path = shutil.which("openssl")
    if path is None:
        pytest.fail("the openssl command line is missing; scripts/dev test installs it")
    return path


SOFTHSM_PIN = "4321"
SOFTHSM_TOKEN = "trustmesh-test"


@pytest.fixture(scope="session")
def token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One SoftHSM2 token for the session (the library reads its config once a process),
    as a URI base: ``pkcs11:token=...?pin-source=file:...`` (add ``;object=`` to the path)."""
    tool = shutil.which("softhsm2-util")
    if tool is None:
        pytest.fail("softhsm2 is not installed; scripts/dev test installs it")
    home = tmp_path_factory.mktemp("softhsm")
    (home / "tokens").mkdir()
    conf = home / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {home / 'tokens'}\nobjectstore.backend = file\n")
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    subprocess.run(
        [
            tool,
            "--init-token",
            "--free",
            "--label",
            SOFTHSM_TOKEN,
            "--pin",
            SOFTHSM_PIN,
            "--so-pin",
            "8765",
        ],
        env=env,
        check=True,
        capture_output=True,
        timeout=30,
    )
    pin_file = home / "pin"
    pin_file.write_text(SOFTHSM_PIN + "\n")
    saved = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    yield f"pkcs11:token={SOFTHSM_TOKEN}?pin-source=file:{pin_file}"
    if saved is None:
        os.environ.pop("SOFTHSM2_CONF", None)
    else:
        os.environ["SOFTHSM2_CONF"] = saved


def _require_swtpm() -> None:
    if not swtpm.available():
        pytest.fail("swtpm is not installed; scripts/dev test installs it")


@pytest.fixture(scope="session")
def shared_swtpm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[swtpm.Swtpm]:
    """One manufactured swtpm for tests that do not change its PCRs or fill its NV."""
    _require_swtpm()
    with swtpm.Swtpm.start(tmp_path_factory.mktemp("swtpm")) as tpm:
        yield tpm


@pytest.fixture
def make_swtpm(tmp_path: Path) -> Iterator[Callable[[], swtpm.Swtpm]]:
    """Fresh swtpms of this test's own (each manufactured, with its own EK and local
    CA), all stopped by PID when the test ends."""
    _require_swtpm()
    started: list[swtpm.Swtpm] = []

    def make() -> swtpm.Swtpm:
        tpm = swtpm.Swtpm.start(tmp_path / f"swtpm-{len(started)}")
        started.append(tpm)
        return tpm

    yield make
    for tpm in started:
        tpm.stop()


# --- PostgreSQL: the CA store's tests (tests/pki) -----------------------------------------


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """One throwaway PostgreSQL server per test process (tests/cli/pgcluster.py)."""
    with PostgresCluster.start() as cluster:
        yield cluster


@pytest.fixture
def postgres_dsn(postgres: PostgresCluster) -> str:
    """An empty database of its own for each test."""
    return postgres.create_database(f"test_{secrets.token_hex(6)}")


CONTRACT_NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgresql"])
def ca_on_each_store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[CertificateAuthority]:
    """A new CA, made at CONTRACT_NOW, on each of the CA's stores in turn (SQLite, its
    own; PostgreSQL, an empty database of its own): a test with it is a contract both
    stores keep."""
    db = request.getfixturevalue("postgres_dsn") if request.param == "postgresql" else None
    authority = CertificateAuthority.init(
        tmp_path / "ca", b"contract tests", now=CONTRACT_NOW, db=db
    )
    yield authority
    authority.close()
