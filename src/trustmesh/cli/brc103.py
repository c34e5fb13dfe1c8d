"""``trustmesh brc103``: BRC-103 mutual authentication over HTTP (BRC-104) and Socket.IO,
and BRC-52 certificates, from the command line."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
import sys
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from click.decorators import FC

from trustmesh.api.authfetch import AuthFetch
from trustmesh.api.brc104 import CERTIFICATE_GRACE_MS, SESSION_IDLE_MS, Brc104Server
from trustmesh.api.brc104_demo import demo_app
from trustmesh.brc103.certificates import (
    NO_REVOCATION,
    MasterCertificate,
    VerifiableCertificate,
    is_revocable,
)
from trustmesh.brc103.errors import CertificateError, CertificateFormatError, TransportError
from trustmesh.brc103.messages import MAX_MESSAGE_SIZE, NO_REQUEST, RequestedCertificates
from trustmesh.brc103.peer import PeerConfig
from trustmesh.brc103.revocation import (
    LocalRevocationRegistry,
    NoRevocationCheck,
    RevocationChecker,
    check_revocation,
)
from trustmesh.brc103.wallet import Wallet
from trustmesh.cli.keys import FileKeyPath
from trustmesh.cli.limits import limit_options, pop_policy
from trustmesh.cli.output import emit, jsonl_stream_option
from trustmesh.cli.signals import stop_on_signals
from trustmesh.crypto.brc42 import parse_public_key
from trustmesh.crypto.keys import Secp256k1PrivateKey
from trustmesh.errors import DecodeError, InvalidKeyError
from trustmesh.io.brc103_socketio import (
    DEFAULT_PATH,
    SocketIoClient,
    SocketIoServer,
    echo_events,
)
from trustmesh.io.brc103_socketio import connect as socket_connect
from trustmesh.io.limits import ResourcePolicy
from trustmesh.keystore.filestore import FileKeyStore, check_permissions
from trustmesh.keystore.uri import SoftwareKeyRequiredError, store_name
from trustmesh.wire.jsonwire import strict_loads


def load_wallet(path: Path | None) -> Wallet:
    """A wallet from a key file: a secp256k1 PEM key (``trustmesh keys generate --type
    secp256k1``) or 64 hex digits; a fresh random identity without a file."""
    if path is None:
        return Wallet.generate()
    try:
        head = path.read_bytes()[:200].strip()
    except OSError as exc:
        raise click.BadParameter(f"cannot read {path}: {exc.strerror}") from None
    if len(head) == 64 and all(c in b"0123456789abcdefABCDEF" for c in head):
        check_permissions(path)  # a private key in hex is as secret as a PEM one
        return Wallet.from_hex(head.decode())
    key = FileKeyStore().load(path)
    if not isinstance(key, Secp256k1PrivateKey):
        raise click.BadParameter(f"BRC-103 needs a secp256k1 key, {path} holds {key.kind}")
    return Wallet(key)


def refuse_device_key(spec: str) -> None:
    """BRC-103 identities stay in files: every signature is made by a BRC-42 child key,
    identity private key + HMAC(ECDH shared secret, invoice) mod n. A token or TPM
    signs only with the key it holds and never releases its scalar, so it cannot
    make that sum; only the ECDH half could run on it."""
    raise SoftwareKeyRequiredError(
        f"a BRC-103 identity cannot be a {store_name(spec)} key: BRC-103 signs with "
        "BRC-42 child keys (identity private key + HMAC(shared secret, invoice) mod n), "
        "which a device cannot compute without releasing its private scalar; use a key "
        "file (trustmesh keys generate --type secp256k1 --out id.key)"
    )


KEY_OPTION = click.option(
    "--key",
    "key_file",
    type=FileKeyPath(refuse_device_key),
    help="Identity key file: secp256k1 PEM, or 64 hex digits. Default: a new random "
    "identity. Not a device URI: BRC-42 child keys need the private scalar.",
)


def _public_key_hex(value: str, what: str) -> str:
    text = value.strip().lower()
    if len(text) != 66 or text[:2] not in ("02", "03"):
        raise click.BadParameter(f"{what} must be a compressed public key: 66 hex digits")
    try:
        parse_public_key(bytes.fromhex(text))
    except (ValueError, InvalidKeyError) as exc:
        raise click.BadParameter(f"{what}: {exc}") from None
    return text


@click.group()
def brc103() -> None:
    """BRC-103 mutual authentication and selective-disclosure certificates.

    Identities are secp256k1 keys: `--key` takes a PEM key file (`trustmesh keys generate
    --type secp256k1 --out id.key`) or a file holding the private key as 64 hex digits.
    Not a pkcs11: or tpm: URI: BRC-103 signs with BRC-42 child keys (identity key +
    HMAC(shared secret, invoice) mod n), which a device cannot make without giving up
    its private scalar.
    The wire format and every place we are stricter than the reference SDKs are in
    docs/protocols/brc103.md.

    \b
    Try it:
      trustmesh brc103 serve --port 8103 &
      trustmesh brc103 fetch http://127.0.0.1:8103/hello
      trustmesh brc103 fetch http://127.0.0.1:8103/echo -d '{"a":1}'
      trustmesh brc103 socket http://127.0.0.1:8103 --event hello --data '{"a":1}'
    """


# --- serve ----------------------------------------------------------------------------


CERTIFICATE_OPTION = click.option(
    "--certificate",
    "certificate_files",
    multiple=True,
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="A master certificate of ours (from `cert issue`) to show when asked; repeatable.",
)
REQUEST_OPTION = click.option(
    "--request-certificates",
    "requested_json",
    default=None,
    metavar="JSON",
    help='Ask the peer for certificates: {"certifiers": [HEX...], "types": {TYPE: [FIELD...]}};'
    " a TYPE is base64 (32 bytes) or a name, as `cert issue --type` takes it.",
)


MAX_REQUEST_JSON = 64 * 1024


def _types_by_name(text: str) -> str:
    """The request with each certificate type given by name turned into its base64 id,
    as `cert issue --type NAME` makes it (base64 types pass as they are)."""
    try:
        data = strict_loads(text.encode(), max_size=MAX_REQUEST_JSON)
    except (DecodeError, ValueError):
        return text  # the parser below says what is wrong
    types = data.get("types") if isinstance(data, dict) else None
    if isinstance(types, dict):
        data["types"] = {_certificate_type(str(k)): v for k, v in types.items()}
    return json.dumps(data)


def _peer_config(
    requested_json: str | None, certificate_files: tuple[Path, ...], *, server: bool
) -> PeerConfig:
    requested = NO_REQUEST
    if requested_json is not None:
        try:
            requested = RequestedCertificates.from_text(_types_by_name(requested_json))
        except DecodeError as exc:
            raise click.BadParameter(str(exc), param_hint="--request-certificates") from None
    masters = [MasterCertificate.from_json(_read_json(path)) for path in certificate_files]
    return PeerConfig(
        requested_certificates=requested,
        certificates=masters,
        session_idle_ms=SESSION_IDLE_MS if server else None,
    )


def _revocations_option(whose: str) -> Callable[[FC], FC]:
    return click.option(
        "--revocations",
        type=click.Path(dir_okay=False, exists=True, path_type=Path),
        help=f"A local revocation registry (SQLite, made by `cert revoke`) that {whose} "
        "must pass. Without it (or --no-revocation-check) a certificate whose revocation "
        "outpoint is not the 36 zero bytes is refused.",
    )


NO_REVOCATION_CHECK_OPTION = click.option(
    "--no-revocation-check",
    is_flag=True,
    help="Accept revocable certificates without checking whether they are revoked "
    "(logged on stderr). Use only where no revocation source exists.",
)


def _revocation_source(
    revocations: Path | None, no_check: bool
) -> tuple[RevocationChecker | None, LocalRevocationRegistry | None]:
    """The checker the options ask for, and the registry to close afterwards. Neither
    option: None, so that a revocable certificate is refused."""
    if revocations is not None and no_check:
        raise click.UsageError("--revocations and --no-revocation-check exclude each other")
    if no_check:
        click.echo(
            "trustmesh: warning: --no-revocation-check: certificates that can be revoked "
            "are accepted without checking whether they are",
            err=True,
        )
        return NoRevocationCheck(), None
    if revocations is None:
        return None, None
    registry = LocalRevocationRegistry(revocations)
    return registry, registry


@brc103.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8103, show_default=True, type=click.IntRange(0, 65535))
@KEY_OPTION
@REQUEST_OPTION
@CERTIFICATE_OPTION
@_revocations_option("client certificates")
@NO_REVOCATION_CHECK_OPTION
@click.option(
    "--certificate-grace-ms",
    type=click.IntRange(min=0),
    default=CERTIFICATE_GRACE_MS,
    show_default=True,
    help="With --request-certificates: how long a client may send no certificates after"
    " its first request before that request gets its 401 (the TS AuthFetch sends nothing"
    " when it holds none; a wallet may ask its user first). A client slow to send its"
    " first request gets twice that delay, up to 3 s. 0: wait the full 30 s, as the"
    " reference server does.",
)
@jsonl_stream_option
@limit_options
def serve(
    host: str,
    port: int,
    key_file: Path | None,
    requested_json: str | None,
    certificate_files: tuple[Path, ...],
    revocations: Path | None,
    no_revocation_check: bool,
    certificate_grace_ms: int,
    **limits: Any,
) -> None:
    """Serve a demo app behind BRC-104 until interrupted (SIGINT or SIGTERM).

    The first stdout line is {"listening": URL, "identityKey": HEX}. Every route needs
    mutual authentication; a request without it gets 401.

    \b
    Routes:
      POST /.well-known/auth   handshakes and certificate exchange (BRC-104)
      GET  /hello              {"hello": <client identity key>}
      POST /echo               the JSON body back, with header x-bsv-echo: yes
      POST /echo-text          the body back, same content type
      POST /echo-bin           the body back, same content type
      GET  /empty              204, no body
      GET  /status/<code>      that status

    The same port speaks BRC-103 over Socket.IO at /socket.io/ (the reference
    @bsv/authsocket binding, event authMessage): every authenticated event X with
    data D is answered with event echo {"eventName": X, "data": D, "from": <client
    identity key>} (try `trustmesh brc103 socket URL --event hello`).

    With --request-certificates every client must show a matching certificate before
    its requests are answered (GET /hello then lists the fields it revealed). A
    certificate that can be revoked is checked against --revocations, or refused
    (unless --no-revocation-check).
    """
    policy = pop_policy(limits)
    wallet = load_wallet(key_file)
    config = _peer_config(requested_json, certificate_files, server=True)
    checker, registry = _revocation_source(revocations, no_revocation_check)
    try:
        server = Brc104Server(
            wallet,
            config,
            revocation=checker,
            policy=policy,
            certificate_grace_ms=certificate_grace_ms or None,
        )
        sockets = SocketIoServer(wallet, echo_events, config, revocation=checker, policy=policy)
        asyncio.run(_serve(host, port, server, sockets, policy))
    finally:
        if registry is not None:
            registry.close()


async def _serve(
    host: str, port: int, server: Brc104Server, sockets: SocketIoServer, policy: ResourcePolicy
) -> None:
    from trustmesh.io.https import serve_app

    stop = stop_on_signals()
    app = demo_app(server)
    sockets.install(app)
    http = await serve_app(
        app,
        host,
        port,
        context=None,
        policy=policy,
        name="BRC-104",
        shutdown_timeout=2.0,
    )
    try:
        bound = http.port
        shown = f"[{host}]" if ":" in host else host
        emit(
            {"listening": f"http://{shown}:{bound}", "identityKey": server.identity_key},
            as_json=True,
        )
        await stop.wait()
    finally:
        await http.stop()


# --- fetch ----------------------------------------------------------------------------


def _header(value: str) -> tuple[str, str]:
    name, sep, rest = value.partition(":")
    if not sep or not name.strip():
        raise click.BadParameter(f"{value!r} is not NAME:VALUE")
    return name.strip(), rest.strip()


@brc103.command()
@click.argument("url")
@click.option("-X", "--request", "method", default=None, help="HTTP method (GET, or POST with -d).")
@click.option(
    "-H",
    "--header",
    "headers",
    multiple=True,
    help="NAME:VALUE; only content-type, authorization and x-bsv-* can be signed. Repeatable.",
)
@click.option(
    "-d", "--data", default=None, help="Request body; @FILE reads a file, @- reads stdin."
)
@KEY_OPTION
@REQUEST_OPTION
@CERTIFICATE_OPTION
@click.option("-i", "--include", is_flag=True, help="Print the status line and headers first.")
@click.option(
    "-f", "--fail", is_flag=True, help="Exit 1 when the (authenticated) status is >= 400."
)
@click.option("-v", "--verbose", is_flag=True, help="Say who answered on stderr.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1, max=3600),
    default=30.0,
    show_default=True,
    help="Seconds for the whole exchange (handshake, request and answer).",
)
@_revocations_option("the server's certificates")
@NO_REVOCATION_CHECK_OPTION
def fetch(
    url: str,
    method: str | None,
    headers: tuple[str, ...],
    data: str | None,
    key_file: Path | None,
    requested_json: str | None,
    certificate_files: tuple[Path, ...],
    include: bool,
    fail: bool,
    verbose: bool,
    timeout: float,
    revocations: Path | None,
    no_revocation_check: bool,
) -> None:
    """Send one mutually authenticated request to URL and print the response body.

    Exits 0 only when the response was authenticated: signed by the server's identity
    key over the status, x-bsv-* headers and body. A plain HTTP answer, a bad signature
    or a refused handshake exits 1. With -d and no Content-Type, the body is sent as
    application/json when it parses as JSON, else as text/plain.
    """
    wallet = load_wallet(key_file)
    header_list = [_header(h) for h in headers]
    body: bytes | None = None
    if data is not None:
        body = _read_data(data)
        if not any(k.lower() == "content-type" for k, _ in header_list):
            header_list.append(("Content-Type", _guess_type(body)))
    verb = (method or ("POST" if body is not None else "GET")).upper()
    config = _peer_config(requested_json, certificate_files, server=False)
    checker, registry = _revocation_source(revocations, no_revocation_check)
    try:
        exchange = _fetch(wallet, config, checker, url, verb, header_list, body, timeout)
        response = asyncio.run(exchange)
    finally:
        if registry is not None:
            registry.close()
    if verbose:
        click.echo(f"authenticated: HTTP {response.status} from {response.identity_key}", err=True)
        for shown in response.certificates:
            fields = json.dumps(shown.decrypted_fields, ensure_ascii=False)
            click.echo(
                f"certificate: type {shown.certificate.type} certifier "
                f"{shown.certificate.certifier} fields {fields}",
                err=True,
            )
    if include:
        lines = [f"HTTP {response.status}"] + [f"{k}: {v}" for k, v in response.headers.items()]
        sys.stdout.write("\r\n".join(lines) + "\r\n\r\n")
        sys.stdout.flush()
    sys.stdout.buffer.write(response.body)
    sys.stdout.buffer.flush()
    if fail and response.status >= 400:
        click.echo(f"trustmesh: error: HTTP {response.status} (authenticated)", err=True)
        raise SystemExit(1)


async def _fetch(
    wallet: Wallet,
    config: PeerConfig,
    revocation: RevocationChecker | None,
    url: str,
    method: str,
    headers: list[tuple[str, str]],
    body: bytes | None,
    seconds: float,
) -> Any:
    async with AuthFetch(wallet, config, revocation=revocation, request_timeout=seconds) as client:
        return await client.fetch(url, method=method, headers=headers, body=body)


def _read_data(data: str) -> bytes:
    if data == "@-":
        return sys.stdin.buffer.read()
    if data.startswith("@"):
        try:
            return Path(data[1:]).read_bytes()
        except OSError as exc:
            raise click.BadParameter(f"cannot read {data[1:]}: {exc.strerror}") from None
    return data.encode("utf-8")


def _guess_type(body: bytes) -> str:
    try:
        json.loads(body)
    except ValueError:
        return "text/plain"
    return "application/json"


# --- socket ---------------------------------------------------------------------------


def _json_data(value: str | None) -> Any:
    if value is None:
        return None
    try:
        return strict_loads(value.encode("utf-8"), max_size=MAX_MESSAGE_SIZE)
    except DecodeError as exc:
        raise click.BadParameter(str(exc), param_hint="--data") from None


def _socket_origin(url: str) -> str:
    """The server's origin for the Socket.IO client (ws:// and wss:// as http:// and
    https://); a path in URL is refused: the Socket.IO path is --path."""
    parts = urllib.parse.urlsplit(url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    if scheme not in ("http", "https") or not parts.netloc:
        raise click.BadParameter(f"{url!r} is not an http://, https://, ws:// or wss:// URL")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise click.BadParameter(
            f"{url!r}: give the server's origin (scheme://host:port); the Socket.IO path is --path"
        )
    return f"{scheme}://{parts.netloc}"


@brc103.command()
@click.argument("url")
@click.option("--event", "event_name", required=True, help="The event to emit.")
@click.option("--data", default=None, metavar="JSON", help="The event's data (JSON).")
@click.option(
    "--path", default=DEFAULT_PATH, show_default=True, help="The server's Socket.IO path."
)
@KEY_OPTION
@REQUEST_OPTION
@CERTIFICATE_OPTION
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1, max=3600),
    default=30.0,
    show_default=True,
    help="Seconds for the whole exchange (connect, handshake, event and answer).",
)
@click.option("-v", "--verbose", is_flag=True, help="Say who answered on stderr.")
@_revocations_option("the server's certificates")
@NO_REVOCATION_CHECK_OPTION
def socket(
    url: str,
    event_name: str,
    data: str | None,
    path: str,
    key_file: Path | None,
    requested_json: str | None,
    certificate_files: tuple[Path, ...],
    timeout: float,
    verbose: bool,
    revocations: Path | None,
    no_revocation_check: bool,
) -> None:
    """Emit one event over BRC-103 Socket.IO and print the first event that comes back.

    URL is the server's origin (http://host:port; ws:// works too). The client speaks
    as @bsv/authsocket-client does: it connects over WebSocket, handshakes, sends the
    event in a signed general message and prints the first event it gets as one JSON
    line: {"eventName", "data", "authenticated", "identityKey"}. Exits 0 only when that
    event was authenticated (signed by the server's identity key); a plain Socket.IO
    event, a refused handshake or no answer in time exits 1.
    """
    wallet = load_wallet(key_file)
    origin = _socket_origin(url)
    value = _json_data(data)
    config = _peer_config(requested_json, certificate_files, server=False)
    checker, registry = _revocation_source(revocations, no_revocation_check)
    try:
        exchange = _socket(wallet, config, checker, origin, path, event_name, value, timeout)
        result, certificates = asyncio.run(exchange)
    finally:
        if registry is not None:
            registry.close()
    if verbose and result["authenticated"]:
        click.echo(
            f"authenticated: event {result['eventName']} from {result['identityKey']}", err=True
        )
        for shown in certificates:
            fields = json.dumps(shown.decrypted_fields, ensure_ascii=False)
            click.echo(
                f"certificate: type {shown.certificate.type} certifier "
                f"{shown.certificate.certifier} fields {fields}",
                err=True,
            )
    emit(result, as_json=True)
    if not result["authenticated"]:
        click.echo(
            f"trustmesh: error: the first event ({result['eventName']}) was not authenticated",
            err=True,
        )
        raise SystemExit(1)


