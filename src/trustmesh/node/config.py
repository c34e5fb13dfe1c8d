"""A node's config file, ``node.toml``, next to its key and certificate.

node_id = "node-1"
ca_url = "https://127.0.0.1:8443"
listen = "127.0.0.1:7400"        # mesh links (TLS 1.3, ALPN dadm-mesh/1)
api = "127.0.0.1:7401"           # the node's HTTPS API (mTLS)
bootstrap = ["127.0.0.1:7500"]   # peers to dial first, redialled with backoff
crl_interval = 60                # seconds between CRL fetches from the CA
gossip_fanout = 3
max_links = 12                   # links held at most (the high mark)
dial_target = 4                  # links dialled for (the low mark; at most max_links / 3)
hold_time = 30
min_hold_time = 9                # a peer's HELLO offering less (or 0) is refused
allow_zero_hold = false
hello_timeout = 10.0             # seconds from TLS up to the peer's HELLO
key_encrypted = true             # node.key needs TRUSTMESH_PASSPHRASE
mdns = false                     # advertise and discover nodes on the LAN (discovery.md)
link_attestation = "off"         # or demote, close, revoke: peers' TPM quotes (attestation.md)
metrics = "127.0.0.1:9464"       # Prometheus /metrics on plain HTTP (docs/metrics.md); unset: none

[limits]                         # the resource policy of both listeners (docs/limits.md)
max_connections = 1024
handshake_timeout = 10.0
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import tomli_w

from trustmesh.io.limits import ResourcePolicy, policy_from
from trustmesh.mesh.attest import LinkAttestationPolicy
from trustmesh.mesh.engine import DEFAULT_FANOUT
from trustmesh.mesh.errors import MeshError
from trustmesh.mesh.link import (
    DEFAULT_HELLO_TIMEOUT,
    DEFAULT_HOLD_TIME,
    DEFAULT_MIN_HOLD_TIME,
    MAX_HOLD_TIME,
    split_address,
)
from trustmesh.mesh.node import NodeSettings
from trustmesh.node.discovery import MAX_NODE_ID

CONFIG_FILE = "node.toml"
LINK_ATTESTATION_POLICIES = tuple(p.value for p in LinkAttestationPolicy)
DEFAULT_CRL_INTERVAL = 60.0
DEFAULT_MAX_LINKS = 12
DEFAULT_DIGEST_INTERVAL = 1.0


class ConfigError(MeshError):
    """The node's config file is missing, unreadable, or holds a bad value."""


