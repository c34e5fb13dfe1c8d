"""``trustmesh botd``: BOTD #2 channels from the command line (JSON lines on stdout)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import click

from trustmesh.botd import DEFAULT_PORT, BotdConfig, HandshakeFailed
from trustmesh.cli.keys import KeySpec
from trustmesh.cli.limits import limit_options, pop_policy
from trustmesh.cli.output import emit, jsonl_stream_option, stdin_lines
from trustmesh.cli.params import HostPort
from trustmesh.cli.signals import stop_on_signals
from trustmesh.crypto.keys import KeyKind, PublicKey
from trustmesh.errors import ConnectionClosedError, InvalidKeyError
from trustmesh.io import botd as botd_io
from trustmesh.io.limits import ResourcePolicy
from trustmesh.keystore.signer import Signer
from trustmesh.keystore.uri import KeyKindMismatchError, open_signer
from trustmesh.sansio import ConnectionClosed


class PublicKeyHex(click.ParamType):  # type: ignore[type-arg]
    """A secp256k1 public key in hex (33-byte compressed or 65-byte uncompressed)."""

    name = "HEX"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, PublicKey):
            return value
        try:
            return PublicKey.from_bytes(KeyKind.SECP256K1, bytes.fromhex(str(value)))
        except (ValueError, InvalidKeyError) as exc:
            self.fail(f"not a secp256k1 public key in hex: {exc}", param, ctx)


KEY_OPTION = click.option(
    "--key",
    "key_spec",
    type=KeySpec(),
    required=True,
    help="This node's secp256k1 identity key: a key file, or a key on a PKCS#11 token "
    "(pkcs11:token=...;object=...). See `trustmesh keys generate`.",
)
PEER_KEY_OPTION = click.option(
    "--peer-key",
    type=PublicKeyHex(),
    required=True,
    help="The identity public key (hex) the peer must prove it holds.",
)


def _load_key(spec: str) -> Signer:
    """The identity key: it only signs (Init/Ack, Finished), so it may live on a token;
    each connection's ECDH uses a fresh software key (botd.keyschedule.EphemeralKey)."""
    try:
        return open_signer(spec, kinds={KeyKind.SECP256K1})
    except KeyKindMismatchError as exc:
        raise click.BadParameter(
            f"BOTD identities are secp256k1: {exc}", param_hint="'--key'"
        ) from None


async def _open(
    host: str, port: int, key: Signer, peer_key: PublicKey, config: BotdConfig | None = None
) -> botd_io.Channel:
    try:
        return await botd_io.connect(host, port, key, peer_key, config=config)
    except HandshakeFailed as exc:
        hint = ""
        if exc.by_peer:  # a responder refuses silently: say what usually causes it
            hint = " (is --peer-key the listener's key, and is our key on its allow-list?)"
        raise HandshakeFailed(
            f"handshake with {host}:{port} failed: {exc.reason}{hint}", by_peer=exc.by_peer
        ) from None


def _address(value: object) -> str | None:
    if isinstance(value, tuple) and len(value) >= 2:
        return f"{value[0]}:{value[1]}"
    return None


def _message(peer: PublicKey, data: bytes) -> dict[str, object]:
    event: dict[str, object] = {"event": "message", "peer_key": peer.hex()}
    try:
        event["data"] = data.decode("utf-8")
    except UnicodeDecodeError:
        event["data"] = data.decode("utf-8", errors="replace")
        event["data_hex"] = data.hex()
    return event


def _closed(peer: PublicKey | None, event: ConnectionClosed, **extra: object) -> None:
    emit(
        {
            "event": "closed",
            "peer_key": peer.hex() if peer else None,
            "reason": event.reason,
            "error": event.error,
            "by_peer": event.by_peer,
            **extra,
        },
        as_json=True,
    )


@click.group()
def botd() -> None:
    """BOTD #2 channels: secp256k1 identities, a signed Init/Ack handshake, AES-256-GCM.

    Every command prints one JSON object per line on stdout, each with an "event"
    field. Key files are read with the passphrase from $TRUSTMESH_PASSPHRASE (or the
    terminal); token PINs come from the URI's pin-source or $TRUSTMESH_PKCS11_PIN. The
    wire format is in docs/protocols/botd.md.

    \b
    Try it:
      trustmesh keys generate --type secp256k1 --out a.key --no-encrypt
      trustmesh keys generate --type secp256k1 --out b.key --no-encrypt
      trustmesh botd listen --key b.key --echo &
      B=$(trustmesh keys show b.key --json | jq -r .public_key)
      trustmesh botd ping 127.0.0.1:9945 --key a.key --peer-key "$B"

    \b
    The identity key may live on a PKCS#11 token (it signs there; each connection's
    ECDH key is a fresh software key). A TPM has no secp256k1, so tpm: URIs are refused.
      U='pkcs11:token=mesh;object=botd-a?pin-source=file:/run/pin'
      trustmesh keys generate --type secp256k1 --store "$U"
      trustmesh botd ping 127.0.0.1:9945 --key "$U" --peer-key "$B"
    """


