"""``trustmesh psec``: PSEC channels over UDP from the command line (JSON lines)."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from cryptography import x509
from cryptography.x509.oid import NameOID

from trustmesh.cli.keys import FileKeyPath
from trustmesh.cli.limits import limit_options, pop_policy
from trustmesh.cli.output import emit, jsonl_stream_option, stdin_lines
from trustmesh.cli.params import HostPort
from trustmesh.cli.signals import stop_on_signals
from trustmesh.io.limits import ResourcePolicy
from trustmesh.io.psec import Address, PsecEndpoint, open_psec
from trustmesh.keystore.filestore import configured_passphrase
from trustmesh.keystore.uri import require_file_key
from trustmesh.psec.channel import ChannelClosed, ChannelData, ChannelUp
from trustmesh.psec.frames import check_schemes
from trustmesh.psec.identity import AVAILABLE, PsecIdentity, psec_identity
from trustmesh.sansio import Event
from trustmesh.tls import TlsConfig
from trustmesh.tls.context import check_crl, parse_crl
from trustmesh.tls.errors import TlsConfigError

DEFAULT_PORT = 9443
CRL_POLL = 2.0  # seconds between checks of a --crl file for changes


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
    cert: Path,
    key: Path,
    ca: Path,
    crl: Path | None,
    names: tuple[str, ...],
    is_revoked: Callable[[int], bool] | None = None,
) -> PsecIdentity:
    # Never a prompt: stdin carries the channel's data.
    passphrase = configured_passphrase()  # --passphrase-file, $TRUSTMESH_PASSPHRASE ...
    config = TlsConfig(
        cert_file=cert,
        key_file=key,
        ca_file=ca,
        crl_file=crl,
        key_passphrase=None if passphrase is None else passphrase.value,
        is_revoked=is_revoked,
    )
    return psec_identity(config, names)


class CrlWatch:
    """The CRL of a ``--crl`` file, read again when its modification time, size or inode
    changes (an atomic rename counts too). A new CRL must be signed by a CA we know (the
    CA bundle, or the issuing CA in our own chain file) and be no older than the one in
    use: a replayed old CRL must not lift a revocation."""

    def __init__(self, path: Path, cert: Path, ca: Path) -> None:
        self.path = path
        self.ca = ca
        self.own_issuers = x509.load_pem_x509_certificates(cert.read_bytes())[1:]
        self.crl: x509.CertificateRevocationList | None = None
        self._seen: tuple[int, int, int] | None = None

    def is_revoked(self, serial: int) -> bool:
        crl = self.crl
        return crl is not None and crl.get_revoked_certificate_by_serial_number(serial) is not None

    def poll(self) -> x509.CertificateRevocationList | None:
        """The new CRL, now in use, if the file changed; else None. Raises ``OSError``,
        ``ValueError`` (not a CRL) or ``TlsConfigError`` (refused; the old one stays)."""
        stat = os.stat(self.path)
        key = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        if key == self._seen:
            return None
        self._seen = key  # a file that does not parse is not read again until it changes
        crl = parse_crl(self.path.read_bytes())  # as TlsConfig.crl_file is read
        check_crl(crl, self.ca, also=self.own_issuers)
        if self.crl is not None and crl.last_update_utc < self.crl.last_update_utc:
            raise TlsConfigError(
                f"the CRL was issued at {crl.last_update_utc:%Y-%m-%dT%H:%M:%SZ}, before the "
                f"one in use ({self.crl.last_update_utc:%Y-%m-%dT%H:%M:%SZ})"
            )
        self.crl = crl
        return crl


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


def _refuse_tls_device_key(spec: str) -> None:
    """The TLS key stays in software; the device holds the identity that authorizes it."""
    require_file_key(spec, "the PSEC TLS key (--key)")


IDENTITY = [
    click.option(
        "--cert",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        required=True,
        help="This node's certificate chain (PEM), from the mesh CA.",
    ),
    click.option(
        "--key",
        type=FileKeyPath(_refuse_tls_device_key, exists=True),
        required=True,
        help="Its private key (PEM, unencrypted or with the passphrase of --passphrase-file"
        " or $TRUSTMESH_PASSPHRASE). A file, "
        "not a pkcs11: or tpm: URI: TLS keys stay in software (docs/protocols/keys.md).",
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
    help=(
        "A CRL (PEM or DER) whose revoked peers are refused. The file is checked for "
        f"changes every {CRL_POLL:g} s; a new CRL (signed by a CA we know, and no older "
        "than the one in use) also closes every up channel whose peer it revokes."
    ),
)
@click.option("--echo", is_flag=True, help="Send every datagram back to its sender.")
@jsonl_stream_option
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
      closed      {reason, remote}   "the peer's certificate was revoked" after a new CRL
      crl         {source, revoked, last_update}   a changed --crl file is in use
      crl-error   {source, reason}   a changed --crl file was refused; the old CRL stays
    """
    policy = pop_policy(limits)
    names = _schemes(schemes)
    watch: CrlWatch | None = None
    if crl is not None:
        try:
            watch = CrlWatch(crl, cert, ca)
            watch.poll()
        except (OSError, ValueError, TlsConfigError) as exc:
            raise click.ClickException(f"cannot load the CRL {crl}: {exc}") from None
    is_revoked = watch.is_revoked if watch is not None else None
    identity = _identity(cert, key, ca, crl, names, is_revoked)
    asyncio.run(_listen(identity, host, port, echo, policy, watch))


