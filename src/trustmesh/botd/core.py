"""The BOTD #2 connection as a sans-IO state machine.

One object per connection and side. The initiator knows the responder's identity key
and sends Init; the responder checks it and answers Ack. Each side then sends an
encrypted Finished that signs the transcript, and treats the peer as present only once
it has checked the peer's Finished. From then on every frame is an AES-256-GCM record.
See docs/protocols/botd.md for the wire format and every choice the spec leaves open.
"""

from __future__ import annotations

import enum
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from trustmesh.botd.config import DEFAULT_CONFIG, BotdConfig
from trustmesh.botd.errors import (
    BotdError,
    HandshakeError,
    PeerMisbehaved,
    PingTooSoonError,
    PolicyError,
)
from trustmesh.botd.framing import (
    FrameReader,
    Payload,
    data_frame_body,
    data_frame_header,
    uvarint,
)
from trustmesh.botd.keyschedule import (
    EphemeralKey,
    RekeyingOpener,
    RekeyingSealer,
    SessionKeys,
    ack_digest,
    finished_digest,
    init_digest,
    parse_point,
    sign_compact,
    transcript_hash,
    verify_compact,
)
from trustmesh.botd.messages import (
    FINISHED_PREFIX,
    FINISHED_SIZE,
    MAX_CONTROL_RECORD,
    MAX_HANDSHAKE_FRAME,
    Ack,
    Close,
    Frame,
    Init,
    Ping,
    Pong,
    check_id,
    close_reason,
    parse_frame,
    parse_pubkey,
)
from trustmesh.botd.replay import ReplayCache
from trustmesh.crypto.aead import TAG_SIZE
from trustmesh.crypto.keys import KeyKind, PublicKey, Secp256k1PublicKey
from trustmesh.errors import DecodeError, OversizeError, ProtocolError
from trustmesh.keystore.signer import Signer
from trustmesh.sansio import Authenticated, ConnectionClosed, Event

# A data frame's record: protobuf tag and length (at most 1 + 4 bytes) plus the GCM tag.
RECORD_OVERHEAD = 8 + TAG_SIZE


@dataclass(frozen=True, slots=True)
class HandshakeComplete(Authenticated):
    """The peer proved its identity key for this session and holds the session keys."""

    peer_key: PublicKey


@dataclass(frozen=True, slots=True)
class MessageReceived(Event):
    """One authenticated application message."""

    data: bytes

    def payload_size(self) -> int:
        return len(self.data)


@dataclass(frozen=True, slots=True)
class PeerClosed(Event):
    """The peer sent Close: it will send nothing more. We may still send; ``close()``
    ends the channel (it ends by itself ``close_timeout`` later)."""

    reason: str


@dataclass(frozen=True, slots=True)
class PongReceived(Event):
    """The answer to our ping, ``rtt`` seconds after we sent it."""

    ping_id: str
    rtt: float


class State(enum.Enum):
    START = "start"
    AWAIT_INIT = "await-init"  # responder
    AWAIT_ACK = "await-ack"  # initiator
    AWAIT_FINISHED = "await-finished"  # keys derived; the peer's Finished not yet checked
    ESTABLISHED = "established"
    CLOSING = "closing"  # we sent Close; reading on until the peer's Close or EOF
    PEER_CLOSED = "peer-closed"  # the peer sent Close; we may still send until we close
    CLOSED = "closed"


def _random_id() -> str:
    return secrets.token_hex(16)


