"""``trustmesh catalyst``: Catalyst peering from the command line (JSON lines on stdout)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import click
from cryptography import x509

from trustmesh.catalyst import messages as m
from trustmesh.catalyst.errors import PeeringFailed
from trustmesh.catalyst.jose import JwsSigner
from trustmesh.catalyst.policy import CedarPolicy
from trustmesh.catalyst.session import (
    DEFAULT_MIN_HOLD_TIME,
    DEFAULT_OPEN_TIMEOUT,
    CatalystConfig,
    Counters,
    KeepaliveReceived,
    NotificationEvent,
    Peer,
    SessionEstablished,
    identifier_in,
)
from trustmesh.cli.keys import FileKeyPath
from trustmesh.cli.limits import limit_options, pop_policy
from trustmesh.cli.output import emit, jsonl_stream_option
from trustmesh.cli.params import HostPort
from trustmesh.cli.signals import stop_on_signals
from trustmesh.io.catalyst import (
    DEFAULT_PORT,
    Backoff,
    CatalystNode,
    CrlFile,
    CrlSource,
    CrlUrl,
    Session,
)
from trustmesh.io.limits import ResourcePolicy
from trustmesh.keystore.filestore import passphrase_from_env_or_tty
from trustmesh.keystore.uri import SoftwareKeyRequiredError, require_file_key, store_name
from trustmesh.sansio import ConnectionClosed, Event
from trustmesh.tls import TlsConfig, TlsConfigError
from trustmesh.tls.context import key_is_encrypted
from trustmesh.tls.stream import certificate_names

MIN_PSK_BYTES = 16
CRL_FILE_INTERVAL = 5.0  # seconds between checks of a --crl file for changes
CRL_URL_INTERVAL = 60.0  # seconds between fetches from --crl-url


class PeerSpec(click.ParamType):  # type: ignore[type-arg]
    """ASN or ASN:ID, a permitted peer."""

    name = "ASN[:ID]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, Peer):
            return value
        asn_text, sep, ident = str(value).partition(":")
        try:
            asn = int(asn_text)
        except ValueError:
            self.fail(f"expected ASN or ASN:ID, got {value!r}", param, ctx)
        if not 0 < asn <= m.MAX_ASN:
            self.fail(f"ASN {asn} is outside 1..{m.MAX_ASN}", param, ctx)
        if sep and not 0 < len(ident) <= m.MAX_IDENTIFIER:
            self.fail(f"empty or overlong identifier in {value!r}", param, ctx)
        return Peer(asn, ident if sep else None)


class PskSpec(click.ParamType):  # type: ignore[type-arg]
    """KEYID:FILE, a pre-shared secret and the key id that names it."""

    name = "KEYID:FILE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, tuple):
            return value
        key_id, sep, file_name = str(value).partition(":")
        if not sep or not key_id or not file_name:
            self.fail(f"expected KEYID:FILE, got {value!r}", param, ctx)
        if len(key_id) > m.MAX_KEY_ID:
            self.fail(f"key id longer than {m.MAX_KEY_ID} characters", param, ctx)
        try:
            secret = Path(file_name).read_bytes().rstrip(b"\r\n")
        except OSError as exc:
            self.fail(f"cannot read PSK file {file_name}: {exc.strerror}", param, ctx)
        if len(secret) < MIN_PSK_BYTES:
            self.fail(
                f"the secret in {file_name} is {len(secret)} bytes; at least {MIN_PSK_BYTES} "
                "are needed (try: openssl rand -hex 32 > FILE)",
                param,
                ctx,
            )
        return key_id, secret


def _refuse_tls_device_key(spec: str) -> None:
    """The TLS key stays in software; the device holds the identity that authorizes it."""
    require_file_key(spec, "the Catalyst TLS key (--key)")


def _refuse_jws_device_key(spec: str) -> None:
    """joserfc signs the OPEN's JWS with the key in memory: it cannot reach a device."""
    raise SoftwareKeyRequiredError(
        f"the Catalyst JWS key (--jwks-key) must be a key file, not a {store_name(spec)} "
        "URI: the JWS over the OPEN is signed in software (joserfc)"
    )


