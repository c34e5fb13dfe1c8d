"""``trustmesh node``: enroll a mesh node, run it, and ask it questions."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
from pathlib import Path
from typing import Any

import click
from cryptography import x509

from trustmesh.cli.backup import node_backup
from trustmesh.cli.bundle import bundle
from trustmesh.cli.enroll import (
    ATTEST_OPTION,
    IDENTITY_KEY_OPTION,
    KEY_TYPES,
    enroll_with_devices,
)
from trustmesh.cli.limits import limit_options
from trustmesh.cli.output import (
    emit,
    emit_lines,
    jsonl_option,
    jsonl_stream_option,
    serial_text,
    table,
)
from trustmesh.cli.params import Address, Seconds, json_option, node_dir_option
from trustmesh.cli.signals import stop_on_signals
from trustmesh.keystore.filestore import passphrase_from_env_or_tty
from trustmesh.keystore.pkcs8 import is_encrypted
from trustmesh.keystore.uri import close_signer
from trustmesh.mesh.gossip import DEFAULT_TTL_MS, MAX_TTL_MS, PAYLOAD_TYPES, sign_message
from trustmesh.node.config import (
    CONFIG_FILE,
    DEFAULT_CRL_INTERVAL,
    DEFAULT_MAX_LINKS,
    NodeConfig,
    load_config,
    write_config,
)


@click.group()
def node() -> None:
    """A mesh node: enroll it, run it, publish anomaly signatures, see its peers.

    \b
    trustmesh node init --dir n1 --ca-url https://127.0.0.1:8443 --ca-cert ca/ca.crt \\
        --token tmenroll_... --node-id node-1 --listen 127.0.0.1:7401 --api 127.0.0.1:7402
    trustmesh node run --dir n1            # until SIGTERM or Ctrl-C
    trustmesh node publish --dir n1 --type anomaly \\
        --payload-json '{"hash": "9f86d081884c7d65", "kind": "port-scan", "risk": 0.8}'
    trustmesh node peers --dir n1
    trustmesh node anomalies --dir n1 --json
    trustmesh node bundle send --dir n1 --to node-2 --ttl 1h --data hello
    """


node.add_command(bundle)
node.add_command(node_backup, "backup")


@node.command()
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="The node directory to create: key, certificate, node.toml.",
)
@click.option(
    "--ca-url",
    help="The CA API, e.g. https://127.0.0.1:8443 (required to enroll; when adopting, the"
    " one the directory enrolled with).",
)
@click.option(
    "--ca-cert",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="The mesh root (the CA's ca.crt); required to enroll.",
)
@click.option(
    "--token",
    help="The enrollment token (`trustmesh ca token create`); not needed for a directory"
    " `trustmesh enroll` already enrolled, which node init adopts.",
)
@click.option("--node-id", required=True, help="This node's id; the token must be for it.")
@click.option(
    "--listen", type=Address(any_port=True), required=True, help="HOST:PORT for mesh links."
)
@click.option(
    "--api", type=Address(any_port=True), required=True, help="HOST:PORT for the node's HTTPS API."
)
@click.option(
    "--bootstrap",
    type=Address(),
    multiple=True,
    help="A peer's link address to dial first (repeatable); the CA's list is added.",
)
@click.option(
    "--crl-interval",
    type=Seconds(),
    default=DEFAULT_CRL_INTERVAL,
    show_default=True,
    help="Seconds between CRL fetches from the CA (also 30s, 5m ...).",
)
@click.option(
    "--max-links",
    type=click.IntRange(1, 1024),
    default=DEFAULT_MAX_LINKS,
    show_default=True,
    help="Links held at most; a node at its cap refuses new ones, naming peers with room.",
)
@click.option(
    "--dial-target",
    type=click.IntRange(1, 341),
    help="Links the node dials out for (default: max-links / 3). At most max-links / 3, "
    "so that the mesh keeps room for newcomers.",
)
@click.option(
    "--gossip-fanout",
    type=click.IntRange(1, 64),
    help="Peers each new message is pushed to (default: the CA's setting, else 3).",
)
@click.option("--advertise", type=Address(), help="The link address peers should dial.")
@click.option(
    "--mdns/--no-mdns",
    default=False,
    show_default=True,
    help="Advertise the node and dial nodes found on the LAN by mDNS (docs/protocols/"
    "discovery.md); --listen must then be an IP address (0.0.0.0: every interface).",
)
@click.option("--key-type", type=click.Choice(sorted(KEY_TYPES)), default="p256", show_default=True)
@click.option("--no-encrypt", is_flag=True, help="Leave node.key unencrypted (mode 0600 still).")
@IDENTITY_KEY_OPTION
@ATTEST_OPTION
@json_option
def init(
    directory: Path,
    ca_url: str | None,
    ca_cert: Path | None,
    token: str | None,
    node_id: str,
    listen: str,
    api: str,
    bootstrap: tuple[str, ...],
    crl_interval: float,
    max_links: int,
    dial_target: int | None,
    gossip_fanout: int | None,
    advertise: str | None,
    mdns: bool,
    key_type: str,
    no_encrypt: bool,
    identity_key: str | None,
    attest: str | None,
    as_json: bool,
) -> None:
    """Enroll with the mesh CA and write the node's directory and node.toml.

    node.key is encrypted with $TRUSTMESH_PASSPHRASE (or a prompt) unless --no-encrypt;
    `node run` needs the same passphrase. With --key the identity lives on a PKCS#11
    token or a TPM; with --attest the node proves its TPM's state to the CA, now and
    at every renewal (docs/protocols/keys.md, attestation.md).

    A directory that `trustmesh enroll` wrote is adopted: node.toml is written for the
    key and certificate already there, and no token is needed.
    """
    enrolled_before = read_enrollment(directory, node_id)
    if enrolled_before is not None:
        ca_url = ca_url or str(enrolled_before.get("ca_url") or "")
        no_encrypt = not is_encrypted((directory / "node.key").read_bytes())
    elif token is None or ca_url is None or ca_cert is None:
        raise click.UsageError("to enroll, give --token, --ca-url and --ca-cert")
    if not ca_url:
        raise click.UsageError("give --ca-url: the enrollment does not record one")
    # The config is checked before the token is spent.
    config = NodeConfig(
        node_id=node_id,
        ca_url=ca_url,
        listen=listen,
        api=api,
        bootstrap=bootstrap,
        crl_interval=crl_interval,
        max_links=max_links,
        dial_target=dial_target,
        advertise=advertise,
        mdns=mdns,
        key_encrypted=not no_encrypt,
    )
    if enrolled_before is None:
        assert token is not None
        assert ca_cert is not None
        passphrase = None if no_encrypt else passphrase_from_env_or_tty(directory, confirm=True)
        enrolled = enroll_with_devices(
            ca_url, ca_cert, token, node_id, directory, passphrase, key_type, identity_key, attest
        )
        serial, not_after = enrolled.serial, enrolled.not_after
    else:
        leaf = x509.load_pem_x509_certificates((directory / "node.crt").read_bytes())[0]
        serial, not_after = format(leaf.serial_number, "x"), leaf.not_valid_after_utc
    settings = json.loads((directory / "enrollment.json").read_text()).get("config", {})
    peers = tuple(str(p) for p in settings.get("bootstrap_peers") or ())
    fanout = gossip_fanout or int(settings.get("gossip_fanout") or config.gossip_fanout)
    config = dataclasses.replace(
        config, bootstrap=tuple(dict.fromkeys(bootstrap + peers)), gossip_fanout=fanout
    )
    path = write_config(directory, config)
    emit(
        {
            "node_id": node_id,
            "serial": serial,
            "not_after": not_after.isoformat(),
            "dir": str(directory),
            "config": str(path),
            "adopted": enrolled_before is not None,
        },
        as_json=as_json,
    )


def read_enrollment(directory: Path, node_id: str) -> dict[str, Any] | None:
    """The enrollment of a directory `trustmesh enroll` wrote and no node init yet
    configured (None when it is not one); refuses one initialised or for another node."""
    if (directory / CONFIG_FILE).exists():
        raise click.UsageError(
            f"{directory} is set up already: trustmesh node run --dir {directory}"
        )
    needed = ("node.key", "node.crt", "enrollment.json")
    if not all((directory / name).exists() for name in needed):
        return None
    record = json.loads((directory / "enrollment.json").read_text())
    if not isinstance(record, dict) or record.get("node_id") != node_id:
        enrolled = record.get("node_id") if isinstance(record, dict) else None
        raise click.UsageError(f"{directory} is enrolled as {enrolled!r}, not {node_id!r}")
    return record


@node.command()
@node_dir_option
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning"]),
    default="info",
    show_default=True,
)
@click.option(
    "--mdns/--no-mdns",
    default=None,
    help="mDNS discovery for this run (default: node.toml's mdns).",
)
@click.option(
    "--metrics",
    type=Address(any_port=True),
    help="Also serve Prometheus GET /metrics on this plain-HTTP HOST:PORT, for a local"
    " scraper (default: node.toml's metrics; the API's /metrics needs a mesh"
    " certificate; docs/metrics.md).",
)
@ATTEST_OPTION
@jsonl_stream_option
@limit_options
def run(
    directory: Path,
    log_level: str,
    mdns: bool | None,
    metrics: str | None,
    attest: str | None,
    **limits: Any,
) -> None:
    """Run the node in the foreground until SIGTERM or SIGINT.

    Logs one JSON object per line on stderr; prints {"event": "started", ...} on stdout
    once the links and the API listen. Renews the certificate at 2/3 of its lifetime,
    fetches the CRL every crl_interval, and closes every link cleanly on the way out.

    The limit flags (--max-connections ...) override node.toml's [limits] table for this
    run; both listeners (links and API) use them (docs/limits.md).

    A node enrolled with --key signs with its device identity; one enrolled with
    --attest renews with a fresh TPM quote and attests on its links. --attest here
    overrides the TPM recorded at enrollment.
    """
    from trustmesh.node.client import node_passphrase
    from trustmesh.node.logs import use_json_logs
    from trustmesh.node.runtime import MeshNode

    overrides = {name: value for name, value in limits.items() if value is not None}
    from trustmesh.cli.main import debug_requested

    use_json_logs(logging.DEBUG if debug_requested() else getattr(logging, log_level.upper()))
    passphrase = node_passphrase(directory)

    async def main() -> None:
        stop = stop_on_signals()
        mesh_node = MeshNode.from_directory(directory, passphrase, attest=attest)
        if overrides:
            config = mesh_node.config
            mesh_node.config = dataclasses.replace(config, limits={**config.limits, **overrides})
            mesh_node.config.check_operator_values()
        if mdns is not None:
            mesh_node.config = dataclasses.replace(mesh_node.config, mdns=mdns)
        if metrics is not None:
            mesh_node.config = dataclasses.replace(mesh_node.config, metrics=metrics)
        await mesh_node.start()
        started = {
            "event": "started",
            "node_id": mesh_node.node_id,
            "listen": mesh_node.listen_address,
            "api": mesh_node.api_url,
        }
        if mesh_node.metrics_url is not None:
            started["metrics"] = mesh_node.metrics_url
        emit(started, as_json=True)
        try:
            await stop.wait()
        finally:
            await mesh_node.stop()
        emit({"event": "stopped", "node_id": mesh_node.node_id}, as_json=True)

    asyncio.run(main())


@node.command()
@node_dir_option
@click.option(
    "--type", "kind", type=click.Choice(PAYLOAD_TYPES), default="anomaly", show_default=True
)
@click.option(
    "--payload-json",
    required=True,
    help='The payload, e.g. {"hash": "<hex>", "kind": "port-scan", "risk": 0.8, "meta": {}}.',
)
@click.option(
    "--ttl",
    type=Seconds(),
    default=DEFAULT_TTL_MS / 1000,
    show_default=True,
    help="How long the message lives (seconds, or 30m, 2h ...; at most 7 days).",
)
@json_option
def publish(directory: Path, kind: str, payload_json: str, ttl: float, as_json: bool) -> None:
    """Sign a gossip message with the node's key and hand it to the node to spread."""
    import time

    from trustmesh.node.client import NodeClient, node_passphrase
    from trustmesh.node.identity import open_node_signer

    try:
        payload = json.loads(payload_json)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--payload-json") from None
    if not isinstance(payload, dict):
        raise click.BadParameter("must be a JSON object", param_hint="--payload-json")
    if payload.setdefault("type", kind) != kind:
        raise click.BadParameter(f"its type is not {kind!r}", param_hint="--payload-json")
    ttl_ms = int(ttl * 1000)
    if not 0 < ttl_ms <= MAX_TTL_MS:
        raise click.BadParameter("must be at most 7 days", param_hint="--ttl")
    passphrase = node_passphrase(directory)
    config = load_config(directory)
    key = open_node_signer(directory, passphrase)
    chain = _chain_der(directory)
    try:
        now_ms = time.time_ns() // 1_000_000
        message = sign_message(
            key, config.node_id, payload, now_ms=now_ms, ttl_ms=ttl_ms, chain=chain
        )
    finally:
        close_signer(key)
    client = NodeClient(directory, passphrase=passphrase)
    answer = asyncio.run(client.post("/v1/mesh/gossip", message.encode()))
    emit(answer, as_json=as_json)