@dataclass(frozen=True)
class NodeConfig:
    node_id: str
    ca_url: str
    listen: str
    api: str
    bootstrap: tuple[str, ...] = ()
    crl_interval: float = DEFAULT_CRL_INTERVAL
    gossip_fanout: int = DEFAULT_FANOUT
    max_links: int = DEFAULT_MAX_LINKS
    dial_target: int | None = None  # default max(1, max_links // 3)
    hold_time: int = DEFAULT_HOLD_TIME
    min_hold_time: int = DEFAULT_MIN_HOLD_TIME
    allow_zero_hold: bool = False
    hello_timeout: float = DEFAULT_HELLO_TIMEOUT
    digest_interval: float = DEFAULT_DIGEST_INTERVAL
    key_encrypted: bool = True
    advertise: str | None = None  # the address peers dial, when not ``listen``
    # mDNS discovery on the LAN (docs/protocols/discovery.md). Off by default: a WAN
    # fleet has its bootstrap list, and announcing ourselves is an operator's choice.
    mdns: bool = False
    # Attestation of peers on every link (mesh.attest, docs/protocols/attestation.md):
    # "off", or what a peer whose TPM quote fails gets: "demote" (its gossip dropped,
    # none sent to it), "close" (the link closed), "revoke" (closed and reported to the
    # CA, which revokes it if the quote fails the CA's policy).
    link_attestation: str = "off"
    # The bundle store's quotas (docs/protocols/bundles.md section 9): bytes in all, and
    # bytes of any one source node; and the spray-and-wait copies of a new bundle.
    bundle_quota: int = 256 * 1024 * 1024
    bundle_source_quota: int = 32 * 1024 * 1024
    bundle_copies: int = 8
    # A plain-HTTP port for a local Prometheus scraper, "HOST:PORT" (docs/metrics.md);
    # None: /metrics only on the API (mTLS).
    metrics: str | None = None
    limits: dict[str, float] = field(default_factory=dict)  # ResourcePolicy overrides
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def policy(self) -> ResourcePolicy:
        """The resource policy of the link listener and the API (defaults, then
        ``[limits]``)."""
        return policy_from(self.limits)

    def __post_init__(self) -> None:
        addresses = [("listen", self.listen, True), ("api", self.api, True)]
        addresses += [("bootstrap", b, False) for b in self.bootstrap]
        if self.advertise is not None:
            addresses.append(("advertise", self.advertise, False))
        if self.metrics is not None:
            if not isinstance(self.metrics, str):
                raise ConfigError("metrics must be a string, HOST:PORT")
            addresses.append(("metrics", self.metrics, True))
        for name, value, any_port in addresses:
            try:
                split_address(value, any_port=any_port)
            except (ValueError, AttributeError) as exc:
                raise ConfigError(f"{name}: {exc}") from None
        if _same_socket(self.listen, self.api):
            # The second bind would fail at `node run` with a bare "address in use".
            raise ConfigError(
                f"listen ({self.listen}) and api ({self.api}) need different ports: the"
                " links and the API are two listeners"
            )
        if not isinstance(self.mdns, bool):
            raise ConfigError("mdns must be true or false")
        if self.link_attestation not in LINK_ATTESTATION_POLICIES:
            choices = ", ".join(LINK_ATTESTATION_POLICIES)
            raise ConfigError(f"link_attestation must be one of {choices}")
        if self.mdns:
            if len(self.node_id) > MAX_NODE_ID:
                raise ConfigError(f"mdns: a node_id of at most {MAX_NODE_ID} characters")
            host, _ = split_address(self.listen, any_port=True)
            try:
                ipaddress.ip_address(host)
            except ValueError:
                raise ConfigError(
                    f"mdns: listen must be an IP address (0.0.0.0 for every interface), "
                    f"not {host!r}"
                ) from None
        if self.crl_interval < 1:
            raise ConfigError("crl_interval must be at least 1 second")
        if not 1 <= self.gossip_fanout <= 64:
            raise ConfigError("gossip_fanout must be in 1..64")
        if not 1 <= self.max_links <= 1024:
            raise ConfigError("max_links must be in 1..1024")
        most = max(1, self.max_links // 3)
        if self.dial_target is not None and not 1 <= self.dial_target <= most:
            # Dialling for more than a third of the cap leaves no room for newcomers: at
            # N nodes the links tend to the cap and every new dial is refused.
            raise ConfigError(f"dial_target must be in 1..{most} (max_links / 3)")
        if self.hold_time in (1, 2) or not 0 <= self.hold_time <= MAX_HOLD_TIME:
            raise ConfigError(f"hold_time must be 0 or 3..{MAX_HOLD_TIME}")
        if not 3 <= self.min_hold_time <= MAX_HOLD_TIME:
            raise ConfigError(f"min_hold_time must be 3..{MAX_HOLD_TIME}")
        if not 0 < self.hello_timeout <= MAX_HOLD_TIME:
            raise ConfigError(f"hello_timeout must be in (0, {MAX_HOLD_TIME}] seconds")
        for name in ("bundle_quota", "bundle_source_quota"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1024:
                raise ConfigError(f"{name} must be a number of bytes, at least 1024")
        copies = self.bundle_copies
        if isinstance(copies, bool) or not isinstance(copies, int) or not 1 <= copies <= 255:
            raise ConfigError("bundle_copies must be in 1..255")
        if not 0.05 <= self.digest_interval <= 3600:
            raise ConfigError("digest_interval must be in 0.05..3600 seconds")
        try:
            policy_from(self.limits)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"[limits]: {exc}") from None

    def core_settings(self, advertise: str, record_capacity: int) -> NodeSettings:
        """What the node's sans-IO core needs of this config (trustmesh.mesh.node)."""
        return NodeSettings(
            self.node_id,
            advertise,
            self.bootstrap,
            max_links=self.max_links,
            dial_target=self.dial_target,
            digest_interval_ms=int(self.digest_interval * 1000),
            crl_interval_ms=int(self.crl_interval * 1000),
            record_capacity=record_capacity,
        )

    def check_operator_values(self) -> None:
        """The floors an operator's settings must respect (tests may go lower)."""
        try:
            self.policy.check_operator_values()
        except ValueError as exc:
            raise ConfigError(f"[limits]: {exc}") from None

    def to_toml(self) -> str:
        data = {k: v for k, v in asdict(self).items() if k != "extra" and v is not None}
        data["bootstrap"] = list(self.bootstrap)
        if not self.limits:
            del data["limits"]
        return tomli_w.dumps({**data, **self.extra})


_WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})  # noqa: S104 (compared, never bound)


def _same_socket(first: str, second: str) -> bool:
    """Whether two listen addresses would bind one socket: the same port (not 0, any
    free port) on the same host, or on a wildcard host, which takes every address."""
    host_a, port_a = split_address(first, any_port=True)
    host_b, port_b = split_address(second, any_port=True)
    if port_a != port_b or port_a == 0:
        return False
    host_a, host_b = host_a.lower(), host_b.lower()
    return host_a == host_b or host_a in _WILDCARD_HOSTS or host_b in _WILDCARD_HOSTS


def load_config(directory: Path) -> NodeConfig:
    path = directory / CONFIG_FILE
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        if (directory / "node.crt").exists():  # `trustmesh enroll` wrote it
            raise ConfigError(
                f"{path} does not exist: run `trustmesh node init --dir {directory} --node-id"
                " ID --listen HOST:PORT --api HOST:PORT`, which adopts this enrolled directory"
            ) from None
        raise ConfigError(f"{path} does not exist: run `trustmesh node init` first") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    known = {f.name for f in fields(NodeConfig)} - {"extra"}
    values = {k: v for k, v in data.items() if k in known}
    extra = {k: v for k, v in data.items() if k not in known}
    if "bootstrap" in values:
        values["bootstrap"] = tuple(values["bootstrap"])
    try:
        config = NodeConfig(**values, extra=extra)
    except TypeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    config.check_operator_values()
    return config


def write_config(directory: Path, config: NodeConfig) -> Path:
    path = directory / CONFIG_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(config.to_toml())
    os.replace(tmp, path)
    return path