def identity_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The options every catalyst command shares: who we are and whom we accept."""
    options = [
        click.option(
            "--cert",
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            required=True,
            help="Our certificate (PEM, chain allowed); its CN or a SAN must equal --id.",
        ),
        click.option(
            "--key",
            type=FileKeyPath(_refuse_tls_device_key, exists=True),
            required=True,
            help="The certificate's private key (PEM). If it is encrypted, the passphrase "
            "comes from $TRUSTMESH_PASSPHRASE or the terminal. A file, not a pkcs11: or "
            "tpm: URI: TLS keys stay in software (docs/protocols/keys.md).",
        ),
        click.option(
            "--ca",
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            required=True,
            help="CA bundle (PEM) that peer certificates must chain to.",
        ),
        click.option(
            "--crl",
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            help="A CRL (PEM or DER) that peer certificates are checked against. It is "
            "read again whenever it changes (checked every --crl-interval seconds, default "
            f"{CRL_FILE_INTERVAL:g}): new handshakes refuse a peer it revokes, and a live "
            "session with one ends with NOTIFICATION 6/241.",
        ),
        click.option(
            "--crl-url",
            metavar="URL",
            help="Fetch the CRL (PEM or DER) from this http(s) URL at start (the command "
            "fails if it cannot) and every --crl-interval seconds (default "
            f"{CRL_URL_INTERVAL:g}); each new one acts as a changed --crl file does. A CRL "
            "must be signed by a CA of --ca and no older than the one in use.",
        ),
        click.option(
            "--crl-interval",
            type=click.FloatRange(min=0, min_open=True),
            metavar="S",
            help=f"Seconds between CRL checks: default {CRL_URL_INTERVAL:g} for --crl-url, "
            f"{CRL_FILE_INTERVAL:g} for --crl.",
        ),
        click.option(
            "--asn", type=click.IntRange(1, m.MAX_ASN), required=True, help="Our AS number."
        ),
        click.option(
            "--id", "identifier", required=True, help="Our BGP identifier (node ID), e.g. node-01."
        ),
        click.option(
            "--allow",
            type=PeerSpec(),
            multiple=True,
            help="Permit this peer (AS number, optionally pinned to an identifier); repeat "
            "for more. Default: any peer whose certificate validates.",
        ),
        click.option(
            "--psk",
            type=PskSpec(),
            multiple=True,
            help="A pre-shared secret (at least 16 bytes, a trailing newline ignored) and its "
            "key id; repeat for more. listen: peers must prove one of them. connect: we "
            "prove the first.",
        ),
        click.option(
            "--jwks-key",
            type=FileKeyPath(_refuse_jws_device_key, exists=True),
            help="Sign our OPEN with this P-256 or Ed25519 private key (PEM); its public "
            "key goes in the OPEN's jwks.",
        ),
        click.option(
            "--require-jws", is_flag=True, help="Refuse peers whose OPEN carries no signature."
        ),
        click.option(
            "--policy",
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            help="Cedar policy file that decides who may peer (docs/protocols/catalyst.md).",
        ),
        click.option(
            "--hold-time",
            type=click.IntRange(0, m.MAX_HOLD_TIME),
            default=180,
            show_default=True,
            help="Hold time we offer in seconds: 0 (no keepalives) or 3..65535.",
        ),
        click.option(
            "--min-hold-time",
            type=click.IntRange(3, m.MAX_HOLD_TIME),
            default=DEFAULT_MIN_HOLD_TIME,
            show_default=True,
            help="Refuse (2/6) a peer whose OPEN offers a hold time below this.",
        ),
        click.option(
            "--allow-zero-hold",
            is_flag=True,
            help="Accept a peer's hold time of 0 (no hold timer: a silent peer is kept until "
            "TCP notices). Refused by default.",
        ),
        click.option(
            "--open-timeout",
            type=click.FloatRange(0, 240, min_open=True),
            default=DEFAULT_OPEN_TIMEOUT,
            show_default=True,
            help="Seconds to wait for the peer's OPEN, then for its confirming KEEPALIVE.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _build_node(options: dict[str, Any], *, dialer: bool) -> CatalystNode:
    """The node the options describe. PSKs work as in the spec's flow: the dialer proves
    its first key and the listener requires a proof (unless --psk-optional), so a refusal
    always comes from the listener, never from both sides at once."""
    psks: tuple[tuple[str, bytes], ...] = options["psk"]
    hold_time: int = options["hold_time"]
    if hold_time in (1, 2):
        raise click.BadParameter(
            "must be 0 or 3..65535 (1 and 2 are refused)", param_hint="'--hold-time'"
        )
    jws_key = None
    if options["jwks_key"] is not None:
        try:
            jws_key = JwsSigner.from_pem_file(options["jwks_key"])
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="'--jwks-key'") from None
    policy = None
    if options["policy"] is not None:
        try:
            policy = CedarPolicy.from_file(options["policy"])
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="'--policy'") from None
    config = CatalystConfig(
        my_asn=options["asn"],
        bgp_identifier=options["identifier"],
        hold_time=hold_time,
        permitted=tuple(options["allow"]),
        psk_secrets=dict(psks),
        psk_key_id=psks[0][0] if psks and dialer else None,
        require_psk=bool(psks) and not dialer and not options.get("psk_optional", False),
        jws_key=jws_key,
        require_jws=options["require_jws"],
        policy=policy,
        open_timeout=options["open_timeout"],
        min_hold_time=options["min_hold_time"],
        allow_zero_hold=options["allow_zero_hold"],
    )
    key_file: Path = options["key"]
    passphrase = None
    if key_is_encrypted(key_file.read_bytes()):
        passphrase = passphrase_from_env_or_tty(key_file, confirm=False)
    tls = TlsConfig(
        options["cert"], key_file, options["ca"], crl_file=options["crl"], key_passphrase=passphrase
    )
    node = CatalystNode(config, tls)
    _warn_if_not_ours(options["cert"], options["identifier"])
    return node


def _crl_source(options: dict[str, Any]) -> tuple[CrlSource, float] | None:
    """Where new CRLs come from (--crl or --crl-url) and how often to look."""
    crl_file: Path | None = options["crl"]
    url: str | None = options["crl_url"]
    interval: float | None = options["crl_interval"]
    if crl_file is not None and url is not None:
        raise click.UsageError("--crl and --crl-url exclude each other")
    if url is not None:
        if not url.startswith(("http://", "https://")):
            raise click.BadParameter("must be an http:// or https:// URL", param_hint="'--crl-url'")
        return CrlUrl(url), interval if interval is not None else CRL_URL_INTERVAL
    if crl_file is not None:
        return CrlFile(crl_file), interval if interval is not None else CRL_FILE_INTERVAL
    if interval is not None:
        raise click.UsageError("--crl-interval needs --crl or --crl-url")
    return None


@contextlib.asynccontextmanager
async def _crl_kept_current(
    node: CatalystNode, crl: tuple[CrlSource, float] | None
) -> AsyncIterator[None]:
    """Load the CRL now (failing the command if it cannot), then keep it current in the
    background: each new CRL prints a "crl" event, each failure a "crl-error" one."""
    if crl is None:
        yield
        return
    source, interval = crl
    try:
        first = await source.poll()
        if first is not None:
            node.apply_crl(first)
    except (OSError, ValueError, TlsConfigError, aiohttp.ClientError) as exc:
        await source.aclose()
        raise click.ClickException(f"cannot load the CRL from {source.name}: {exc}") from None

    def updated(new: x509.CertificateRevocationList, ended: list[Session]) -> None:
        emit(
            {
                "event": "crl",
                "source": source.name,
                "revoked": len(new),
                "last_update": new.last_update_utc.isoformat(),
                "sessions_ended": [s.peer_id or s.claimed_id for s in ended],
            },
            as_json=True,
        )

    def failed(exc: BaseException) -> None:
        emit({"event": "crl-error", "source": source.name, "reason": str(exc)}, as_json=True)

    keeper = asyncio.ensure_future(
        node.keep_crl_current(source, interval, on_update=updated, on_error=failed)
    )
    try:
        yield
    finally:
        keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeper


def _warn_if_not_ours(cert_file: Path, identifier: str) -> None:
    try:
        names = certificate_names(x509.load_pem_x509_certificate(cert_file.read_bytes()), ips=True)
    except ValueError:
        return  # TlsContext loaded it, so this is a format corner we need not second-guess
    if not identifier_in(identifier, names):
        click.echo(
            f"trustmesh: warning: --id {identifier!r} is not in {cert_file} (CN/SAN: "
            f"{', '.join(sorted(names)) or 'none'}); peers will refuse us with NOTIFICATION 2/3",
            err=True,
        )


def _address(value: object) -> str | None:
    if isinstance(value, tuple) and len(value) >= 2:
        return f"{value[0]}:{value[1]}"
    return None


def _print_event(session: Session, event: Event) -> None:
    """One JSON line per session event."""
    remote = _address(session.remote_address)
    if isinstance(event, SessionEstablished):
        tls = session.tls
        emit(
            {
                "event": "established",
                "peer_id": event.peer_id,
                "peer_asn": event.peer_asn,
                "hold_time": event.hold_time,
                "remote": remote,
                "group": tls.group if tls else None,
                "resumed": tls.resumed if tls else False,
            },
            as_json=True,
        )
    elif isinstance(event, NotificationEvent):
        emit(
            {
                "event": "notification",
                "code": event.code,
                "subcode": event.subcode,
                "direction": event.direction,
                "message": event.message,
                "peer_id": session.peer_id,
                "claimed_id": session.claimed_id,
                "remote": remote,
            },
            as_json=True,
        )
    elif isinstance(event, KeepaliveReceived):
        emit(
            {"event": "keepalive", "direction": "received", "peer_id": session.peer_id},
            as_json=True,
        )
    elif isinstance(event, ConnectionClosed):
        emit(
            {
                "event": "closed",
                "peer_id": session.peer_id,
                "claimed_id": session.claimed_id,
                "reason": event.reason,
                "error": event.error,
                "by_peer": event.by_peer,
                "remote": remote,
            },
            as_json=True,
        )


@click.group()
def catalyst() -> None:
    """Catalyst peering: TLS 1.3 mTLS, OPEN / KEEPALIVE / NOTIFICATION, PSK and JWS.

    Each side presents a certificate whose CN or SAN is its --id; the peer checks it,
    the AS number (--allow), a PSK proof bound to the TLS session (--psk), a signature
    over the OPEN (--jwks-key, --require-jws) and a Cedar policy (--policy). A failed
    check sends a NOTIFICATION (code/subcode as RFC 4271, docs/protocols/catalyst.md)
    and closes.

    Every command prints one JSON object per line on stdout, each with an "event" field:
    established {peer_id, peer_asn, hold_time}, notification {code, subcode, direction},
    keepalive, closed {reason}; listen first prints listening {host, port}. With --crl or
    --crl-url, each new CRL prints crl {revoked, sessions_ended} (the sessions it revoked
    end with NOTIFICATION 6/241), and a CRL that cannot be used prints crl-error {reason}.
    A session also ends (6/240) when its peer's certificate or ours expires.

    \b
    Try it (certificates from any CA, openssl included):
      trustmesh catalyst listen --cert b.crt --key b.key --ca ca.crt --asn 65002 --id node-b &
      trustmesh catalyst connect 127.0.0.1:9179 --cert a.crt --key a.key --ca ca.crt \\
          --asn 65001 --id node-a --once
    """


@catalyst.command()
@identity_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    default=DEFAULT_PORT,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Port to listen on (0: any free port, printed in the listening event).",
)
@click.option(
    "--psk-optional",
    is_flag=True,
    help="Check the PSK proof of peers that send one, but let peers without one in (for a "
    "--policy that decides with context.psk).",
)
@jsonl_stream_option
@limit_options
def listen(host: str, port: int, psk_optional: bool, **options: Any) -> None:
    """Accept peers until interrupted.

    SIGINT or SIGTERM ceases every session (6/2), prints a last "stopped" event with the
    node's counters, and exits 0 (130 after SIGINT, as for any Ctrl-C)."""
    if psk_optional and not options["psk"]:
        raise click.UsageError("--psk-optional needs at least one --psk")
    policy = pop_policy(options)
    crl = _crl_source(options)
    node = _build_node({**options, "psk_optional": psk_optional}, dialer=False)
    asyncio.run(_listen(node, host, port, policy, crl))