async def _socket(
    wallet: Wallet,
    config: PeerConfig,
    revocation: RevocationChecker | None,
    origin: str,
    path: str,
    event_name: str,
    data: Any,
    seconds: float,
) -> tuple[dict[str, Any], list[VerifiableCertificate]]:
    certificates: list[VerifiableCertificate] = []
    try:
        async with asyncio.timeout(seconds):
            async with socket_connect(
                origin, wallet, config, revocation=revocation, path=path, connect_timeout=seconds
            ) as client:
                client.peer.on_certificates(lambda event: certificates.extend(event.certificates))
                return await _first_event(client, event_name, data), certificates
    except TimeoutError:
        raise TransportError(f"no answer within {seconds:g} s") from None


async def _first_event(client: SocketIoClient, event_name: str, data: Any) -> dict[str, Any]:
    """Emit the event and return the first event back: authenticated (in a signed
    general message) or plain (which may come before our handshake is even answered)."""
    emitting = asyncio.ensure_future(client.emit(event_name, data))
    signed = asyncio.ensure_future(client.next_event())
    plain = asyncio.ensure_future(client.plain_events.get())
    closed = asyncio.ensure_future(client.closed.wait())
    waiters: set[asyncio.Future[Any]] = {signed, plain, closed}
    pending: set[asyncio.Future[Any]] = {*waiters, emitting}
    try:
        while True:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if done & waiters:
                break
            emitting.result()  # a refused handshake says why; a sent event waits on
    finally:
        for waiter in (*waiters, emitting):
            waiter.cancel()
    if signed.done() and not signed.cancelled():
        name, value, sender = signed.result()
        return {"eventName": name, "data": value, "authenticated": True, "identityKey": sender}
    if plain.done() and not plain.cancelled():
        name, value = plain.result()
        return {"eventName": name, "data": value, "authenticated": False, "identityKey": None}
    reason = client.error or "the server closed the connection"
    raise TransportError(f"no event came back: {reason}")