@node.command()
@node_dir_option
@json_option
@jsonl_option("One JSON object per peer, one a line.")
def peers(directory: Path, as_json: bool, as_jsonl: bool) -> None:
    """The node's peer table: node_id, status, score, last_seen, address, the serial of
    its certificate (as openssl prints it). A peer whose score fell below the threshold
    shows "graylisted" after its serial.

    A node revoked with `trustmesh ca revoke` leaves the table once this node holds the
    new CRL: at the latest at its next CRL fetch, which comes every crl_interval give or
    take 25 % (node.toml; 60 s by default). So wait up to 1.25 x crl_interval plus the
    fetch itself (well under a second on a LAN; it times out after 10 s); less when a
    peer that fetched it first pushes it over a link. `node health` shows the
    crl_number the node holds.
    """
    answer = _get(directory, "/v1/mesh/peers")
    if as_json:
        emit(answer, as_json=True)
        return
    if as_jsonl:
        emit_lines(answer.get("peers", []))
        return
    header = ("NODE_ID", "STATUS", "SCORE", "LAST_SEEN", "ADDRESS", "SERIAL", "")
    rows = [
        (
            p["node_id"],
            p["status"],
            _score(p),
            p["last_seen"],
            p.get("address"),
            serial_text(p.get("serial")),
            "graylisted" if p.get("graylisted_until") else "",
        )
        for p in answer.get("peers", [])
    ]
    emit({}, as_json=False, human=table(header, rows, right={2}) if rows else "no peers")