class BotdConnection:
    """One side of a BOTD #2 connection.

    ``peer_key`` given: this side is the initiator and will only talk to that key.
    ``peer_key`` omitted: this side is the responder and learns the peer from its Init.
    ``ephemeral_secret`` and ``new_id`` pin the randomness, for tests and vectors.
    """

    def __init__(
        self,
        key: Signer,
        *,
        peer_key: PublicKey | None = None,
        config: BotdConfig | None = None,
        replay_cache: ReplayCache | None = None,
        ephemeral_secret: bytes | None = None,
        new_id: Callable[[], str] = _random_id,
    ) -> None:
        if key.kind is not KeyKind.SECP256K1:
            raise ValueError(f"BOTD identity keys are secp256k1, not {key.kind}")
        if peer_key is not None and not isinstance(peer_key, Secp256k1PublicKey):
            raise ValueError(f"BOTD peer keys are secp256k1, not {peer_key.kind}")
        self.config = config or DEFAULT_CONFIG
        self._key = key
        self._own = key.public_key().to_bytes()
        self._peer: Secp256k1PublicKey | None = peer_key
        self.initiator = peer_key is not None
        self._replay = replay_cache
        self._ephemeral = EphemeralKey(ephemeral_secret)
        self._ephemeral_pub = self._ephemeral.public
        self._new_id = new_id
        self._state = State.START
        self._decoder = FrameReader(MAX_HANDSHAKE_FRAME)
        self._out: list[bytes] = []
        self._init_id = ""
        self._init_payload = b""
        self._sealer: RekeyingSealer | None = None
        self._opener: RekeyingOpener | None = None
        self.transcript_hash: bytes | None = None
        self._handshake_deadline: float | None = None
        self._close_deadline: float | None = None
        self._close_reason = ""
        self._ping_id: str | None = None  # our ping still waiting for its pong
        self._ping_sent_at: float | None = None  # our latest ping
        self._peer_ping_at: float | None = None  # the peer's latest ping
        self._max_message = self.config.max_message
        self._keepalive = self.config.keepalive
        self._established_at: float | None = None

    # --- inspection -------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def established(self) -> bool:
        return self._state is State.ESTABLISHED

    @property
    def peer_key(self) -> PublicKey | None:
        """The peer's identity key: given (initiator) or learnt from a valid Init."""
        return self._peer

    @property
    def rekeys(self) -> tuple[int, int]:
        """Key rotations so far, (sending, receiving)."""
        if self._sealer is None or self._opener is None:
            return 0, 0
        return self._sealer.rekeys, self._opener.rekeys

    # --- StreamCore -------------------------------------------------------------------

    def start(self, now: float) -> list[Event]:
        if self._state is not State.START:
            return []
        self._handshake_deadline = now + self.config.handshake_timeout
        if not self.initiator:
            self._state = State.AWAIT_INIT
            return []
        assert self._peer is not None
        peer = self._peer.to_bytes()
        self._init_id = self._new_id()
        init = Init(
            id=self._init_id,
            sender_pubkey=self._own,
            recipient_pubkey=peer,
            ephemeral_pubkey=self._ephemeral_pub,
            signature=sign_compact(self._key, init_digest(self._own, peer, self._ephemeral_pub)),
        )
        self._init_payload = Frame(init=init).SerializeToString()
        self._queue(self._init_payload)
        self._state = State.AWAIT_ACK
        return []

    def receive_data(self, data: bytes, now: float) -> list[Event]:
        if self._state is State.CLOSED or self._state is State.START:
            return []
        if not data:
            return self._on_eof()
        try:
            payloads, error = self._decoder.feed(data), None
        except DecodeError as exc:
            payloads, error = list(exc.frames), exc
        return self._on_payloads(payloads, error, now)

    # The read path of asyncio.BufferedProtocol: the peer's bytes are read straight into
    # a buffer the core keeps, and frames are opened where they lie, even those split
    # across reads. The buffer is bounded (see FrameReader.get_buffer) and released when
    # the connection goes quiet (trim_buffer) or ends.

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Room for the next bytes from the peer (sizehint is ignored: the reader sizes
        its reads itself); pass how many came to :meth:`buffer_updated`."""
        return self._decoder.get_buffer()

    def buffer_updated(self, nbytes: int, now: float) -> list[Event]:
        """``nbytes`` from the peer arrived in the room :meth:`get_buffer` gave, at ``now``."""
        decoder = self._decoder
        if self._state is State.CLOSED or self._state is State.START:
            decoder.discard()
            return []
        payloads: list[Payload]
        try:
            payloads, error = decoder.buffer_updated(nbytes), None
        except DecodeError as exc:
            payloads, error = list(exc.frames), exc
        return self._on_payloads(payloads, error, now)

    @property
    def buffer_capacity(self) -> int:
        """Bytes the kept read buffer takes."""
        return self._decoder.capacity

    def trim_buffer(self) -> None:
        """The connection is quiet: release the read buffer (or shrink it to the partial
        frame it holds)."""
        self._decoder.trim()

    def _on_payloads(
        self, payloads: list[Payload], error: DecodeError | None, now: float
    ) -> list[Event]:
        events: list[Event] = []
        established, closed, max_message = State.ESTABLISHED, State.CLOSED, self._max_message
        try:
            opener = self._opener
            for index, payload in enumerate(payloads):
                if opener is None:
                    trailing = (
                        index + 1 < len(payloads) or error is not None or not self._decoder.idle
                    )
                    self._on_handshake(bytes(payload), now, events, trailing=trailing)
                    opener = self._opener
                else:
                    plaintext = opener.open(payload)
                    if self._state is established:
                        # The bulk of the traffic: one data field, taken without protobuf.
                        start = data_frame_body(plaintext)
                        if start > 0:
                            if len(plaintext) - start > max_message:
                                raise OversizeError(
                                    f"message of {len(plaintext) - start} bytes exceeds "
                                    f"{max_message}"
                                )
                            events.append(MessageReceived(plaintext[start:]))
                            continue
                    self._on_record(plaintext, now, events)
                if self._state is closed:  # the peer's Close ended it
                    return events
            if error is not None:
                raise error
        except ProtocolError as exc:  # what was accepted before the bad input stays accepted
            events.extend(self._fail(exc))
        return events

    def handle_timer(self, now: float) -> list[Event]:
        state = self._state
        if state is State.CLOSED:
            return []
        if state is State.CLOSING or state is State.PEER_CLOSED:
            if self._close_deadline is None or now < self._close_deadline:
                return []
            if state is State.PEER_CLOSED:
                return self.close(self._close_reason, now)
            return self._finish(ConnectionClosed(self._close_reason))
        if state is not State.ESTABLISHED:
            if self._handshake_deadline is not None and now >= self._handshake_deadline:
                return self._fail(HandshakeError("handshake timed out"))
            return []
        pong_due = self._pong_deadline()
        if pong_due is not None and now >= pong_due:
            return self._fail(PeerMisbehaved(f"no pong within {self.config.pong_timeout:g} s"))
        keepalive_due = self._keepalive_deadline()
        if keepalive_due is not None and now >= keepalive_due:
            self._send_ping(now)
        return []

    def get_timer(self) -> float | None:
        state = self._state
        if state is State.CLOSED:
            return None
        if state is State.CLOSING or state is State.PEER_CLOSED:
            return self._close_deadline
        if state is not State.ESTABLISHED:
            return self._handshake_deadline
        if self._ping_id is None and self._keepalive is None:
            return None  # the usual case: no ping out, no keepalive
        deadlines = [
            d for d in (self._pong_deadline(), self._keepalive_deadline()) if d is not None
        ]
        return min(deadlines) if deadlines else None

    def data_to_send(self) -> bytes:
        out = self._out
        if not out:
            return b""
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        return data

    def chunks_to_send(self) -> list[bytes]:
        """:meth:`data_to_send` unjoined: the frames' pieces, for a vectored write."""
        out = self._out
        if not out:
            return out
        self._out = []
        return out

    def close(self, reason: str, now: float) -> list[Event]:
        """Say goodbye: an established channel sends Close and reads on until the peer's
        Close (bounded by ``close_timeout``), so nothing already sent to us is lost."""
        if self._state is State.ESTABLISHED:
            self._send_frame(Frame(close=Close(reason=close_reason(reason))))
            self._state = State.CLOSING
            self._close_reason = reason
            self._close_deadline = now + self.config.close_timeout
            return []
        if self._state is State.PEER_CLOSED:
            self._send_frame(Frame(close=Close(reason=close_reason(reason))))
            return self._finish(ConnectionClosed(self._close_reason, by_peer=True))
        if self._state is State.CLOSING:
            return []
        return self._finish(ConnectionClosed(reason))

    # --- application actions ----------------------------------------------------------

    def send(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Queue one application message."""
        if self._state is not State.ESTABLISHED and self._state is not State.PEER_CLOSED:
            raise BotdError(f"cannot send: the channel is {self._state.value}")
        size = memoryview(data).nbytes  # not len(): a view of wider items counts its bytes
        if size > self._max_message:  # checked before sealing: no nonce is spent
            raise ValueError(f"message of {size} bytes exceeds {self._max_message}")
        # Frame{data} as protobuf encodes it, without building the message.
        assert self._sealer is not None
        self._queue(self._sealer.seal(data_frame_header(size) + data))
        return []

    def ping(self, now: float) -> list[Event]:
        """Send a Ping; its :class:`PongReceived` gives the round-trip time.

        Raises :class:`PingTooSoonError` while a ping is unanswered or within
        ``ping_interval`` of the last one (the spec's rate)."""
        if self._state is not State.ESTABLISHED:
            raise BotdError(f"cannot ping: the channel is {self._state.value}")
        if self._ping_id is not None:
            raise PingTooSoonError("a ping is already waiting for its pong")
        if self._ping_sent_at is not None:
            wait = self._ping_sent_at + self.config.ping_interval - now
            if wait > 0:
                raise PingTooSoonError(f"the next ping is allowed in {wait:.1f} s")
        self._send_ping(now)
        return []

    @property
    def pending_ping_id(self) -> str | None:
        return self._ping_id

    # --- handshake --------------------------------------------------------------------

    def _on_handshake(
        self, payload: bytes, now: float, events: list[Event], *, trailing: bool
    ) -> None:
        if trailing and not self.initiator:
            # The initiator cannot have anything more to say until it has our Ack.
            raise HandshakeError("bytes after the Init, before our Ack")
        body, frame = parse_frame(payload)
        if self._state is State.AWAIT_INIT:
            if body != "init":
                raise HandshakeError(f"expected Init, got {body}")
            self._on_init(frame.init, payload, now)
        elif self._state is State.AWAIT_ACK:
            if body != "ack":
                raise HandshakeError(f"expected Ack, got {body}")
            self._on_ack(frame.ack, payload, now, events)
        else:  # pragma: no cover - no other state reads plaintext
            raise HandshakeError(f"unexpected {body} in state {self._state.value}")

    def _on_init(self, init: Init, payload: bytes, now: float) -> None:
        # Cheap checks first: a stranger should cost us no signature verification.
        check_id(init.id, "Init id")
        if init.recipient_pubkey != self._own:
            raise HandshakeError("Init is addressed to another recipient key")
        sender = parse_pubkey(init.sender_pubkey, "Init sender_pubkey")
        if not self.config.allows(sender):
            raise PolicyError(f"sender {sender.hex()} is not on the allow-list")
        ephemeral = parse_point(init.ephemeral_pubkey, "Init ephemeral_pubkey")
        verify_compact(
            sender,
            init.signature,
            init_digest(init.sender_pubkey, self._own, init.ephemeral_pubkey),
            "Init",
        )
        if self._replay is not None and not self._replay.check_and_add(init.ephemeral_pubkey, now):
            raise HandshakeError("replayed Init (its ephemeral key was seen before)")
        self._peer = sender
        ack = Ack(
            id=self._new_id(),
            init_id=init.id,
            ephemeral_pubkey=self._ephemeral_pub,
            signature=sign_compact(
                self._key, ack_digest(self._own, init.sender_pubkey, self._ephemeral_pub)
            ),
        )
        ack_payload = Frame(ack=ack).SerializeToString()
        self._queue(ack_payload)
        self._derive_keys(ephemeral, payload, ack_payload)
        self._send_finished()
        self._state = State.AWAIT_FINISHED

    def _on_ack(self, ack: Ack, payload: bytes, now: float, events: list[Event]) -> None:
        assert self._peer is not None
        if ack.init_id != self._init_id:
            raise HandshakeError("Ack answers another Init (init_id does not match)")
        check_id(ack.id, "Ack id")
        ephemeral = parse_point(ack.ephemeral_pubkey, "Ack ephemeral_pubkey")
        verify_compact(
            self._peer,
            ack.signature,
            ack_digest(self._peer.to_bytes(), self._own, ack.ephemeral_pubkey),
            "Ack",
        )
        self._derive_keys(ephemeral, self._init_payload, payload)
        self._state = State.AWAIT_FINISHED

    def _send_finished(self) -> None:
        assert self.transcript_hash is not None
        digest = finished_digest(self.transcript_hash, initiator=self.initiator)
        assert self._sealer is not None
        self._queue(self._sealer.seal(FINISHED_PREFIX + sign_compact(self._key, digest)))

    def _on_finished(self, signature: bytes, now: float, events: list[Event]) -> None:
        if self._state is not State.AWAIT_FINISHED:
            raise PeerMisbehaved("Finished out of place")
        assert self._peer is not None
        assert self.transcript_hash is not None
        digest = finished_digest(self.transcript_hash, initiator=not self.initiator)
        verify_compact(self._peer, signature, digest, "Finished")
        if self.initiator:  # ours goes after the responder's has been checked
            self._send_finished()
        self._state = State.ESTABLISHED
        self._established_at = now
        events.append(HandshakeComplete(self._peer))

    def _derive_keys(self, peer_ephemeral: object, init: bytes, ack: bytes) -> None:
        self.transcript_hash = transcript_hash(init, ack)
        keys = SessionKeys(self._ephemeral.ecdh(peer_ephemeral), self.transcript_hash)
        self._sealer, self._opener = keys.ciphers(
            initiator=self.initiator, rekey_interval=self.config.rekey_interval
        )
        # Frames already split off under the handshake limit are far below this one.
        self._decoder.max_size = max(self._max_message + RECORD_OVERHEAD, MAX_CONTROL_RECORD)

    # --- records ----------------------------------------------------------------------

    def _on_record(self, plaintext: bytes, now: float, events: list[Event]) -> None:
        if len(plaintext) == FINISHED_SIZE and plaintext.startswith(FINISHED_PREFIX):
            # A Finished exactly as protobuf encodes it (what its parser would read).
            if self._state is State.PEER_CLOSED:
                raise PeerMisbehaved("finished after the peer's own Close")
            self._on_finished(plaintext[len(FINISHED_PREFIX) :], now, events)
            return
        body, frame = parse_frame(plaintext)
        if self._state is State.PEER_CLOSED:
            raise PeerMisbehaved(f"{body} after the peer's own Close")
        if body == "data":
            if self._state is State.AWAIT_FINISHED:
                raise HandshakeError("data before Finished")
            data = frame.data
            if len(data) > self._max_message:
                raise OversizeError(f"message of {len(data)} bytes exceeds {self._max_message}")
            events.append(MessageReceived(data))
        elif body == "finished":
            self._on_finished(frame.finished.signature, now, events)
        elif self._state is State.AWAIT_FINISHED:
            raise HandshakeError(f"expected Finished, got {body}")
        elif body == "ping":
            self._on_ping(frame.ping, now)
        elif body == "pong":
            self._on_pong(frame.pong, now, events)
        elif body == "close":
            self._on_close(frame.close, now, events)
        else:
            raise PeerMisbehaved(f"{body} after the handshake")

    def _on_ping(self, ping: Ping, now: float) -> None:
        check_id(ping.id, "Ping id")
        last = self._peer_ping_at
        if last is not None and now - last < self.config.ping_window:
            raise PeerMisbehaved(
                f"ping flood: two pings {now - last:.1f} s apart, "
                f"inside the {self.config.ping_window:g} s window"
            )
        self._peer_ping_at = now
        if self._state is State.ESTABLISHED:
            self._send_frame(Frame(pong=Pong(id=self._new_id(), ping_id=ping.id)))

    def _on_pong(self, pong: Pong, now: float, events: list[Event]) -> None:
        check_id(pong.id, "Pong id")
        if self._ping_id is None or pong.ping_id != self._ping_id:
            raise PeerMisbehaved("unsolicited pong")
        assert self._ping_sent_at is not None
        self._ping_id = None
        events.append(PongReceived(pong.ping_id, now - self._ping_sent_at))

    def _on_close(self, close: Close, now: float, events: list[Event]) -> None:
        reason = close_reason(close.reason) or "no reason given"
        if self._state is State.CLOSING:  # the answer to our Close
            events.extend(self._finish(ConnectionClosed(self._close_reason)))
            return
        # A half-close, as TLS 1.3's close_notify: the application may still answer
        # what it received before it closes too.
        self._state = State.PEER_CLOSED
        self._close_reason = f"peer closed: {reason}"
        self._close_deadline = now + self.config.close_timeout
        events.append(PeerClosed(reason))

    def _on_eof(self) -> list[Event]:
        if self._state is State.CLOSING:
            return self._finish(ConnectionClosed(self._close_reason))
        if self._state is State.PEER_CLOSED:
            return self._finish(ConnectionClosed(self._close_reason, by_peer=True))
        if self._state is State.ESTABLISHED:
            reason = "peer ended the stream without Close"
        else:
            reason = "peer closed during the handshake"
        return self._finish(ConnectionClosed(reason, error=True, by_peer=True))

    # --- output and endings -------------------------------------------------------------

    def _queue(self, payload: bytes) -> None:
        """Queue one frame; prefix and payload are joined once, in data_to_send."""
        self._out += (uvarint(len(payload)), payload)

    def _send_frame(self, frame: Frame) -> None:
        assert self._sealer is not None
        self._queue(self._sealer.seal(frame.SerializeToString()))

    def _send_ping(self, now: float) -> None:
        self._ping_id = self._new_id()
        self._ping_sent_at = now
        self._send_frame(Frame(ping=Ping(id=self._ping_id)))

    def _pong_deadline(self) -> float | None:
        if self._ping_id is None or self.config.pong_timeout is None:
            return None
        assert self._ping_sent_at is not None
        return self._ping_sent_at + self.config.pong_timeout

    def _keepalive_deadline(self) -> float | None:
        keepalive = self.config.keepalive
        if keepalive is None or self._ping_id is not None:
            return None
        if self._ping_sent_at is None:
            return None if self._established_at is None else self._established_at + keepalive
        return self._ping_sent_at + keepalive

    def _fail(self, exc: ProtocolError) -> list[Event]:
        """Close after bad input. Before the peer is proven live we send nothing; after,
        an encrypted Close tells an honest peer why (a record that failed to open says
        nothing an attacker did not already know)."""
        if self._state is State.ESTABLISHED or self._state is State.PEER_CLOSED:
            self._send_frame(Frame(close=Close(reason=close_reason(str(exc)))))
        return self._finish(ConnectionClosed(str(exc) or type(exc).__name__, error=True))

    def _finish(self, event: ConnectionClosed) -> list[Event]:
        if self._state is State.CLOSED:
            return []
        self._state = State.CLOSED
        return [event]