# --- certificates ---------------------------------------------------------------------


@brc103.group()
def cert() -> None:
    """Issue, reveal and verify BRC-52 certificates (JSON files).

    \b
    A certifier issues to a subject, the subject reveals chosen fields to a verifier,
    the verifier checks the signature and decrypts just those fields:
      trustmesh brc103 cert issue --key certifier.key --subject SUBJECT_HEX \\
          --type employee --field name=Alice --field role=admin --out master.json
      trustmesh brc103 cert reveal master.json --key subject.key \\
          --verifier VERIFIER_HEX --field role --out shown.json
      trustmesh brc103 cert verify shown.json --key verifier.key
    """


def _certificate_type(value: str) -> str:
    """32 bytes of base64 as given, else the SHA-256 of the name (so "employee" works)."""
    with contextlib.suppress(binascii.Error, ValueError):
        if len(base64.b64decode(value, validate=True)) == 32:
            return value
    return base64.b64encode(hashlib.sha256(value.encode("utf-8")).digest()).decode()


def _field(value: str) -> tuple[str, str]:
    name, sep, rest = value.partition("=")
    if not sep or not name:
        raise click.BadParameter(f"{value!r} is not NAME=VALUE")
    return name, rest


def _write(data: dict[str, Any], out: Path | None) -> None:
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text, encoding="utf-8")


