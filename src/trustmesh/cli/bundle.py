"""``trustmesh node bundle``: send delay-tolerant bundles, read the inbox, acknowledge.

A running node is asked through its API (``/v1/bundles``). A node that is not running
is worked on directly: a bundle sent then is signed and committed to its store, and
leaves when the node runs and meets a path to its destination."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any

import click
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from trustmesh.cli.output import emit, emit_lines, jsonl_option, table
from trustmesh.cli.params import Seconds, json_option, node_dir_option


@click.group()
def bundle() -> None:
    """Delay-tolerant bundles (RFC 9171): stored, carried and forwarded by the mesh
    until they reach their destination or expire.

    \b
    trustmesh node bundle send --dir n1 --to node-2 --ttl 1h --data 'hello'
    trustmesh node bundle send --dir n1 --to broadcast --ttl 10m --file report.bin --json
    trustmesh node bundle inbox --dir n2 --json
    trustmesh node bundle ack --dir n2 node-1:818000000000:42
    """


@bundle.command()
@node_dir_option
@click.option(
    "--to",
    "destination",
    required=True,
    help='The destination node_id, "broadcast" (every node), or a dtn:// endpoint.',
)
@click.option(
    "--ttl",
    type=Seconds(),
    required=True,
    help="How long the bundle lives (seconds, or 30m, 2h, 7d ...; at most 30 days).",
)
@click.option("--data", help="The payload, as text (UTF-8).")
@click.option(
    "--file",
    "file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="The payload, from a file (up to 1 MiB).",
)
@json_option
def send(
    directory: Path,
    destination: str,
    ttl: float,
    data: str | None,
    file: Path | None,
    as_json: bool,
) -> None:
    """Send a bundle from this node; prints its bundle ID once it is stored (it survives
    a crash from then on)."""
    if (data is None) == (file is None):
        raise click.UsageError("give the payload with exactly one of --data and --file")
    payload = data.encode() if data is not None else file.read_bytes()  # type: ignore[union-attr]
    ttl_s = int(ttl)
    if not 1 <= ttl_s <= 30 * 86_400:
        raise click.BadParameter("must be 1 s to 30 days", param_hint="--ttl")
    body = {"destination": destination, "ttl_sec": ttl_s, "payload": ""}
    if _running(directory):
        body["payload"] = base64.b64encode(payload).decode()
        answer = _client(directory, "post", "/v1/bundles", json.dumps(body).encode())
    else:
        answer = _offline(directory, lambda b: b.send(destination, ttl_s, payload))
    if as_json:
        emit({"bundle_id": answer["bundle_id"], "expires_at": answer["expires_at"]}, as_json=True)
    else:
        emit({}, as_json=False, human=str(answer["bundle_id"]))


@bundle.command()
@node_dir_option
@click.option(
    "--role",
    type=click.Choice(["inbox", "forwarding", "fragment"]),
    default="inbox",
    show_default=True,
    help="inbox: delivered here; forwarding: held for other nodes.",
)
@json_option
@jsonl_option("One JSON object per bundle, one a line.")
def inbox(directory: Path, role: str, as_json: bool, as_jsonl: bool) -> None:
    """The bundles delivered to this node (or held for others, with --role)."""
    if _running(directory):
        answer = _client(directory, "get", f"/v1/bundles?role={role}&limit=1000")
    else:
        answer = _offline(directory, lambda b: _listing(b, role))
    if as_json:
        emit(answer, as_json=True)
        return
    if as_jsonl:
        emit_lines(answer.get("bundles", []))
        return
    header = ("BUNDLE_ID", "SOURCE", "DESTINATION", "EXPIRES_AT", "BYTES")
    rows = [
        (
            item["bundle_id"],
            item["source"],
            item.get("destination"),
            item["expires_at"],
            len(base64.b64decode(item["payload"])),
        )
        for item in answer.get("bundles", [])
    ]
    emit(
        {}, as_json=False, human=table(header, rows, right={4}) if rows else f"no bundles ({role})"
    )


@bundle.command()
@node_dir_option
@click.argument("bundle_id")
@json_option
def ack(directory: Path, bundle_id: str, as_json: bool) -> None:
    """Acknowledge a delivered bundle: it leaves the inbox (a copy that comes again is
    still dropped until the bundle expires)."""
    from trustmesh.bundle.ids import BundleId

    try:
        bundle_id = str(BundleId.parse(bundle_id))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="BUNDLE_ID") from None
    if _running(directory):
        answer = _client(directory, "delete", f"/v1/bundles/{bundle_id}")
    else:
        answer = _offline(directory, lambda b: _acknowledge(b, bundle_id))
    emit(answer, as_json=as_json)


# --- the two paths -------------------------------------------------------------------------


def _running(directory: Path) -> bool:
    """Whether the node runs (it holds its bundle store): then its API is asked."""
    from trustmesh.node.bundles import StoreBusyError, StoreLock
    from trustmesh.node.runfile import RUN_FILE

    try:
        StoreLock(directory).release()
    except StoreBusyError:
        if not (directory / RUN_FILE).exists():
            raise click.ClickException(
                f"the node in {directory} is starting (its bundle store is in use); "
                "try again in a moment"
            ) from None
        return True
    return False


def _client(directory: Path, method: str, path: str, body: bytes | None = None) -> Any:
    from trustmesh.node.client import NodeClient, node_passphrase

    client = NodeClient(directory, passphrase=node_passphrase(directory))
    if method == "post":
        assert body is not None
        return asyncio.run(client.post(path, body))
    if method == "delete":
        return asyncio.run(client.delete(path))
    return asyncio.run(client.get(path))


def _offline(directory: Path, work: Any) -> Any:
    """``work(bundles)`` on the node's own store and key, the node not running."""
    from trustmesh.clock import SYSTEM_CLOCK
    from trustmesh.keystore.uri import close_signer
    from trustmesh.mesh.bundle_codec import MeshBundleCodec
    from trustmesh.mesh.dtn import BundleAgent
    from trustmesh.mesh.trust import TrustView
    from trustmesh.node.bundles import NodeBundles, StoreLock
    from trustmesh.node.client import node_passphrase
    from trustmesh.node.config import load_config
    from trustmesh.node.identity import open_node_signer

    config = load_config(directory)
    chain = tuple(x509.load_pem_x509_certificates((directory / "node.crt").read_bytes()))
    chain_der = tuple(c.public_bytes(Encoding.DER) for c in chain)
    roots = x509.load_pem_x509_certificates((directory / "ca.crt").read_bytes())
    key = open_node_signer(directory, node_passphrase(directory))
    lock = StoreLock(directory)  # the node may start meanwhile: it waits for none
    store = NodeBundles.open_store(
        directory, quota=config.bundle_quota, source_quota=config.bundle_source_quota
    )
    trust = TrustView(roots, chain[1:])
    codec = MeshBundleCodec(config.node_id, trust, key.sign, lambda: chain_der)
    agent: BundleAgent[Any] = BundleAgent(config.node_id, store, codec, copies=config.bundle_copies)
    serial = format(chain[0].serial_number, "x")
    service = NodeBundles(
        config.node_id, store, codec, agent, SYSTEM_CLOCK, lambda _: None, lambda: serial
    )
    try:
        result = work(service)
    finally:
        store.close()
        lock.release()
        close_signer(key)
    if isinstance(result, tuple):
        from trustmesh.node.bundle_api import iso

        bundle_id, expires_ms = result
        return {"bundle_id": bundle_id, "expires_at": iso(expires_ms), "expires_at_ms": expires_ms}
    return result


def _listing(service: Any, role: str) -> dict[str, Any]:
    from trustmesh.node.bundle_api import MAX_LIST, item_json

    held = service.items(role, MAX_LIST + 1)
    items = [item_json(service, b) for b in held[:MAX_LIST]]
    return {
        "node_id": service.node_id,
        "role": role,
        "bundles": items,
        "more": len(held) > MAX_LIST,
    }


def _acknowledge(service: Any, bundle_id: str) -> dict[str, Any]:
    from trustmesh.node.client import NodeApiError

    if not service.acknowledge(bundle_id):
        raise NodeApiError(f"no bundle {bundle_id} in the inbox", status=404, code="not_found")
    return {"bundle_id": bundle_id, "status": "acknowledged"}
