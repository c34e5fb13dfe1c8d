"""`trustmesh enroll --out D` then `node init --dir D` (no token): the enrolled directory
is adopted, and `node run` starts; before that, `node run` says how to adopt it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from catools import NODE_PASS, SharedCa, shared_ca, succeeds, trustmesh
from nodetools import running


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedCa]:
    with shared_ca(tmp_path_factory, "adopt-ca") as running_ca:
        yield running_ca


def test_node_init_adopts_a_directory_enroll_wrote(shared: SharedCa, tmp_path: Path) -> None:
    out = tmp_path / "n1"
    token = shared.authority.create_token("node-a1")
    succeeds(
        *("enroll", "--ca-url", shared.url, "--ca-cert", shared.ca_cert, "--token", token),
        *("--node-id", "node-a1", "--out", out, "--json"),
        passphrase=NODE_PASS,
    )
    before = trustmesh("node", "run", "--dir", out, passphrase=NODE_PASS)
    assert before.returncode == 1
    assert "adopts this enrolled directory" in before.stderr

    wrong = trustmesh(
        *("node", "init", "--dir", out, "--node-id", "node-zz"),
        *("--listen", "127.0.0.1:0", "--api", "127.0.0.1:0"),
        passphrase=NODE_PASS,
    )
    assert wrong.returncode == 2 and "enrolled as 'node-a1'" in wrong.stderr

    adopted = json.loads(
        succeeds(
            *("node", "init", "--dir", out, "--node-id", "node-a1", "--json"),
            *("--listen", "127.0.0.1:0", "--api", "127.0.0.1:0"),
            passphrase=NODE_PASS,
        )
    )
    assert adopted["adopted"] is True and adopted["node_id"] == "node-a1"
    assert (out / "node.toml").exists()
    again = trustmesh(
        *("node", "init", "--dir", out, "--node-id", "node-a1"),
        *("--listen", "127.0.0.1:0", "--api", "127.0.0.1:0"),
        passphrase=NODE_PASS,
    )
    assert again.returncode == 2 and "set up already" in again.stderr
    with running((out, NODE_PASS)) as (node,):
        assert node.started()["node_id"] == "node-a1"
        assert node.terminate() == 0


def test_node_init_without_a_token_on_a_fresh_directory_is_a_usage_error(
    tmp_path: Path,
) -> None:
    result = trustmesh(
        *("node", "init", "--dir", tmp_path / "fresh", "--node-id", "node-b1"),
        *("--listen", "127.0.0.1:0", "--api", "127.0.0.1:0"),
        passphrase=NODE_PASS,
    )
    assert result.returncode == 2 and "--token" in result.stderr