def _score(peer: dict[str, Any]) -> str:
    """A peer's gossip score for the table ("-" from a node that does not report one)."""
    score = peer.get("score")
    return f"{score:.1f}" if isinstance(score, int | float) else "-"


@node.command()
@node_dir_option
@click.option("--limit", type=click.IntRange(1, 10_000), default=1000, show_default=True)
@click.option("--since", type=click.IntRange(-1), help="Only those received after (Unix ms).")
@json_option
@jsonl_option("One JSON object per anomaly signature, one a line.")
def anomalies(
    directory: Path, limit: int, since: int | None, as_json: bool, as_jsonl: bool
) -> None:
    """The anomaly signatures the node has received."""
    params = {"limit": str(limit)} | ({"since": str(since)} if since is not None else {})
    answer = _get(directory, "/v1/mesh/anomalies", **params)
    if as_json:
        emit(answer, as_json=True)
        return
    if as_jsonl:
        emit_lines(answer.get("anomalies", []))
        return
    header = ("HASH", "KIND", "RISK", "ORIGIN", "RECEIVED_AT")
    rows = [
        (f"{a['hash']:.20}", a["kind"], a["risk"], a["origin"], _iso_ms(a.get("received_at")))
        for a in answer.get("anomalies", [])
    ]
    emit({}, as_json=False, human=table(header, rows) if rows else "no anomalies")


