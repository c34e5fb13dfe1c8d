"""``trustmesh psec``: PSEC channels over UDP from the command line (JSON lines)."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import click
from cryptography import x509
from cryptography.x509.oid import NameOID

from trustmesh.cli.limits import limit_options, pop_policy
from trustmesh.cli.output import emit, stdin_lines
from trustmesh.cli.params import HostPort
from trustmesh.io.limits import ResourcePolicy
from trustmesh.io.psec import Address, PsecEndpoint, open_psec
from trustmesh.keystore.filestore import PASSPHRASE_ENV
from trustmesh.psec.channel import ChannelClosed, ChannelData, ChannelUp
from trustmesh.psec.frames import check_schemes
from trustmesh.psec.identity import AVAILABLE, PsecIdentity, dtls_identity
from trustmesh.sansio import Event
from trustmesh.tls import TlsConfig

DEFAULT_PORT = 9443


def _schemes(value: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    try:
        check_schemes(names)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--schemes") from None
    missing = [n for n in names if n not in AVAILABLE]
    if missing:
        raise click.BadParameter(
            f"{', '.join(missing)}: not available (this build has {', '.join(AVAILABLE)})",
            param_hint="--schemes",
        )
    return names


def _identity(
    cert: Path, key: Path, ca: Path, crl: Path | None, names: tuple[str, ...]
) -> PsecIdentity:
    passphrase = os.environ.get(PASSPHRASE_ENV)
    config = TlsConfig(
        cert_file=cert,
        key_file=key,
        ca_file=ca,
        crl_file=crl,
        key_passphrase=passphrase.encode() if passphrase else None,
    )
    return dtls_identity(config, names)


def _node_id(chain: tuple[x509.Certificate, ...]) -> str | None:
    names = chain[0].subject.get_attributes_for_oid(NameOID.COMMON_NAME) if chain else []
    return str(names[0].value) if names else None


def _report(address: Address, event: Event) -> None:
    remote = f"{address[0]}:{address[1]}"
    if isinstance(event, ChannelUp):
        emit(
            {
                "event": "negotiated",
                "scheme": event.scheme,
                "initiator": event.initiator,
                "peer_id": event.peer_id.to_base58(),
                "peer_node_id": _node_id(event.peer_chain),
                "remote": remote,
            },
            as_json=True,
        )
    elif isinstance(event, ChannelData):
        emit(
            {"event": "datagram", "data": event.data.decode("utf-8", "replace"), "remote": remote},
            as_json=True,
        )
    elif isinstance(event, ChannelClosed):
        kind = "rejected" if event.reason.startswith("negotiation failed") else "closed"
        emit({"event": kind, "reason": event.reason, "remote": remote}, as_json=True)


IDENTITY = [
    click.option(
        "--cert",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        required=True,
        help="This node's certificate chain (PEM), from the mesh CA.",
    ),
    click.option(
        "--key",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        required=True,
        help="Its private key (PEM, unencrypted or with $TRUSTMESH_PASSPHRASE).",
    ),
    click.option(
        "--ca",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        required=True,
        help="The mesh root certificate peers must chain to.",
    ),
    click.option(
        "--schemes",
        default=",".join(AVAILABLE),
        show_default=True,
        help="Schemes to propose or accept, in priority order, comma-separated.",
    ),
]


def _identity_options(function: Any) -> Any:
    for option in reversed(IDENTITY):
        function = option(function)
    return function


@click.group()
def psec() -> None:
    """PSEC: negotiate a datagram security scheme over UDP, then exchange datagrams.

    Identities are mesh certificates; a node's peer ID is the libp2p peer ID of its
    certificate's key (`trustmesh keys show --cert F`). After the scheme's handshake
    both sides exchange a confirm over the negotiation transcript, so a downgraded
    proposal is caught (docs/protocols/psec.md).

    \b
    trustmesh psec listen --port 9443 --cert b.crt --key b.key --ca ca.crt --echo
    echo hello | trustmesh psec connect 127.0.0.1:9443 --cert a.crt --key a.key --ca ca.crt
    """


@psec.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=click.IntRange(0, 65535))
@_identity_options
@click.option(
    "--crl",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A CRL (PEM or DER) whose revoked peers are refused.",
)
@click.option("--echo", is_flag=True, help="Send every datagram back to its sender.")
@limit_options
def listen(
    host: str,
    port: int,
    cert: Path,
    key: Path,
    ca: Path,
    schemes: str,
    crl: Path | None,
    echo: bool,
    **limits: Any,
) -> None:
    """Answer PSEC proposals until interrupted (SIGINT or SIGTERM).

    \b
    Events (JSON lines, each with "event"):
      listening   {host, port, peer_id}
      negotiated  {scheme, initiator, peer_id, peer_node_id, remote}  the channel is up
      datagram    {data, remote}
      rejected    {reason, remote}   no scheme in common, or the negotiation failed
      closed      {reason, remote}
    """
    policy = pop_policy(limits)
    identity = _identity(cert, key, ca, crl, _schemes(schemes))
    asyncio.run(_listen(identity, host, port, echo, policy))


async def _listen(
    identity: PsecIdentity, host: str, port: int, echo: bool, policy: ResourcePolicy
) -> None:
    endpoint: PsecEndpoint | None = None

    def on_event(address: Address, event: Event) -> None:
        _report(address, event)
        if echo and isinstance(event, ChannelData) and endpoint is not None:
            endpoint.send(address, event.data)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    endpoint = await open_psec(identity, host, port, on_event=on_event, policy=policy)
    emit(
        {
            "event": "listening",
            "host": host,
            "port": endpoint.port,
            "peer_id": identity.peer_id.to_base58(),
        },
        as_json=True,
    )
    try:
        await stop.wait()
    finally:
        endpoint.close()


@psec.command()
@click.argument("address", type=HostPort(DEFAULT_PORT))
@_identity_options
@click.option(
    "--timeout",
    default=10.0,
    show_default=True,
    type=click.FloatRange(0.1, 3600),
    help="Seconds for the authenticated channel to come up (and, with --once, for the echo).",
)
@click.option(
    "--once", is_flag=True, help="Exit 0 after one echoed datagram (stdin's first line, or 'ping')."
)
def connect(
    address: tuple[str, int],
    cert: Path,
    key: Path,
    ca: Path,
    schemes: str,
    timeout: float,
    once: bool,
) -> int:
    """Propose to ADDRESS, then send each stdin line as a datagram and print replies.

    Exits 0 when stdin ends after the channel came up (or, with --once, after one echoed
    datagram); 1 when no authenticated channel came up within --timeout, or it closed.

    \b
    Events: negotiated, datagram, rejected, closed (as for listen).
    """
    identity = _identity(cert, key, ca, None, _schemes(schemes))
    return asyncio.run(_connect(identity, address, timeout, once))


async def _connect(identity: PsecIdentity, address: Address, wait_s: float, once: bool) -> int:
    up, ended, echoed = asyncio.Event(), asyncio.Event(), asyncio.Event()

    def on_event(remote: Address, event: Event) -> None:
        _report(remote, event)
        if isinstance(event, ChannelUp):
            up.set()
        elif isinstance(event, ChannelData):
            echoed.set()
        elif isinstance(event, ChannelClosed):
            ended.set()

    host = "::" if ":" in address[0] else "0.0.0.0"  # noqa: S104 (the reply's way back)
    if address[0].startswith("127."):
        host = "127.0.0.1"
    endpoint = await open_psec(identity, host, 0, on_event=on_event)
    try:
        endpoint.connect(address)
        if not await _first(up, ended, wait_s) or ended.is_set():
            if not ended.is_set():
                emit({"event": "closed", "reason": f"no channel within {wait_s:g} s"}, as_json=True)
            return 1
        lines = stdin_lines(asyncio.get_running_loop())
        if once:
            line = await asyncio.wait_for(lines.get(), wait_s)
            endpoint.send(address, line or b"ping")
            return 0 if await _first(echoed, ended, wait_s) and not ended.is_set() else 1
        while (line := await lines.get()) is not None:
            if ended.is_set():
                return 1
            endpoint.send(address, line)
        return 0
    except TimeoutError:
        return 1
    finally:
        endpoint.close()


async def _first(wanted: asyncio.Event, ended: asyncio.Event, wait_s: float) -> bool:
    """Wait for ``wanted`` or ``ended``, at most ``wait_s`` seconds; True if either."""
    waits = [asyncio.ensure_future(wanted.wait()), asyncio.ensure_future(ended.wait())]
    done, pending = await asyncio.wait(waits, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    return bool(done)
