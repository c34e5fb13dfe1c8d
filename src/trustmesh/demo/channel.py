"""A small authenticated channel used by ``trustmesh demo`` until the real protocols land.

Both sides know each other's static secp256k1 key. Each sends a 32-byte random nonce in
its first frame; the channel keys are HKDF-SHA256 of the static-static ECDH secret,
salted with both nonces, split into one AES-256-GCM key per direction. Every later
frame is one sealed record. A record that fails authentication closes the channel.
This is deliberately minimal (no forward secrecy, no identity hiding): BOTD #2 is the
real channel.
"""

from __future__ import annotations

from dataclasses import dataclass

from trustmesh.crypto.aead import TAG_SIZE, DirectionalKeys, RecordOpener, RecordSealer
from trustmesh.crypto.keys import PublicKey
from trustmesh.errors import AuthenticationError, DecodeError, ProtocolError
from trustmesh.keystore.signer import Signer
from trustmesh.sansio import ConnectionClosed, Event
from trustmesh.wire.frames import FrameDecoder, encode_frame

NONCE_SIZE = 32
MAX_FRAME = 64 * 1024 + 64
MAX_MESSAGE = MAX_FRAME - TAG_SIZE
INFO = b"trustmesh demo channel v1"


@dataclass(frozen=True, slots=True)
class ChannelReady(Event):
    """Both nonces are exchanged; messages may flow."""


@dataclass(frozen=True, slots=True)
class MessageReceived(Event):
    """An authenticated message from the peer."""

    data: bytes


class DemoChannel:
    """Sans-IO core of the demo channel; one instance per side."""

    def __init__(
        self,
        key: Signer,
        peer_key: PublicKey,
        *,
        initiator: bool,
        nonce: bytes,
        idle_timeout: float = 30.0,
    ) -> None:
        if len(nonce) != NONCE_SIZE:
            raise ValueError(f"nonce must be {NONCE_SIZE} bytes")
        self._key = key
        self._peer_key = peer_key
        self._initiator = initiator
        self._nonce = nonce
        self._idle_timeout = idle_timeout
        self._frames = FrameDecoder(MAX_FRAME)
        self._out = bytearray()
        self._sealer: RecordSealer | None = None
        self._opener: RecordOpener | None = None
        self._deadline: float | None = None
        self._heard_from_peer = False  # since the idle deadline was last set
        self._closed = False

    @property
    def ready(self) -> bool:
        return self._sealer is not None

    def start(self, now: float) -> list[Event]:
        self._deadline = now + self._idle_timeout
        self._out += encode_frame(self._nonce, MAX_FRAME)
        return []

    def send(self, data: bytes) -> list[Event]:
        if self._sealer is None:
            raise ProtocolError("the channel is not ready yet")
        if len(data) > MAX_MESSAGE:  # checked before sealing, so no nonce is spent
            raise ValueError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE}")
        self._out += encode_frame(self._sealer.seal(data), MAX_FRAME)
        return []

    def receive_data(self, data: bytes, now: float) -> list[Event]:
        if self._closed:
            return []
        if not data:
            return self._close(ConnectionClosed("peer closed the channel", by_peer=True))
        events: list[Event] = []
        try:
            try:
                frames, error = self._frames.feed(data), None
            except DecodeError as exc:
                frames, error = list(exc.frames), exc
            for frame in frames:
                events.append(self._on_frame(frame))
            if error is not None:
                raise error
        except ProtocolError as exc:  # messages accepted before the bad input still count
            return events + self._close(ConnectionClosed(str(exc), error=True))
        self._heard_from_peer = True
        return events

    def handle_timer(self, now: float) -> list[Event]:
        # receive_data has no clock, so activity only marks a flag; the deadline moves
        # when it is reached. A silent peer is closed between 1 and 2 timeouts later.
        if self._closed or self._deadline is None or now < self._deadline:
            return []
        if self._heard_from_peer:
            self._heard_from_peer = False
            self._deadline = now + self._idle_timeout
            return []
        return self._close(ConnectionClosed("idle timeout", error=True))

    def get_timer(self) -> float | None:
        return None if self._closed else self._deadline

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def close(self, reason: str, now: float) -> list[Event]:
        return self._close(ConnectionClosed(reason))

    def _on_frame(self, frame: bytes) -> Event:
        if self._opener is None:
            if len(frame) != NONCE_SIZE:
                raise DecodeError(f"first frame must be a {NONCE_SIZE}-byte nonce")
            ours, theirs = self._nonce, frame
            salt = ours + theirs if self._initiator else theirs + ours
            keys = DirectionalKeys.derive(self._key.ecdh(self._peer_key), salt=salt, info=INFO)
            self._sealer, self._opener = keys.records(initiator=self._initiator)
            return ChannelReady()
        try:
            return MessageReceived(self._opener.open(frame))
        except AuthenticationError as exc:
            raise AuthenticationError(f"record rejected: {exc}") from None

    def _close(self, event: ConnectionClosed) -> list[Event]:
        if self._closed:
            return []
        self._closed = True
        return [event]