async def _listen(
    node: CatalystNode,
    host: str,
    port: int,
    policy: ResourcePolicy,
    crl: tuple[CrlSource, float] | None = None,
) -> None:
    stop = stop_on_signals()
    async with _crl_kept_current(node, crl):
        await _serve_until_stopped(node, host, port, policy, stop)
    emit({"event": "stopped", **counters_json(node.counters)}, as_json=True)


async def _serve_until_stopped(
    node: CatalystNode, host: str, port: int, policy: ResourcePolicy, stop: asyncio.Event
) -> None:
    server = await node.serve(host=host, port=port, listener=_print_event, policy=policy)
    async with server:
        emit(
            {
                "event": "listening",
                "host": host,
                "port": server.port,
                "id": node.config.bgp_identifier,
            },
            as_json=True,
        )
        await stop.wait()


def counters_json(counters: Counters) -> dict[str, Any]:
    """The node's counters, NOTIFICATIONs keyed "code/subcode"."""
    return {
        "sessions_established": counters.sessions_established,
        "hold_timer_expiries": counters.hold_timer_expiries,
        "notifications_sent": {f"{c}/{s}": n for (c, s), n in counters.notifications_sent.items()},
        "notifications_received": {
            f"{c}/{s}": n for (c, s), n in counters.notifications_received.items()
        },
    }