def _iso_ms(unix_ms: object) -> str:
    """Unix ms as ISO 8601 UTC ("-" when absent)."""
    from datetime import UTC, datetime

    if not isinstance(unix_ms, int | float) or isinstance(unix_ms, bool):
        return "-"
    return datetime.fromtimestamp(unix_ms / 1000, UTC).isoformat(timespec="seconds")


@node.command()
@node_dir_option
@json_option
@click.pass_context
def health(ctx: click.Context, directory: Path, as_json: bool) -> None:
    """Status, links, certificate, CRL and gossip counters of the running node.

    \b
    status  ok        nothing below
            degraded  no link up, no CRL, or a CRL past its nextUpdate (CA unreachable)
            failing   the node certificate has expired, or the CA revoked it

    Exits 0 when the status is ok, 1 when it is degraded or failing (with --json too),
    so it can serve as a health check. Needs no key passphrase (the node's local socket).
    """
    from trustmesh.node.health import OK, REASONS

    answer = _get(directory, "/v1/mesh/health")
    status = answer.get("status", OK)
    if as_json:
        emit(answer, as_json=True)
    else:
        reasons = [REASONS.get(str(r), str(r)) for r in answer.get("reasons", [])]
        said = status + (f": {'; '.join(reasons)}" if reasons else "")
        shown = {k: said if k == "status" else v for k, v in answer.items() if k != "reasons"}
        emit(shown, as_json=False)
    if status != OK:
        ctx.exit(1)