async def _listen(
    identity: PsecIdentity,
    host: str,
    port: int,
    echo: bool,
    policy: ResourcePolicy,
    watch: CrlWatch | None,
) -> None:
    endpoint: PsecEndpoint | None = None

    def on_event(address: Address, event: Event) -> None:
        _report(address, event)
        if echo and isinstance(event, ChannelData) and endpoint is not None:
            endpoint.send(address, event.data)

    stop = stop_on_signals()
    endpoint = await open_psec(
        identity,
        host,
        port,
        on_event=on_event,
        policy=policy,
        is_revoked=watch.is_revoked if watch is not None else None,
    )
    emit(
        {
            "event": "listening",
            "host": host,
            "port": endpoint.port,
            "peer_id": identity.peer_id.to_base58(),
        },
        as_json=True,
    )
    poller = _CrlPoller(watch, identity, endpoint) if watch is not None else None
    try:
        await stop.wait()
    finally:
        if poller is not None:
            poller.cancel()
        endpoint.close()


class _CrlPoller:
    """Checks a --crl file every CRL_POLL seconds on a loop timer; a new CRL is put in
    use (new handshakes ask it) and the endpoint closes the channels it revokes."""

    def __init__(self, watch: CrlWatch, identity: PsecIdentity, endpoint: PsecEndpoint) -> None:
        self.watch = watch
        self.identity = identity
        self.endpoint = endpoint
        self._loop = asyncio.get_running_loop()
        self._timer = self._loop.call_later(CRL_POLL, self._check)

    def cancel(self) -> None:
        self._timer.cancel()

    def _check(self) -> None:
        source = str(self.watch.path)
        try:
            crl = self.watch.poll()
            if crl is not None:
                # The handshakes' own CRL too: the one loaded at start expires (its
                # next update), and OpenSSL then refuses every peer.
                self.identity.replace_crl(crl)
        except (OSError, ValueError, TlsConfigError) as exc:
            emit({"event": "crl-error", "source": source, "reason": str(exc)}, as_json=True)
        else:
            if crl is not None:
                emit(
                    {
                        "event": "crl",
                        "source": source,
                        "revoked": len(crl),
                        "last_update": crl.last_update_utc.isoformat(),
                    },
                    as_json=True,
                )
                self.endpoint.revalidate()  # each channel closed prints a "closed" event
        self._timer = self._loop.call_later(CRL_POLL, self._check)


@psec.command()
@click.argument("address", type=HostPort(DEFAULT_PORT))
@_identity_options
@click.option(
    "--host",
    help=(
        "Local address to bind (default: 127.0.0.1 for a 127.x ADDRESS, :: for IPv6, else 0.0.0.0)."
    ),
)
@click.option(
    "--port",
    default=0,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Local UDP port to bind (0: any free port).",
)
@click.option(
    "--simultaneous",
    is_flag=True,
    help=(
        "The peer at ADDRESS proposes to us at the same time (both run connect --port "
        "with each other's port): its proposal joins our channel and the tie rule picks "
        "the initiator. Needs --port."
    ),
)
@click.option(
    "--echo",
    is_flag=True,
    help=(
        "Send every datagram received back to the peer. Stdin's lines still go as "
        "datagrams, and the channel is kept after stdin ends, until it closes or SIGINT "
        "or SIGTERM. Give it to one side only: two echoing sides echo each other forever."
    ),
)
@click.option(
    "--timeout",
    default=10.0,
    show_default=True,
    type=click.FloatRange(0.1, 3600),
    help="Seconds for the authenticated channel to come up (and, with --once, for the echo).",
)
@click.option(
    "--once",
    is_flag=True,
    help=(
        "Exit 0 after one echoed datagram (stdin's first line, or 'ping'); with --echo, "
        "after echoing the first datagram received (stdin is not read)."
    ),
)
@jsonl_stream_option
def connect(
    address: tuple[str, int],
    cert: Path,
    key: Path,
    ca: Path,
    schemes: str,
    host: str | None,
    port: int,
    simultaneous: bool,
    echo: bool,
    timeout: float,
    once: bool,
) -> int:
    """Propose to ADDRESS, then send each stdin line as a datagram and print replies.

    ADDRESS is HOST:PORT (HOST alone means port 9443; a bare port is refused).

    Exits 0 when stdin ends after the channel came up (or, with --once, after one echoed
    datagram); 1 when no authenticated channel came up within --timeout, or it closed.
    With --echo, exits 0 on SIGTERM, 130 on SIGINT (or 0, with --once, once it echoed).

    \b
    Simultaneous negotiation (two peers, each dialling the other; one echoes):
      trustmesh psec connect 10.0.0.2:9001 --port 9002 --simultaneous --echo ...
      echo hi | trustmesh psec connect 10.0.0.1:9002 --port 9001 --simultaneous --once ...

    \b
    Events: negotiated, datagram, rejected, closed (as for listen).
    """
    if simultaneous and port == 0:
        raise click.UsageError(
            "--simultaneous needs --port: the peer must know where to send its proposal"
        )
    identity = _identity(cert, key, ca, None, _schemes(schemes))
    address = _resolved(address)
    if host is None:
        host = "::" if ":" in address[0] else "0.0.0.0"  # noqa: S104 (the reply's way back)
        if address[0].startswith("127."):
            host = "127.0.0.1"
    return asyncio.run(_connect(identity, address, timeout, once, host, port, simultaneous, echo))