@catalyst.command()
@click.argument("address", type=HostPort(DEFAULT_PORT))
@identity_options
@click.option(
    "--once",
    is_flag=True,
    help="Exit 0 as soon as the session is Established (OPEN and KEEPALIVE each way), "
    "after ceasing it (6/2).",
)
@click.option(
    "--reconnect",
    is_flag=True,
    help="Keep the session up: redial after 1 s, 2 s, 4 s ... up to 60 s whenever it "
    "fails or ends. Runs until interrupted.",
)
@click.option(
    "--timeout",
    default=30.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds to reach Established.",
)
@jsonl_stream_option
def connect(
    address: tuple[str, int], once: bool, reconnect: bool, timeout: float, **options: Any
) -> int:
    """Peer with ADDRESS (HOST:PORT; HOST alone means port 9179; a bare port is refused).

    Exits 0 after --once or SIGTERM, 130 after SIGINT (both cease the session, 6/2); exits
    1 on any NOTIFICATION from a failed check, a TLS failure, or a session the peer ends.
    """
    if once and reconnect:
        raise click.UsageError("--once and --reconnect exclude each other")
    crl = _crl_source(options)
    node = _build_node(options, dialer=True)

    async def run() -> int:
        async with _crl_kept_current(node, crl):
            if reconnect:
                return await _maintain(node, address)
            return await _connect(node, address, once, timeout)

    return asyncio.run(run())


