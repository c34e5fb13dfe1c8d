"""The Python BRC-103 reference (``bsv-sdk`` 2.4.0): benchmark anchors and an interop endpoint.

``bsv.auth.peer.Peer`` cannot talk to bsv-sdk's own ``ProtoWallet``: the Peer calls
``create_signature({"encryption_args": {"protocol_id", "key_id", "counterparty"}, "data"})`` and
reads ``.signature`` / ``.public_key`` / ``.valid`` attributes, the wallet wants flat camelCase
arguments and returns dicts.  :class:`ReferenceWallet` changes only those shapes; every key
derivation, signature, HMAC and nonce is computed by bsv-sdk (``ProtoWallet`` and the Peer's own
``bsv.auth.utils.create_nonce`` / ``verify_nonce``).

bsv-sdk prints about 30 debug lines per handshake (``bsv.auth.utils.verify_nonce`` and
``ProtoWallet.verify_hmac`` call ``print`` unconditionally).  :func:`silence_bsv_debug_output`
shadows the name ``print`` in exactly those two modules (``bsv.auth.utils`` and
``bsv.wallet.wallet_impl``) with a no-op, process-wide and idempotently; it is applied by
everything in this module that builds a Peer.  The f-string arguments are still evaluated, so the
reference keeps that (small) cost, but nothing is written anywhere.

The Peer is synchronous: ``transport.send`` is a plain call, an initiator registers its
initialResponse waiter (a ``threading.Event``) *before* sending the initialRequest and then blocks
on the event for up to ``max_wait_time_ms``.  :class:`MemoryTransport` therefore delivers
synchronously: ``a.send(m)`` runs ``b``'s handler in the caller's stack and returns its result,
so a whole handshake (initialRequest -> initialResponse -> verified) finishes inside ``send`` and
the wait returns at once.  No threads, no event loop and no sleeps are involved in the anchors.

Wire form (:func:`auth_message_to_wire`, :func:`wire_to_auth_message`): what bsv-sdk's
``SimplifiedHTTPTransport`` POSTs to ``/.well-known/auth`` and parses back, i.e. all ten keys
always present (``""``/``[]``/``null`` when empty), byte arrays as integer lists, and
``requestedCertificates`` passed through ``json.dumps(default=str)`` (a ``RequestedCertificateSet``
becomes its ``repr`` string).  :class:`ReferencePeerEndpoint` puts a Peer behind that form for
tests against a foreign implementation.

    handshake_rate(0.2)           # full in-memory handshakes per second, two bsv-sdk Peers
    general_roundtrip_rate(0.2)   # signed general message there and back, one session
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, Final

import bsv.auth.utils as _bsv_auth_utils
import bsv.utils.pushdata as _bsv_pushdata
import bsv.wallet.wallet_impl as _bsv_wallet_impl
from bsv.auth.peer import Peer
from bsv.auth.transports.simplified_http_transport import SimplifiedHTTPTransport
from bsv.keys import PrivateKey, PublicKey
from bsv.wallet import ProtoWallet

__all__ = [
    "MemoryTransport",
    "ReferencePeerEndpoint",
    "ReferencePeerError",
    "ReferenceWallet",
    "WireMessage",
    "auth_message_to_wire",
    "general_roundtrip_rate",
    "handshake_rate",
    "make_reference_peer",
    "silence_bsv_debug_output",
    "wire_to_auth_message",
]

WireMessage = dict[str, Any]
"""An AuthMessage as decoded JSON (camelCase keys, byte arrays as lists of ints)."""


def _undo_bsv_sys_path() -> None:
    """Take bsv-sdk's package directory off ``sys.path`` again.

    ``bsv/utils/pushdata.py`` does ``sys.path.insert(0, <site-packages>/bsv)`` when imported (to
    ``from constants import OpCode``), after which every later top-level import of a name that
    bsv-sdk also has as a module -- ``base58``, ``hash``, ``keys``, ``utils``, ... -- finds
    bsv-sdk's file: ``import base58`` in ``trustmesh.wire`` then fails unless trustmesh happened to
    be imported first.  bsv-sdk needs the entry only while pushdata.py is imported, so it is
    removed as soon as the imports above have run; importers need no particular import order.
    """
    package_dir = os.path.dirname(os.path.dirname(os.path.abspath(_bsv_pushdata.__file__)))
    while package_dir in sys.path:
        sys.path.remove(package_dir)


_undo_bsv_sys_path()

SECP256K1_N: Final = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
WAIT_MS: Final = 5_000
"""``max_wait_time`` handed to the Peer; with synchronous delivery it is never waited out."""
PAYLOAD: Final = bytes(range(32))
"""General-message payload of :func:`general_roundtrip_rate`."""


# --- debug output ----------------------------------------------------------------------------


def _no_print(*args: object, **kwargs: object) -> None:
    return None


def silence_bsv_debug_output() -> None:
    """Make ``print`` a no-op inside ``bsv.auth.utils`` and ``bsv.wallet.wallet_impl`` only.

    Those two modules print nothing but debug/trace lines (nonce verification, HMAC
    verification, ``create_action`` traces).  A module global named ``print`` shadows the builtin
    for code in that module; all other modules, and ``sys.stdout``, are untouched.
    """
    for module in (_bsv_auth_utils, _bsv_wallet_impl):
        module.print = _no_print


# --- the adapter wallet ----------------------------------------------------------------------


def _private_key(private_key_hex: str) -> Any:
    secret = bytes.fromhex(private_key_hex)
    if len(secret) != 32 or not 0 < int.from_bytes(secret, "big") < SECP256K1_N:
        raise ValueError("private key must be 32 bytes (64 hex digits) in [1, n-1]")
    return PrivateKey(secret)


class ReferenceWallet:
    """What ``bsv.auth.peer.Peer`` calls, delegated to a ``bsv.wallet.ProtoWallet``.

    Shapes only: nested snake_case ``encryption_args`` are flattened to the camelCase keys the
    ProtoWallet wants, dict results become the attribute objects the Peer reads.  A ProtoWallet
    error (it returns ``{"error": ...}`` instead of raising) becomes ``None`` for
    ``create_signature`` -- the Peer turns that into "failed to sign ..." -- and ``valid=False``
    for ``verify_signature``; the text is kept in :attr:`last_error`.  HMAC calls come from the
    Peer's nonce helpers, which already speak the ProtoWallet's dict shape, and pass through.
    The identity key is fetched from the ProtoWallet once and returned as the same object on
    every ``get_public_key({"identityKey": True})``.
    """

    def __init__(self, private_key: Any) -> None:
        self.proto = ProtoWallet(private_key)
        result = self.proto.get_public_key({"identityKey": True})
        if "publicKey" not in result:
            raise ValueError(f"ProtoWallet.get_public_key failed: {result.get('error')}")
        self.identity_key: Any = PublicKey(result["publicKey"])
        self._identity = SimpleNamespace(public_key=self.identity_key)
        self.last_error: str | None = None

    @classmethod
    def from_hex(cls, private_key_hex: str) -> ReferenceWallet:
        return cls(_private_key(private_key_hex))

    def get_public_key(self, args: dict[str, Any], originator: str | None = None) -> Any:
        if args.get("identityKey"):
            return self._identity
        result = self.proto.get_public_key(args, originator)
        if "publicKey" not in result:
            self.last_error = str(result.get("error"))
            return None
        return SimpleNamespace(public_key=PublicKey(result["publicKey"]))

    def create_signature(self, args: dict[str, Any], originator: str | None = None) -> Any:
        nested = args.get("encryption_args", args)
        flat = {
            "protocolID": nested.get("protocolID", nested.get("protocol_id")),
            "keyID": nested.get("keyID", nested.get("key_id")),
            "counterparty": nested.get("counterparty"),
            "data": args.get("data", b""),
        }
        result = self.proto.create_signature(flat, originator)
        if "signature" not in result:
            self.last_error = str(result.get("error"))
            return None
        return SimpleNamespace(signature=bytes(result["signature"]))

    def verify_signature(self, args: dict[str, Any], originator: str | None = None) -> Any:
        result = self.proto.verify_signature(args, originator)
        if "valid" not in result:
            self.last_error = str(result.get("error"))
        return SimpleNamespace(valid=result.get("valid") is True)

    def create_hmac(self, args: dict[str, Any], originator: str | None = None) -> Any:
        return self.proto.create_hmac(args, originator)

    def verify_hmac(self, args: dict[str, Any], originator: str | None = None) -> Any:
        return self.proto.verify_hmac(args, originator)


def make_reference_peer(key: str | ReferenceWallet, transport: Any) -> Any:
    """A ``bsv.auth.peer.Peer`` with a :class:`ReferenceWallet`, registered on ``transport``.

    ``key`` is a private key as 64 hex digits, or an existing wallet (cheaper: the ProtoWallet
    and the identity key are built once).  ``transport`` needs ``on_data(callback)`` and
    ``send(message) -> Exception | None`` (bsv-sdk's ``Transport`` interface).
    """
    silence_bsv_debug_output()
    wallet = key if isinstance(key, ReferenceWallet) else ReferenceWallet.from_hex(key)
    peer = Peer(wallet, transport)
    if not peer._transport_ready:
        raise RuntimeError("bsv-sdk Peer could not register its handler on the transport")
    return peer


# --- wire form -------------------------------------------------------------------------------


def _requested_certificates_ts(requested: Any) -> Any:
    """A ``RequestedCertificateSet`` in the TS shape ``{"certifiers", "types"}``."""
    to_json_dict = getattr(requested, "to_json_dict", None)
    if to_json_dict is None:
        return requested
    d = to_json_dict()
    return {"certifiers": d["certifiers"], "types": d["certificateTypes"]}


def auth_message_to_wire(message: Any, *, ts_requested_certificates: bool = False) -> WireMessage:
    """A bsv-sdk ``AuthMessage`` as the JSON object its ``SimplifiedHTTPTransport`` sends.

    Mirrors ``SimplifiedHTTPTransport._send_non_general_message`` (bsv-sdk 2.4.0) key for key,
    including ``json.dumps(default=str)``; decoded again so the caller gets plain JSON values.
    With ``ts_requested_certificates`` a ``RequestedCertificateSet`` is written as the TS reference
    writes it instead of as its Python ``repr``.
    """
    identity = message.identity_key
    requested = message.requested_certificates
    if ts_requested_certificates:
        requested = _requested_certificates_ts(requested)
    obj = {
        "version": message.version,
        "messageType": message.message_type,
        "identityKey": identity.hex() if hasattr(identity, "hex") else str(identity),
        "nonce": message.nonce,
        "initialNonce": message.initial_nonce,
        "yourNonce": message.your_nonce,
        "certificates": message.certificates if message.certificates else [],
        "requestedCertificates": requested,
        "payload": list(message.payload) if message.payload else None,
        "signature": list(message.signature) if message.signature else None,
    }
    decoded: WireMessage = json.loads(json.dumps(obj, default=str))
    return decoded


def wire_to_auth_message(wire: WireMessage) -> Any:
    """A wire object as the bsv-sdk ``AuthMessage`` its HTTP transport would hand the Peer.

    This *is* bsv-sdk's parser (``SimplifiedHTTPTransport._auth_message_from_dict``, which uses
    nothing of its instance): payload/signature must be int lists (or null), snake_case keys are
    refused, ``identityKey`` becomes a ``PublicKey``, missing fields default (``messageType`` to
    ``"initialResponse"``!), ``requestedCertificates``/``certificates`` stay raw JSON.
    Raises ``ValueError`` on shapes bsv-sdk rejects.
    """
    if not isinstance(wire, dict):
        raise ValueError("an AuthMessage must be a JSON object")
    return SimplifiedHTTPTransport._auth_message_from_dict(None, wire)


# --- in-memory transports --------------------------------------------------------------------


class MemoryTransport:
    """One end of a synchronous in-memory link between two bsv-sdk Peers.

    Duck-types ``bsv.auth.transports.Transport`` (the Peer never checks the class).  ``send``
    calls the other end's registered handler directly and returns what it returns (``None`` or
    an ``Exception``), so errors reach the sender the way ``SimplifiedHTTPTransport`` reports
    them.  With ``wire=True`` every message goes through :func:`auth_message_to_wire` (JSON text
    and back) and :func:`wire_to_auth_message` on the way, and the wire objects are appended to
    ``log`` (shared by both ends, in send order).
    """

    def __init__(self, *, wire: bool = False, log: list[WireMessage] | None = None) -> None:
        self.remote: MemoryTransport | None = None
        self.wire = wire
        self.log: list[WireMessage] = log if log is not None else []
        self._handler: Callable[[Any], Any] | None = None

    @classmethod
    def pair(cls, *, wire: bool = False) -> tuple[MemoryTransport, MemoryTransport]:
        log: list[WireMessage] = []
        a, b = cls(wire=wire, log=log), cls(wire=wire, log=log)
        a.remote, b.remote = b, a
        return a, b

    def on_data(self, callback: Callable[[Any], Any]) -> Exception | None:
        self._handler = callback  # one handler per end; Peer.stop() replaces it with a no-op
        return None

    def send(self, message: Any) -> Exception | None:
        remote = self.remote
        handler = remote._handler if remote is not None else None
        if handler is None:
            return Exception("MemoryTransport: no handler registered at the other end")
        if self.wire:
            wire = auth_message_to_wire(message)
            self.log.append(wire)
            message = wire_to_auth_message(wire)
        result = handler(message)
        return result if isinstance(result, Exception) else None


# --- benchmark anchors -----------------------------------------------------------------------


def _two_wallets() -> tuple[ReferenceWallet, ReferenceWallet]:
    return ReferenceWallet(PrivateKey()), ReferenceWallet(PrivateKey())


def _handshake(initiator: ReferenceWallet, responder: ReferenceWallet) -> tuple[Any, Any]:
    """Two fresh Peers on a fresh link; the initiator runs a full handshake with the responder."""
    ta, tb = MemoryTransport.pair()
    a = make_reference_peer(initiator, ta)
    b = make_reference_peer(responder, tb)
    session = a.get_authenticated_session(responder.identity_key, WAIT_MS)
    if session is None or not session.is_authenticated:
        detail = initiator.last_error or responder.last_error or "no initialResponse accepted"
        raise RuntimeError(f"bsv-sdk handshake failed: {detail}")
    return a, b


def handshake_rate(min_time: float) -> float:
    """Complete in-memory BRC-103 handshakes per second between two bsv-sdk Peers.

    Each iteration builds two new Peers (fresh session managers) on a new
    :class:`MemoryTransport` pair and calls ``get_authenticated_session`` on the initiator:
    session nonce (HMAC) -> initialRequest -> responder creates its session, its own nonce and
    signs the initialResponse -> initiator verifies its nonce and the signature and marks the
    session authenticated.  New Peers are needed: a Peer that already has a session with the
    other identity never completes a second handshake (the initialResponse updates the old
    session and the waiter of the new one is not notified).  The two wallets (ProtoWallet and
    identity key) are reused, as they would be by a long-lived node; building the Peer pair costs
    about 1 % of a handshake.  Everything runs synchronously in this thread.
    """
    initiator, responder = _two_wallets()
    _, b = _handshake(initiator, responder)
    if b.session_manager.get_session(initiator.identity_key.hex()) is None:
        raise RuntimeError("bsv-sdk responder kept no session")
    count = 0
    start = time.perf_counter()
    deadline = start + min_time
    while True:
        _handshake(initiator, responder)
        count += 1
        now = time.perf_counter()
        if now >= deadline:
            return count / (now - start)


def general_roundtrip_rate(min_time: float, *, payload: bytes = PAYLOAD) -> float:
    """Signed general-message round trips per second on one established bsv-sdk session.

    One round trip: ``a.to_peer(payload)`` signs and sends a general message; ``b`` verifies it
    and its listener answers with ``b.to_peer(payload)``, signed by ``b``; ``a`` verifies that
    and its listener counts it.  All of it happens synchronously inside ``a.to_peer`` (two
    signatures, two verifications, four BRC-42 derivations); the count is checked after each
    call.
    """
    initiator, responder = _two_wallets()
    a, b = _handshake(initiator, responder)
    responder_key = responder.identity_key
    replies: list[bytes] = []

    def echo(sender: Any, body: Any) -> None:
        err = b.to_peer(body, sender, WAIT_MS)
        if err is not None:
            raise RuntimeError(f"bsv-sdk responder could not answer: {err}")

    b.listen_for_general_messages(echo)
    a.listen_for_general_messages(lambda _sender, body: replies.append(body))

    def round_trip(expected: int) -> None:
        err = a.to_peer(payload, responder_key, WAIT_MS)
        if err is not None:
            raise RuntimeError(f"bsv-sdk general message failed: {err}")
        if len(replies) != expected:
            raise RuntimeError(f"bsv-sdk round trip lost its answer ({responder.last_error})")

    round_trip(1)
    if replies[0] != payload:
        raise RuntimeError("bsv-sdk round trip changed the payload")
    replies.clear()
    count = 0
    start = time.perf_counter()
    deadline = start + min_time
    while True:
        count += 1
        round_trip(count)
        now = time.perf_counter()
        if now >= deadline:
            return count / (now - start)


# --- interop endpoint ------------------------------------------------------------------------


class ReferencePeerError(Exception):
    """The bsv-sdk Peer rejected a message or failed to send one."""


class _EndpointTransport:
    """The endpoint's transport: outgoing AuthMessages become wire objects on the event loop."""

    def __init__(self, endpoint: ReferencePeerEndpoint) -> None:
        self.endpoint = endpoint
        self.handler: Callable[[Any], Any] | None = None

    def on_data(self, callback: Callable[[Any], Any]) -> Exception | None:
        self.handler = callback
        return None

    def send(self, message: Any) -> Exception | None:
        try:
            wire = auth_message_to_wire(
                message, ts_requested_certificates=self.endpoint.ts_requested_certificates
            )
        except Exception as exc:  # the Peer expects errors as return values
            return exc
        self.endpoint._emit(wire)
        return None


