"""node.toml's listen and api: two listeners, so never one socket address."""

from __future__ import annotations

from pathlib import Path

import pytest

from trustmesh.node.config import ConfigError, NodeConfig, load_config


def config(listen: str, api: str) -> NodeConfig:
    return NodeConfig(node_id="node-1", ca_url="https://127.0.0.1:8443", listen=listen, api=api)


@pytest.mark.parametrize(
    ("listen", "api"),
    [
        ("127.0.0.1:7400", "127.0.0.1:7400"),
        ("LOCALHOST:7400", "localhost:7400"),
        ("0.0.0.0:7400", "127.0.0.1:7400"),  # the wildcard takes every address
        ("127.0.0.1:7400", "[::]:7400"),
        ("[::1]:7400", "[::1]:7400"),
    ],
)
def test_listen_and_api_on_one_socket_address_are_refused(listen: str, api: str) -> None:
    with pytest.raises(ConfigError) as refused:
        config(listen, api)
    assert str(refused.value) == (
        f"listen ({listen}) and api ({api}) need different ports: the links and the API are"
        " two listeners"
    )


@pytest.mark.parametrize(
    ("listen", "api"),
    [
        ("127.0.0.1:0", "127.0.0.1:0"),  # port 0: each gets a free port of its own
        ("127.0.0.1:7400", "127.0.0.1:7401"),
        ("127.0.0.1:7400", "127.0.0.2:7400"),
    ],
)
def test_distinct_addresses_are_accepted(listen: str, api: str) -> None:
    assert config(listen, api).api == api


def test_a_node_toml_edited_to_one_address_is_refused(tmp_path: Path) -> None:
    (tmp_path / "node.toml").write_text(
        'node_id = "node-1"\nca_url = "https://127.0.0.1:8443"\n'
        'listen = "127.0.0.1:7400"\napi = "127.0.0.1:7400"\n'
    )
    with pytest.raises(ConfigError, match="need different ports"):
        load_config(tmp_path)