async def _connect(node: CatalystNode, address: tuple[str, int], once: bool, within: float) -> int:
    host, port = address
    reported = False  # whether a "closed" event is out already

    def listener(session: Session, event: Event) -> None:
        nonlocal reported
        reported = reported or isinstance(event, ConnectionClosed)
        _print_event(session, event)

    stop = stop_on_signals()  # before dialling: a signal must never find asyncio's default
    stopping = asyncio.ensure_future(stop.wait())
    connecting = asyncio.ensure_future(
        node.connect(host, port, connect_timeout=within, listener=listener)
    )
    await asyncio.wait({connecting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not connecting.done():
        connecting.cancel()  # aborts the half-made session
        with contextlib.suppress(asyncio.CancelledError, PeeringFailed, OSError):
            await connecting
        if not reported:
            emit(
                {"event": "closed", "peer_id": None, "reason": "interrupted", "error": True},
                as_json=True,
            )
        return 1
    try:
        session = connecting.result()
    except (PeeringFailed, OSError) as exc:
        stopping.cancel()
        if not reported:
            reason = str(exc)
            if isinstance(exc, OSError):
                reason = f"cannot connect to {host}:{port}: {exc.strerror or exc}"
            emit(
                {"event": "closed", "peer_id": None, "reason": reason, "error": True}, as_json=True
            )
        return 1
    if once:
        stopping.cancel()
        await session.close("--once: established")
        return 0
    ended = asyncio.ensure_future(session.wait_closed())
    await asyncio.wait({stopping, ended}, return_when=asyncio.FIRST_COMPLETED)
    if ended.done():
        stopping.cancel()
        return 1
    await session.close("interrupted")
    return 0


async def _maintain(node: CatalystNode, address: tuple[str, int]) -> int:
    host, port = address

    def failed(exc: BaseException, delay: float) -> None:
        reason = str(exc)
        if isinstance(exc, OSError):
            reason = f"cannot connect to {host}:{port}: {exc.strerror or exc}"
        emit({"event": "retry", "reason": reason, "delay_s": round(delay, 3)}, as_json=True)

    stop = stop_on_signals()
    keeper = asyncio.ensure_future(
        node.maintain(host, port, backoff=Backoff(), listener=_print_event, on_failure=failed)
    )
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({keeper, stopping}, return_when=asyncio.FIRST_COMPLETED)
    keeper.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await keeper
    for session in node.sessions:
        await session.close("interrupted")
    return 0