def _resolved(address: Address) -> Address:
    """ADDRESS with its host name resolved: replies come from an IP address, and the
    channel is keyed by the address it was dialled at."""
    try:
        infos = socket.getaddrinfo(address[0], address[1], type=socket.SOCK_DGRAM)
    except OSError as exc:
        raise click.BadParameter(
            f"cannot resolve {address[0]}: {exc}", param_hint="ADDRESS"
        ) from None
    infos.sort(key=lambda info: info[0] != socket.AF_INET)  # as listen's default host
    sockaddr = infos[0][4]
    return (str(sockaddr[0]), int(sockaddr[1]))


async def _connect(
    identity: PsecIdentity,
    address: Address,
    wait_s: float,
    once: bool,
    host: str,
    port: int,
    simultaneous: bool,
    echo: bool,
) -> int:
    up, ended, received = asyncio.Event(), asyncio.Event(), asyncio.Event()
    bound: list[PsecEndpoint] = []

    def dial(endpoint: PsecEndpoint) -> None:
        # Before the socket reads anything: the peer's proposal, if it proposes too,
        # can only find the channel this makes.
        bound.append(endpoint)
        endpoint.connect(address, simultaneous=simultaneous)

    def on_event(remote: Address, event: Event) -> None:
        if remote != address:
            return  # another peer that proposed to our port: not the channel we dial
        _report(remote, event)
        if isinstance(event, ChannelUp):
            up.set()
        elif isinstance(event, ChannelData):
            if echo:
                bound[0].send(remote, event.data)
            received.set()
        elif isinstance(event, ChannelClosed):
            ended.set()

    # With --echo it serves until interrupted: SIGINT and SIGTERM end it cleanly.
    stop = stop_on_signals() if echo else asyncio.Event()
    endpoint = await open_psec(identity, host, port, on_event=on_event, on_bound=dial)
    try:
        if not await _first(wait_s, up, ended, stop) or ended.is_set():
            if not ended.is_set():
                emit({"event": "closed", "reason": f"no channel within {wait_s:g} s"}, as_json=True)
            return 1
        if stop.is_set():  # interrupted: fine once up, a failure before
            return 0 if up.is_set() else 1
        if once and echo:
            await _first(wait_s, received, ended, stop)
            return 0 if received.is_set() else 1  # a close after it changes nothing
        lines = stdin_lines(asyncio.get_running_loop())
        if once:
            line = await asyncio.wait_for(lines.get(), wait_s)
            endpoint.send(address, line or b"ping")
            await _first(wait_s, received, ended)
            return 0 if received.is_set() else 1  # (the peer may close right after)
        while (line := await _next_line(lines, ended, stop)) is not None:
            endpoint.send(address, line)
        if echo and not ended.is_set():
            await _first(None, ended, stop)  # stdin is done; the echo goes on
        return 1 if ended.is_set() else 0
    except TimeoutError:
        return 1
    finally:
        endpoint.close()


async def _next_line(lines: asyncio.Queue[bytes | None], *ends: asyncio.Event) -> bytes | None:
    """The next line of stdin; None when stdin ends, or one of ``ends`` is set first."""
    getter = asyncio.ensure_future(lines.get())
    waits = [asyncio.ensure_future(end.wait()) for end in ends]
    await asyncio.wait((getter, *waits), return_when=asyncio.FIRST_COMPLETED)
    for task in (getter, *waits):
        task.cancel()
    if any(end.is_set() for end in ends) or not getter.done() or getter.cancelled():
        return None
    return getter.result()


async def _first(wait_s: float | None, *events: asyncio.Event) -> bool:
    """Wait until one of ``events`` is set, at most ``wait_s`` seconds (None: no limit);
    True if one is."""
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    done, pending = await asyncio.wait(waits, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    return bool(done)
