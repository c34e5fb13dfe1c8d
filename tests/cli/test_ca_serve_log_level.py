"""``ca serve`` sets up its own JSON logging; --debug (before or after the subcommand)
must survive that, and --log-level (or ca.toml's log_level) picks the level otherwise."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from catools import PASS
from click.testing import CliRunner

from trustmesh.cli import ca as ca_cli
from trustmesh.cli import main as cli_main
from trustmesh.pki.ca import CertificateAuthority


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("loglevel") / "ca"
    CertificateAuthority.init(directory, PASS.encode()).close()
    return directory


@pytest.fixture
def levels(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The level of the ``trustmesh`` loggers each ``ca serve`` ran with (the server
    itself is not started); the logging set up by the command is undone afterwards."""
    seen: list[int] = []

    async def fake_serve(server: Any, as_json: bool) -> None:
        seen.append(logging.getLogger("trustmesh").getEffectiveLevel())

    monkeypatch.setattr(ca_cli, "_serve", fake_serve)
    root, package = logging.getLogger(), logging.getLogger("trustmesh")
    saved = (root.handlers[:], root.level, package.level)
    try:
        yield seen
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
        package.setLevel(saved[2])


def _serve(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> None:
    monkeypatch.setattr(cli_main._State, "debug", False)  # as main() sets it at each run
    result = CliRunner().invoke(cli_main.cli, argv, env={"TRUSTMESH_PASSPHRASE": PASS})
    assert result.exit_code == 0, (result.output, result.exception)


def test_debug_before_or_after_the_subcommand_keeps_debug_logs(
    ca_dir: Path, levels: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    serve = ["ca", "serve", "--dir", str(ca_dir), "--port", "0"]
    _serve(monkeypatch, ["--debug", *serve])
    _serve(monkeypatch, [*serve, "--debug"])
    _serve(monkeypatch, [*serve, "--log-level", "warning", "--debug"])  # --debug wins
    assert levels == [logging.DEBUG] * 3


def test_log_level_is_info_unless_asked(
    ca_dir: Path, levels: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    serve = ["ca", "serve", "--dir", str(ca_dir), "--port", "0"]
    _serve(monkeypatch, serve)
    _serve(monkeypatch, [*serve, "--log-level", "warning"])
    _serve(monkeypatch, [*serve, "--log-level", "debug"])
    assert levels == [logging.INFO, logging.WARNING, logging.DEBUG]


def test_node_run_keeps_debug_logs_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # `node run` sets up the same JSON logging from its --log-level (info by default).
    from trustmesh.node import logs

    seen: list[int] = []

    def record(level: int = logging.INFO) -> None:
        seen.append(level)
        raise SystemExit(0)  # the level is all this test needs: the node does not start

    monkeypatch.setattr(logs, "use_json_logs", record)
    for argv in (["--debug", "node", "run"], ["node", "run", "--debug"], ["node", "run"]):
        monkeypatch.setattr(cli_main._State, "debug", False)  # as main() sets it at each run
        result = CliRunner().invoke(cli_main.cli, [*argv, "--dir", str(tmp_path)])
        assert result.exit_code == 0, (result.output, result.exception)
    assert seen == [logging.DEBUG, logging.DEBUG, logging.INFO]
