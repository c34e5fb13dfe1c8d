"""node.toml's [limits] table and link liveness settings: read, checked, written back."""

from __future__ import annotations

from pathlib import Path

import pytest

from trustmesh.io.limits import ResourcePolicy
from trustmesh.node.config import ConfigError, NodeConfig, load_config, write_config

BASE = """
node_id = "node-1"
ca_url = "https://127.0.0.1:8443"
listen = "127.0.0.1:7400"
api = "127.0.0.1:7401"
"""


def config_from(tmp_path: Path, extra: str) -> NodeConfig:
    (tmp_path / "node.toml").write_text(BASE + extra)
    return load_config(tmp_path)


def test_limits_and_liveness_come_from_node_toml(tmp_path: Path) -> None:
    config = config_from(
        tmp_path,
        "min_hold_time = 12\nallow_zero_hold = true\nhello_timeout = 4.0\n"
        "[limits]\nmax_connections = 200\nmax_per_source = 8\nheader_timeout = 6\n",
    )
    assert config.policy == ResourcePolicy(max_connections=200, max_per_source=8, header_timeout=6)
    assert (config.min_hold_time, config.allow_zero_hold, config.hello_timeout) == (12, True, 4.0)
    write_config(tmp_path, config)
    assert load_config(tmp_path) == config


def test_defaults_without_a_limits_table(tmp_path: Path) -> None:
    config = config_from(tmp_path, "")
    assert config.policy == ResourcePolicy()
    assert "[limits]" not in config.to_toml()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("[limits]\nmax_conections = 5\n", "unknown limit"),
        ("[limits]\nmax_connections = 'many'\n", "must be a number"),
        ("[limits]\nheader_timeout = 1\n", "at least 5"),
        ("[limits]\nidle_timeout = 0\n", "positive"),
        ("min_hold_time = 1\n", "min_hold_time"),
        ("hello_timeout = 0\n", "hello_timeout"),
    ],
)
def test_bad_values_are_refused_by_name(tmp_path: Path, extra: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from(tmp_path, extra)