class ReferencePeerEndpoint:
    """A bsv-sdk Peer exchanging wire objects (decoded AuthMessage JSON) with a foreign peer.

    Create it inside a running event loop.  Messages the reference sends are converted with
    :func:`auth_message_to_wire` and handed, in send order and on the loop thread, to
    ``on_send`` -- or, without ``on_send``, put into :attr:`outbox`.  Feed the foreign side's
    messages to :meth:`deliver`.  Authenticated general messages received by the reference land
    in :attr:`received` as ``(sender identity hex, payload)``; with ``reply`` the reference also
    answers each one with ``reply(payload)`` (if not ``None``) on the same session, before
    :meth:`deliver` returns (``reply=bytes`` echoes).

    The Peer blocks while it waits for an initialResponse, so every call into it runs in a worker
    thread (``asyncio.to_thread``): :meth:`send_general` and :meth:`handshake` may start a
    handshake whose initialResponse must arrive through :meth:`deliver` from another task while
    they wait.  Deliveries are processed one at a time, in call order.
    """

    def __init__(
        self,
        private_key_hex: str,
        on_send: Callable[[WireMessage], object] | None = None,
        *,
        reply: Callable[[bytes], bytes | None] | None = None,
        ts_requested_certificates: bool = False,
    ) -> None:
        if on_send is not None and inspect.iscoroutinefunction(on_send):
            raise TypeError("on_send must be a plain callable (e.g. a queue's put_nowait)")
        self._loop = asyncio.get_running_loop()
        self._on_send = on_send
        self._reply = reply
        self._deliver_lock = asyncio.Lock()
        self.ts_requested_certificates = ts_requested_certificates
        self.outbox: asyncio.Queue[WireMessage] = asyncio.Queue()
        self.received: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self.sent: list[WireMessage] = []
        """Every wire object the reference produced, in order (appended in the Peer's thread)."""
        self._sent_lock = threading.Lock()
        self.reply_errors: list[str] = []
        """Failures of ``reply`` answers (the Peer would swallow them)."""
        self.wallet = ReferenceWallet.from_hex(private_key_hex)
        self.identity_key: str = self.wallet.identity_key.hex()
        self.transport = _EndpointTransport(self)
        self.peer: Any = make_reference_peer(self.wallet, self.transport)
        self.peer.listen_for_general_messages(self._on_general)

    def _emit(self, wire: WireMessage) -> None:
        with self._sent_lock:
            self.sent.append(wire)
        target = self._on_send if self._on_send is not None else self.outbox.put_nowait
        self._loop.call_soon_threadsafe(target, wire)

    def _on_general(self, sender: Any, payload: Any) -> None:
        body = bytes(payload) if payload is not None else b""
        self._loop.call_soon_threadsafe(self.received.put_nowait, (sender.hex(), body))
        if self._reply is not None:
            answer = self._reply(body)
            if answer is not None:
                err = self.peer.to_peer(answer, sender, WAIT_MS)
                if err is not None:  # the Peer ignores what its listeners return or raise
                    self.reply_errors.append(str(err))

    async def deliver(self, message: WireMessage) -> None:
        """Hand the reference one message from the foreign side; raises
        :class:`ReferencePeerError` if the bsv-sdk Peer rejects it (``ValueError`` if its parser
        already refuses the shape)."""
        auth = wire_to_auth_message(message)
        async with self._deliver_lock:
            err = await asyncio.to_thread(self.peer.handle_incoming_message, auth)
        if err is not None:
            detail = f" (wallet: {self.wallet.last_error})" if self.wallet.last_error else ""
            self.wallet.last_error = None
            raise ReferencePeerError(f"{err}{detail}")

    async def handshake(self, identity_key: str | None = None, max_wait: float = 5.0) -> None:
        """Make sure the reference has an authenticated session with ``identity_key``, starting
        a handshake (as initiator) if it has none; the Peer waits up to ``max_wait`` seconds for
        the initialResponse.  Only one handshake per peer identity works:
        bsv-sdk never completes a second one with a peer it already has a session with."""
        key = PublicKey(identity_key) if identity_key is not None else None
        session = await asyncio.to_thread(
            self.peer.get_authenticated_session, key, int(max_wait * 1000)
        )
        if session is None or not session.is_authenticated:
            raise ReferencePeerError("bsv-sdk Peer: handshake did not complete")

    async def send_general(
        self, payload: bytes, identity_key: str | None = None, max_wait: float = 5.0
    ) -> None:
        """Send a general message (``Peer.to_peer``), handshaking first if there is no session.
        Without ``identity_key`` the Peer uses the peer it last talked to."""
        key = PublicKey(identity_key) if identity_key is not None else None
        err = await asyncio.to_thread(self.peer.to_peer, payload, key, int(max_wait * 1000))
        if err is not None:
            raise ReferencePeerError(str(err))
