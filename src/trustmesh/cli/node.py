"""``trustmesh node``: enroll a mesh node, run it, and ask it questions."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import click

from trustmesh.cli.bundle import bundle
from trustmesh.cli.enroll import (
    ATTEST_OPTION,
    IDENTITY_KEY_OPTION,
    KEY_TYPES,
    enroll_with_devices,
)
from trustmesh.cli.limits import limit_options
from trustmesh.cli.output import emit
from trustmesh.cli.params import Address, Seconds, json_option, node_dir_option
from trustmesh.cli.signals import stop_on_signals
from trustmesh.keystore.filestore import passphrase_from_env_or_tty
from trustmesh.keystore.uri import close_signer
from trustmesh.mesh.gossip import DEFAULT_TTL_MS, MAX_TTL_MS, PAYLOAD_TYPES, sign_message
from trustmesh.node.config import (
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


@node.command()
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="The node directory to create: key, certificate, node.toml.",
)
@click.option("--ca-url", required=True, help="The CA API, e.g. https://127.0.0.1:8443.")
@click.option(
    "--ca-cert",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    required=True,
    help="The mesh root (the CA's ca.crt).",
)
@click.option("--token", required=True, help="The enrollment token (`trustmesh ca token create`).")
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
    ca_url: str,
    ca_cert: Path,
    token: str,
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
    """
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
    passphrase = None if no_encrypt else passphrase_from_env_or_tty(directory, confirm=True)
    enrolled = enroll_with_devices(
        ca_url, ca_cert, token, node_id, directory, passphrase, key_type, identity_key, attest
    )
    settings = json.loads((directory / "enrollment.json").read_text()).get("config", {})
    peers = tuple(str(p) for p in settings.get("bootstrap_peers") or ())
    fanout = gossip_fanout or int(settings.get("gossip_fanout") or config.gossip_fanout)
    config = dataclasses.replace(
        config, bootstrap=tuple(dict.fromkeys(bootstrap + peers)), gossip_fanout=fanout
    )
    path = write_config(directory, config)
    emit(
        {
            "node_id": enrolled.node_id,
            "serial": enrolled.serial,
            "not_after": enrolled.not_after.isoformat(),
            "dir": str(directory),
            "config": str(path),
        },
        as_json=as_json,
    )


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
@ATTEST_OPTION
@limit_options
def run(
    directory: Path, log_level: str, mdns: bool | None, attest: str | None, **limits: Any
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
    use_json_logs(getattr(logging, log_level.upper()))
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
        await mesh_node.start()
        emit(
            {
                "event": "started",
                "node_id": mesh_node.node_id,
                "listen": mesh_node.listen_address,
                "api": mesh_node.api_url,
            },
            as_json=True,
        )
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
def peers(directory: Path, as_json: bool) -> None:
    """The node's peer table: node_id, status, score, last_seen, address. A peer whose
    score fell below the threshold shows "graylisted" after its address."""
    answer = _get(directory, "/v1/mesh/peers")
    if as_json:
        emit(answer, as_json=True)
        return
    rows = [
        f"{p['node_id']:<24} {p['status']:<13} {_score(p):>8}  {p['last_seen']}"
        f"  {p.get('address') or '-'}{'  graylisted' if p.get('graylisted_until') else ''}"
        for p in answer.get("peers", [])
    ]
    emit({}, as_json=False, human="\n".join(rows) or "no peers")


def _score(peer: dict[str, Any]) -> str:
    """A peer's gossip score for the table ("-" from a node that does not report one)."""
    score = peer.get("score")
    return f"{score:.1f}" if isinstance(score, int | float) else "-"


@node.command()
@node_dir_option
@click.option("--limit", type=click.IntRange(1, 10_000), default=1000, show_default=True)
@click.option("--since", type=click.IntRange(-1), help="Only those received after (Unix ms).")
@json_option
def anomalies(directory: Path, limit: int, since: int | None, as_json: bool) -> None:
    """The anomaly signatures the node has received."""
    params = {"limit": str(limit)} | ({"since": str(since)} if since is not None else {})
    answer = _get(directory, "/v1/mesh/anomalies", **params)
    if as_json:
        emit(answer, as_json=True)
        return
    rows = [
        f"{a['hash']:<20.20} {a['kind']:<16} risk {a['risk']:<5} from {a['origin']}"
        for a in answer.get("anomalies", [])
    ]
    emit({}, as_json=False, human="\n".join(rows) or "no anomalies")


@node.command()
@node_dir_option
@json_option
def health(directory: Path, as_json: bool) -> None:
    """Links, certificate, CRL and gossip counters of the running node."""
    answer = _get(directory, "/v1/mesh/health")
    if not as_json:
        answer = {k: json.dumps(v) if isinstance(v, dict) else v for k, v in answer.items()}
    emit(answer, as_json=as_json)


def _get(directory: Path, path: str, **params: str) -> dict[str, Any]:
    from trustmesh.node.client import NodeClient, node_passphrase

    client = NodeClient(directory, passphrase=node_passphrase(directory))
    return asyncio.run(client.get(path, **params))


def _chain_der(directory: Path) -> tuple[bytes, ...]:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    certs = x509.load_pem_x509_certificates((directory / "node.crt").read_bytes())
    return tuple(c.public_bytes(serialization.Encoding.DER) for c in certs)