def _get(directory: Path, path: str, **params: str) -> dict[str, Any]:
    """GET a read-only route: over the node's local socket, which needs no passphrase;
    asked for only if the node must be reached over mTLS."""
    from trustmesh.node.client import NodeClient, node_passphrase

    client = NodeClient(directory, passphrase=node_passphrase)
    return asyncio.run(client.get(path, **params))


def _chain_der(directory: Path) -> tuple[bytes, ...]:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    certs = x509.load_pem_x509_certificates((directory / "node.crt").read_bytes())
    return tuple(c.public_bytes(serialization.Encoding.DER) for c in certs)


@node.command()
@node_dir_option
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=0,
    show_default=True,
    help="The port to serve on, on 127.0.0.1 (0: any free one).",
)
@json_option
def dashboard(directory: Path, port: int, as_json: bool) -> None:
    """Serve the node's live dashboard to a local browser, until SIGINT or SIGTERM.

    A plain-HTTP server on 127.0.0.1 forwards the page's GET requests to the running
    node's read-only socket (DIR/api.sock), or, without one, to its HTTPS API with the
    node's own certificate, as `kubectl proxy` does. Prints the page's URL (--json:
    {"url": ...}). The page shows the mesh as this node knows it: its links and the
    nodes it knows, certificate expiry, scores, anomalies, revocations and CRL age.
    """
    from trustmesh.node.client import node_passphrase
    from trustmesh.node.dashboard import DashboardProxy
    from trustmesh.node.runfile import API_SOCKET

    # The socket needs no key; the key (and its passphrase) only when there is none.
    mtls = not (directory / API_SOCKET).exists()
    passphrase = node_passphrase(directory) if mtls else None

    async def main() -> None:
        stop = stop_on_signals()
        proxy = DashboardProxy(directory, port=port, passphrase=passphrase, mtls=mtls)
        url = await proxy.start()
        try:
            emit({"url": url}, as_json=as_json, human=url)
            await stop.wait()
        finally:
            await proxy.stop()

    asyncio.run(main())


@node.command()
@node_dir_option
@click.option("--links", type=click.IntRange(1), metavar="N", help="Until N links are up.")
@click.option("--healthy", is_flag=True, help="Until `node health` says ok.")
@click.option(
    "--anomaly",
    "anomalies",
    multiple=True,
    metavar="HASH",
    callback=lambda _ctx, _param, values: tuple(_anomaly_hash(v) for v in values),
    help="Until the node holds the anomaly signature with this hash; repeat for more.",
)
@click.option(
    "--gone",
    multiple=True,
    metavar="NODE_ID",
    help="Until this node is out of the peer table (revoked, say); repeat for more.",
)
@click.option(
    "--timeout",
    type=Seconds(),
    default=30.0,
    show_default=True,
    help="Give up after this long (seconds, or 30s, 2m ...): exit 1.",
)
@json_option
def wait(
    directory: Path,
    links: int | None,
    healthy: bool,
    anomalies: tuple[str, ...],
    gone: tuple[str, ...],
    timeout: float,
    as_json: bool,
) -> None:
    """Wait until the running node is in a state, for scripts: every condition at once.

    \b
    trustmesh node run --dir n1 &
    trustmesh node wait --dir n1 --links 2          # up, with two links
    trustmesh node wait --dir n3 --anomaly 9f86d081884c7d65
    trustmesh node wait --dir n1 --gone node-3      # after `ca revoke`: cut off

    With no condition, waits until the node answers. A node that is not running yet is
    waited for too. Prints the node's health when done (--json: as one document); on
    timeout, exits 1 and says what was missing. Needs no key passphrase while the
    node's local socket is up.
    """
    from trustmesh.node.client import NodeClient, node_passphrase
    from trustmesh.node.wait import conditions, wait_for

    wanted = conditions(links=links, healthy=healthy, anomalies=anomalies, gone=gone)
    client = NodeClient(directory, passphrase=node_passphrase)
    answer = asyncio.run(wait_for(client, wanted, within=timeout))
    emit(
        answer,
        as_json=as_json,
        human=f"{answer.get('node_id')}: {answer.get('status')}"
        f", {answer.get('links')} link(s), {answer.get('peers')} peer(s)",
    )


def _anomaly_hash(text: str) -> str:
    """An anomaly's hash as nodes keep it (16-128 lowercase hex digits, an even number,
    as gossip checks it): one that can never match would only wait out --timeout."""
    digest = text.strip().lower()
    if not re.fullmatch(r"(?:[0-9a-f]{2}){8,64}", digest):
        raise click.BadParameter(f"{text!r} is not 16-128 hex digits", param_hint="--anomaly")
    return digest
