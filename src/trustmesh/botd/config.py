"""BOTD #2 settings, with the spec's defaults."""

from __future__ import annotations

from dataclasses import dataclass

from trustmesh.crypto.keys import PublicKey

DEFAULT_PORT = 9945
DEFAULT_MAX_MESSAGE = 1 << 20  # 1 MiB of application data per message
REKEY_INTERVAL = 1000  # records per key, as BOLT #8


@dataclass(frozen=True, slots=True)
class BotdConfig:
    """How one side runs its channels.

    ``ping_interval``: we send at most one ping per this many seconds (spec: 30).
    ``ping_window``: a peer that pings twice within this many seconds is closed (spec: 30).
    ``pong_timeout``: close when a pong is this late; ``None`` waits forever.
    ``keepalive``: send a ping after this many seconds without one; ``None`` never does.
    ``handshake_timeout``: close a connection that has not finished the handshake.
    ``close_timeout``: after sending Close, wait this long for the peer's Close.
    ``rekey_interval``: records sealed under one key before both sides rotate it.
    ``max_message``: largest application message, sent or received.
    ``allow``: when set, only these identity keys may complete a handshake.
    """

    ping_interval: float = 30.0
    ping_window: float = 30.0
    pong_timeout: float | None = 30.0
    keepalive: float | None = None
    handshake_timeout: float = 10.0
    close_timeout: float = 5.0
    rekey_interval: int = REKEY_INTERVAL
    max_message: int = DEFAULT_MAX_MESSAGE
    allow: frozenset[PublicKey] | None = None

    def __post_init__(self) -> None:
        for name in ("ping_interval", "ping_window", "handshake_timeout", "close_timeout"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.pong_timeout is not None and self.pong_timeout <= 0:
            raise ValueError("pong_timeout must be > 0 or None")
        if self.keepalive is not None and self.keepalive < self.ping_interval:
            raise ValueError("keepalive must be >= ping_interval, or the spec's rate is broken")
        if not 1 <= self.rekey_interval <= 1 << 32:
            raise ValueError("rekey_interval must be in 1 .. 2**32")
        if not 0 < self.max_message <= 16 << 20:
            raise ValueError("max_message must be in 1 .. 16 MiB")

    def allows(self, key: PublicKey) -> bool:
        return self.allow is None or key in self.allow


DEFAULT_CONFIG = BotdConfig()