@botd.command()
@KEY_OPTION
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--allow",
    type=PublicKeyHex(),
    multiple=True,
    help="Accept only this peer identity key (hex); repeat for more. Default: anyone.",
)
@click.option("--echo", is_flag=True, help="Send every message back to its sender.")
@jsonl_stream_option
@limit_options
def listen(
    key_spec: str,
    host: str,
    port: int,
    allow: tuple[PublicKey, ...],
    echo: bool,
    **limits: Any,
) -> None:
    """Accept BOTD #2 peers until interrupted (SIGINT: exit 130, or SIGTERM: exit 0).

    \b
    Events:
      listening    {host, port, public_key}   once, when the socket is bound
      established  {peer_key, remote}         a peer completed the handshake
      message      {peer_key, data}           data is UTF-8 (invalid bytes also as data_hex)
      closed       {peer_key, reason, ...}    a connection ended (peer_key null when the
                                              handshake failed)
    """
    policy = pop_policy(limits)
    key = _load_key(key_spec)
    config = BotdConfig(allow=frozenset(allow) if allow else None)
    asyncio.run(_listen(key, host, port, config, echo, policy))


async def _listen(
    key: Signer,
    host: str,
    port: int,
    config: BotdConfig,
    echo: bool,
    policy: ResourcePolicy,
) -> None:
    async def handler(channel: botd_io.Channel) -> None:
        peer = channel.peer_key
        remote = _address(channel.remote_address)
        emit({"event": "established", "peer_key": peer.hex(), "remote": remote}, as_json=True)
        async for data in channel:
            emit(_message(peer, data), as_json=True)
            if echo:
                with contextlib.suppress(ConnectionClosedError):  # reported below
                    await channel.send(data)
        _closed(peer, await channel.close("done"), remote=remote)

    def rejected(remote: object, reason: str) -> None:
        event = ConnectionClosed(reason, error=True)
        _closed(None, event, remote=_address(remote))

    stop = stop_on_signals()
    server = await botd_io.serve(
        key, handler, host, port, config=config, on_reject=rejected, policy=policy, name="botd"
    )
    async with server:
        emit(
            {
                "event": "listening",
                "host": host,
                "port": server.port,
                "public_key": key.public_key().hex(),
            },
            as_json=True,
        )
        await stop.wait()


@botd.command()
@click.argument("address", type=HostPort(DEFAULT_PORT))
@KEY_OPTION
@PEER_KEY_OPTION
@jsonl_stream_option
def connect(address: tuple[str, int], key_spec: str, peer_key: PublicKey) -> int:
    """Open a channel to ADDRESS, send each stdin line as a message, print replies.

    ADDRESS is HOST:PORT (HOST alone means port 9945; a bare port is refused).

    At the end of stdin the channel closes the protocol's way (Close, then the peer's
    Close), so replies already on their way are still printed. Exits 0 after an
    orderly close, 1 when the handshake fails or the channel breaks.

    \b
    Events: established {peer_key}, message {peer_key, data}, closed {reason}.
    """
    key = _load_key(key_spec)
    return asyncio.run(_connect(address, key, peer_key))


async def _connect(address: tuple[str, int], key: Signer, peer_key: PublicKey) -> int:
    host, port = address
    channel = await _open(host, port, key, peer_key)
    emit({"event": "established", "peer_key": peer_key.hex()}, as_json=True)

    async def print_messages() -> None:
        async for data in channel:
            emit(_message(peer_key, data), as_json=True)

    printer = asyncio.create_task(print_messages())
    lines = stdin_lines(asyncio.get_running_loop())
    while True:
        next_line = asyncio.ensure_future(lines.get())
        await asyncio.wait({next_line, printer}, return_when=asyncio.FIRST_COMPLETED)
        if not next_line.done():  # the peer closed the channel first
            next_line.cancel()
            break
        line = next_line.result()
        if line is None:
            break
        try:
            await channel.send(line)
        except ConnectionClosedError:
            break
    event = await channel.close("end of input")
    await printer
    _closed(peer_key, event)
    return 1 if event.error else 0


@botd.command()
@click.argument("address", type=HostPort(DEFAULT_PORT))
@KEY_OPTION
@PEER_KEY_OPTION
@click.option(
    "--timeout",
    default=10.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds to wait for the handshake and then for the pong.",
)
@jsonl_stream_option
def ping(address: tuple[str, int], key_spec: str, peer_key: PublicKey, timeout: float) -> None:
    """Handshake with ADDRESS, send one protocol Ping, print the round-trip time.

    ADDRESS is HOST:PORT (HOST alone means port 9945; a bare port is refused).

    Prints {"event": "pong", "rtt_ms": ...} and exits 0; exits 1 when the handshake
    fails or no pong comes back in time.
    """
    key = _load_key(key_spec)
    asyncio.run(_ping(address, key, peer_key, timeout))


async def _ping(address: tuple[str, int], key: Signer, peer_key: PublicKey, wait: float) -> None:
    host, port = address
    config = BotdConfig(handshake_timeout=wait, pong_timeout=wait)
    try:
        # The core bounds the handshake and the pong; this also bounds the TCP connect.
        async with asyncio.timeout(2 * wait + 1):
            channel = await _open(host, port, key, peer_key, config)
    except TimeoutError:
        raise ConnectionClosedError(f"could not connect to {host}:{port} in time") from None
    async with channel:
        rtt = await channel.ping()
    emit(
        {"event": "pong", "rtt_ms": round(rtt * 1000, 3), "peer_key": peer_key.hex()}, as_json=True
    )
