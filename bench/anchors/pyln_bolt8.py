"""pyln-proto BOLT #8 anchor worker; runs only under the ``.venv-pyln`` interpreter.

Protocol on stdin/stdout, one line each way: ``<metric> <min_time>`` answers with a rate
(a float), ``quit`` exits.  Metrics:

``handshakes``
    complete in-memory BOLT #8 handshakes (acts one to three, both sides) per second;
``messages_1k``
    1 KiB transport messages per second, client to server over loopback TCP.

A failed command answers ``error <text>`` and writes the traceback to stderr.  This file
must import nothing from trustmesh or bench: pyln-proto ships its own ``coincurve``.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
import traceback
from typing import Any

from pyln.proto.wire import LightningConnection, LightningServerSocket, PrivateKey, connect

IO_TIMEOUT = 30.0
MESSAGE_SIZE = 1024
BATCH = 200
NORMAL, LAST = b"\x00", b"\x01"


def _handshake(initiator_key: Any, responder_key: Any, responder_pub: Any) -> tuple[Any, Any]:
    """One full handshake; creating the connections draws the ephemeral keys."""
    initiator = LightningConnection(None, responder_pub, initiator_key, is_initiator=True)
    responder = LightningConnection(None, None, responder_key, is_initiator=False)
    responder.handshake_act_one_responder(initiator.handshake_act_one_initiator())
    initiator.handshake_act_two_initiator(responder.handshake_act_two_responder())
    responder.handshake_act_three_responder(initiator.handshake_act_three_initiator())
    return initiator, responder


class Handshakes:
    def __init__(self) -> None:
        self.initiator_key = PrivateKey(os.urandom(32))
        self.responder_key = PrivateKey(os.urandom(32))
        self.responder_pub = self.responder_key.public_key()
        initiator, responder = _handshake(
            self.initiator_key, self.responder_key, self.responder_pub
        )
        ok = (
            initiator.sk == responder.rk
            and initiator.rk == responder.sk
            and responder.remote_pubkey.serializeCompressed()
            == self.initiator_key.public_key().serializeCompressed()
        )
        if not ok:
            raise RuntimeError("pyln handshake self-check failed: keys do not match")

    def rate(self, min_time: float) -> float:
        ik, rk, rpub = self.initiator_key, self.responder_key, self.responder_pub
        count = 0
        start = time.perf_counter()
        deadline = start + min_time
        while True:
            _handshake(ik, rk, rpub)
            count += 1
            now = time.perf_counter()
            if now >= deadline:
                return count / (now - start)


class _Exact:
    """Socket shim for pyln: ``send`` sends everything and ``recv(n)`` returns n bytes
    (or fewer only at EOF).  pyln calls bare ``send``/``recv`` and treats a short length
    read as an error, which a streaming benchmark with a full TCP buffer can provoke."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def send(self, data: bytes) -> int:
        self.sock.sendall(data)
        return len(data)

    def recv(self, n: int) -> bytes:
        chunks: list[bytes] = []
        while n > 0:
            chunk = self.sock.recv(n)
            if not chunk:
                break
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        self.sock.close()


class Messages:
    """A connected client/server pair over loopback, set up once."""

    def __init__(self) -> None:
        server_key = PrivateKey(os.urandom(32))
        client_key = PrivateKey(os.urandom(32))
        self.listener = LightningServerSocket(server_key)
        self.listener.settimeout(IO_TIMEOUT)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        port = self.listener.getsockname()[1]
        accepted: list[Any] = []
        errors: list[BaseException] = []

        def accept() -> None:
            try:
                accepted.append(self.listener.accept()[0])
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        self.client = connect(client_key, server_key.public_key(), "127.0.0.1", port)
        thread.join(IO_TIMEOUT)
        if errors:
            raise errors[0]
        if not accepted:
            raise RuntimeError("pyln server did not accept the connection")
        self.server = accepted[0]
        for conn in (self.client, self.server):
            raw: socket.socket = conn.connection
            raw.settimeout(IO_TIMEOUT)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.connection = _Exact(raw)
        body = os.urandom(MESSAGE_SIZE - 1)
        self.normal = NORMAL + body
        self.last = LAST + body

    def rate(self, min_time: float) -> float:
        server, client = self.server, self.client
        result: list[float] = []
        errors: list[BaseException] = []

        def reader() -> None:
            try:
                count = 0
                while True:
                    m = server.read_message()
                    count += 1
                    if m[:1] == LAST:
                        result.extend((float(count), time.perf_counter()))
                        return
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        normal, last = self.normal, self.last
        start = time.perf_counter()
        deadline = start + min_time
        done = False
        while not done:
            for _ in range(BATCH - 1):
                client.send_message(normal)
            done = time.perf_counter() >= deadline or bool(errors)
            client.send_message(last if done else normal)
        thread.join(IO_TIMEOUT + min_time)
        if errors:
            raise errors[0]
        if thread.is_alive() or not result:
            raise RuntimeError("pyln reader did not finish")
        count, end = result
        return count / (end - start)

    def close(self) -> None:
        for conn in (self.client, self.server):
            conn.connection.close()
        self.listener.close()


def main() -> int:
    handshakes: Handshakes | None = None
    messages: Messages | None = None
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "quit":
            return 0
        try:
            if len(words) != 2:
                raise ValueError(f"expected '<metric> <min_time>', got {line.strip()!r}")
            metric, min_time = words[0], float(words[1])
            if metric == "handshakes":
                handshakes = handshakes or Handshakes()
                value = handshakes.rate(min_time)
            elif metric == "messages_1k":
                messages = messages or Messages()
                value = messages.rate(min_time)
            else:
                raise ValueError(f"unknown metric {metric!r}")
        except Exception as exc:
            if messages is not None and words[0] == "messages_1k":
                messages.close()  # the stream may be mid-message; start afresh next time
                messages = None
            traceback.print_exc(file=sys.stderr)
            sys.stderr.flush()
            print(f"error {type(exc).__name__}: {exc}", flush=True)
            continue
        print(repr(value), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