def _read_json(path: Path) -> Any:
    try:
        return strict_loads(path.read_bytes(), max_size=4 * 1024 * 1024)
    except OSError as exc:
        raise click.BadParameter(f"cannot read {path}: {exc.strerror}") from None
    except DecodeError as exc:
        raise CertificateFormatError(f"{path}: {exc}") from None


def _role_key(role: str, *, required: bool = False) -> Callable[[FC], FC]:
    """``--key``: the key file of the party in ``role`` (PEM, or 64 hex digits)."""
    return click.option(
        "--key",
        "key_file",
        type=FileKeyPath(refuse_device_key),
        required=required,
        help=f"The {role}'s identity key file (secp256k1 PEM, or 64 hex digits).",
    )


OUT_OPTION = click.option(
    "--out", type=click.Path(dir_okay=False, path_type=Path), help="Write here, not stdout."
)


@cert.command()
@_role_key("certifier", required=True)
@click.option("--subject", required=True, help="The subject's identity key (66 hex digits).")
@click.option(
    "--type",
    "cert_type",
    required=True,
    help="Certificate type: 32 bytes of base64, or a name (hashed with SHA-256).",
)
@click.option(
    "--field",
    "fields",
    multiple=True,
    required=True,
    type=str,
    help="NAME=VALUE to certify; repeatable.",
)
@click.option(
    "--revocation-outpoint",
    default=NO_REVOCATION,
    show_default=True,
    help="<txid>.<index> that revokes the certificate once spent (or revoked locally).",
)
@click.option("--serial-number", default=None, help="32 bytes of base64 (default: random).")
@OUT_OPTION
def issue(
    key_file: Path,
    subject: str,
    cert_type: str,
    fields: tuple[str, ...],
    revocation_outpoint: str,
    serial_number: str | None,
    out: Path | None,
) -> None:
    """Issue a master certificate: encrypt each field, sign, and write the JSON with the
    master keyring (field keys encrypted for the subject)."""
    certifier = load_wallet(key_file)
    pairs: dict[str, str] = {}
    for name, value in (_field(f) for f in fields):
        if name in pairs:
            raise click.BadParameter(f"field {name!r} is given twice", param_hint="--field")
        pairs[name] = value
    master = MasterCertificate.issue(
        certifier,
        _public_key_hex(subject, "--subject"),
        _certificate_type(cert_type),
        pairs,
        serial_number=serial_number,
        revocation_outpoint=revocation_outpoint,
    )
    _write(master.to_json(), out)


