"""BOTD #2: an authenticated, encrypted channel between two secp256k1 identities.

The sans-IO core is :class:`BotdConnection`; :mod:`trustmesh.io.botd` runs it over
TCP (``connect``, ``serve``). docs/protocols/botd.md is the wire specification.
"""

from trustmesh.botd.config import DEFAULT_PORT, BotdConfig
from trustmesh.botd.core import (
    BotdConnection,
    HandshakeComplete,
    MessageReceived,
    PeerClosed,
    PongReceived,
    State,
)
from trustmesh.botd.errors import (
    BotdError,
    HandshakeError,
    HandshakeFailed,
    PeerMisbehaved,
    PingTooSoonError,
    PolicyError,
)
from trustmesh.botd.replay import ReplayCache

__all__ = [
    "DEFAULT_PORT",
    "BotdConfig",
    "BotdConnection",
    "BotdError",
    "HandshakeComplete",
    "HandshakeError",
    "HandshakeFailed",
    "MessageReceived",
    "PeerClosed",
    "PeerMisbehaved",
    "PingTooSoonError",
    "PolicyError",
    "PongReceived",
    "ReplayCache",
    "State",
]