@cert.command()
@click.argument("certificate", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@_role_key("subject", required=True)
@click.option("--verifier", required=True, help="The verifier's identity key (66 hex digits).")
@click.option(
    "--field", "names", multiple=True, required=True, help="A field to reveal; repeatable."
)
@OUT_OPTION
def reveal(
    certificate: Path, key_file: Path, verifier: str, names: tuple[str, ...], out: Path | None
) -> None:
    """Make a verifiable certificate from a master certificate: the verifier will be able to
    decrypt the named fields and no others."""
    subject = load_wallet(key_file)
    master = MasterCertificate.from_json(_read_json(certificate))
    shown = master.reveal(subject, _public_key_hex(verifier, "--verifier"), list(names))
    _write(shown.to_json(), out)


@cert.command()
@click.argument("certificate", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@_role_key("verifier")
@click.option(
    "--certifier",
    "certifiers",
    multiple=True,
    help="Accept only this certifier (66 hex digits); repeatable.",
)
@_revocations_option("the certificate")
@NO_REVOCATION_CHECK_OPTION
def verify(
    certificate: Path,
    key_file: Path | None,
    certifiers: tuple[str, ...],
    revocations: Path | None,
    no_revocation_check: bool,
) -> None:
    """Check a verifiable certificate: the certifier's signature, the revocation outpoint
    and, with --key, decrypt every revealed field. Prints JSON; exits 1 when invalid.

    A certificate whose revocation outpoint is not the 36 zero bytes can be revoked: it
    is checked against --revocations, or refused unless --no-revocation-check."""
    shown = VerifiableCertificate.from_json(_read_json(certificate))
    cert_ = shown.certificate
    allowed = {_public_key_hex(c, "--certifier") for c in certifiers}
    if allowed and cert_.certifier not in allowed:
        raise CertificateError(f"certifier {cert_.certifier} is not one of --certifier")
    cert_.verify()
    checker, registry = _revocation_source(revocations, no_revocation_check)
    try:
        check_revocation(cert_, checker)
    finally:
        if registry is not None:
            registry.close()
    result: dict[str, Any] = {
        "valid": True,
        "type": cert_.type,
        "serialNumber": cert_.serial_number,
        "subject": cert_.subject,
        "certifier": cert_.certifier,
        "revocationOutpoint": cert_.revocation_outpoint,
        # "checked" against --revocations; "unchecked" with --no-revocation-check;
        # "irrevocable" for the 36 zero bytes.
        "revocation": (
            "irrevocable"
            if not is_revocable(cert_.revocation_outpoint)
            else "unchecked"
            if no_revocation_check
            else "checked"
        ),
    }
    if key_file is not None:
        result["fields"] = shown.decrypt_fields(load_wallet(key_file))
    emit(result, as_json=True)


@cert.command()
@click.argument("outpoint")
@click.option(
    "--revocations",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="The local revocation registry (SQLite, created if missing).",
)
@click.option("--reason", default="", help="Why, for the record.")
def revoke(outpoint: str, revocations: Path, reason: str) -> None:
    """Record OUTPOINT (<txid>.<index>) as revoked in a local registry."""
    registry = LocalRevocationRegistry(revocations)
    try:
        registry.revoke(outpoint, now_ms=int(time.time() * 1000), reason=reason)
    finally:
        registry.close()
    emit({"revoked": outpoint}, as_json=True)
