"""``trustmesh demo``: a zero-trust mesh on loopback, every claim checked.

1. An embedded CA serves its HTTPS API; each node enrolls with its own single-use token.
   With swtpm installed, node-3 keeps its identity key in a software TPM and enrolls
   with a TPM quote that the CA checks against an attestation policy (demo.tpm); its
   gossip is signed in the TPM. Without swtpm, every node keeps its key in a file.
2. The nodes link over TLS 1.3 mTLS (ALPN dadm-mesh/1) into one connected mesh.
3. node-1 publishes an anomaly signature; it reaches every node, timed per node.
4. node-2 is stopped; node-1 sends it a bundle, which the mesh stores; node-2 comes
   back and the bundle is delivered to its inbox (store and forward, RFC 9171 bundles).
5. The last node is revoked through the CA API; every other node cuts it off, refuses
   its gossip, and refuses it at the TLS handshake.
6. Everything shuts down cleanly, and what the nodes received is on disk.

Checks go through the nodes' HTTPS APIs (with each node's own certificate) wherever an
operator would look, so the demo shows what the product does, not what a test hook says.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import json
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from trustmesh.api.ca_client import CaClient, CaRequestFailed, make_csr
from trustmesh.crypto.keys import KeyKind, PrivateKey
from trustmesh.demo.steps import DemoFailure, Step, check
from trustmesh.demo.tpm import (
    DEVICE_CLASS,
    IDENTITY_HANDLE,
    NO_TPM_LINE,
    POLICY_FILE,
    DemoTpm,
    pcr_range,
    start_tpm_node,
    tpm_absence,
)
from trustmesh.errors import ProtocolError
from trustmesh.mesh.gossip import anomaly_payload
from trustmesh.mesh.store import MeshStore
from trustmesh.node.client import NodeApiError, NodeClient
from trustmesh.node.config import load_config, write_config
from trustmesh.node.links import LinkFailed
from trustmesh.node.local import LocalMesh, is_connected
from trustmesh.node.runtime import RUN_FILE, STORE_FILE, MeshNode, now_ms
from trustmesh.pki.extensions import (
    attested_platform_of,
    device_public_key,
    identity_key_of,
    spki_der,
)
from trustmesh.tpm.attester import DEFAULT_PCRS

MAX_NODES = 200
FORM_TIMEOUT = 30.0
SPREAD_TIMEOUT = 10.0
REVOKE_TIMEOUT = 10.0
BUNDLE_TIMEOUT = 20.0
NODE_SETTINGS = {"crl_interval": 1.0, "digest_interval": 0.25}
TPM_NODE = 3  # neither the bootstrap and origin (node-1) nor the one restarted (node-2)
AUDIT_SCAN = 10 * MAX_NODES  # audit entries read back: more than a demo's CA writes

Progress = Callable[[str, Step | None], None]  # (step name, None when it starts / its result)


class MeshDemo:
    """``tpm``: run node-3 on a TPM (True: it must; None: when swtpm is installed);
    ``passphrase``: the CA keys' (default: a random one, in ``self.passphrase``)."""

    def __init__(
        self,
        workdir: Path,
        nodes: int,
        *,
        tpm: bool | None = None,
        passphrase: bytes | None = None,
    ) -> None:
        if not 3 <= nodes <= MAX_NODES:
            raise ValueError(f"the demo runs 3 to {MAX_NODES} nodes")
        self.passphrase = secrets.token_urlsafe(18).encode() if passphrase is None else passphrase
        self.mesh = LocalMesh(
            workdir, nodes, passphrase=self.passphrase, node_settings=dict(NODE_SETTINGS)
        )
        self.count = nodes
        self.clients: dict[str, NodeClient] = {}
        self.message_id: str | None = None
        self.victim = f"node-{nodes}"
        self.tpm_absence = "the TPM node is off" if tpm is False else tpm_absence()
        if tpm and self.tpm_absence is not None:
            raise ValueError(f"a TPM node was asked for: {self.tpm_absence}")
        self.tpm = None if self.tpm_absence is not None else DemoTpm(workdir / "swtpm")
        self.tpm_node = f"node-{TPM_NODE}"

    async def run(
        self,
        progress: Progress | None = None,
        before_shutdown: Callable[[MeshDemo], Awaitable[None]] | None = None,
    ) -> list[Step]:
        """The steps; ``before_shutdown`` runs with the mesh still up, after the checks
        (``trustmesh demo --dashboard`` serves the page until it is told to stop)."""
        plan: list[tuple[str, Callable[[], Awaitable[tuple[str, dict[str, Any]]]]]] = [
            ("ca and enrollment", self._enroll),
            ("tpm identity", self._tpm_identity),
            ("mesh forms", self._form),
            ("anomaly gossip", self._spread),
            ("store and forward", self._store_and_forward),
            ("revocation", self._revoke),
        ]
        steps: list[Step] = []
        try:
            for name, action in plan:
                if steps and not steps[-1].ok:
                    steps.append(Step(name, False, f"not run: {steps[-1].name!r} failed", 0.0))
                    continue
                steps.append(await _timed(name, action, progress))
            if before_shutdown is not None:
                await before_shutdown(self)
            steps.append(await _timed("clean shutdown", self._shutdown, progress))
        finally:
            # Last, once the nodes closed their TPM sessions; also on Ctrl-C (a
            # cancellation), since the swtpm runs in a session of its own.
            if self.tpm is not None:
                self.tpm.close()
        return steps

    # --- the steps ----------------------------------------------------------------------------

    async def _enroll(self) -> tuple[str, dict[str, Any]]:
        mesh = self.mesh
        if self.tpm is not None:
            self.tpm.begin()  # manufacturing a TPM takes a second: meanwhile, the rest
        server = await mesh.start_ca()
        assert mesh.ca is not None
        tokens = {i: mesh.ca.create_token(f"node-{i}") for i in range(1, self.count + 1)}
        first_token = tokens[1]
        await mesh.start_node(await mesh.enroll(1, token=tokens[1]))  # everyone's bootstrap
        rest = [i for i in range(2, self.count + 1) if self.tpm is None or i != TPM_NODE]
        jobs: list[Awaitable[object]] = [mesh.start_many(rest, tokens=tokens)]
        if self.tpm is not None:
            jobs.append(start_tpm_node(mesh, TPM_NODE, tokens[TPM_NODE], self.tpm))
        # Every job ends (none is left running into the next step), then a failure counts.
        done = await asyncio.gather(*jobs, return_exceptions=True)
        mesh.nodes.sort(key=_index)  # each job added its nodes as they started
        for result in done:
            if isinstance(result, BaseException):
                raise result
        for node in mesh.nodes:
            self.clients[node.node_id] = NodeClient(node.directory)
        # A spent token buys nothing more.
        client = CaClient(server.url, mesh.ca_dir / "ca.crt")
        csr = make_csr(PrivateKey.generate(KeyKind.P256), "node-1")
        try:
            await asyncio.to_thread(client.enroll, first_token, csr, node_id="node-1")
            raise DemoFailure("a used enrollment token was accepted again")
        except CaRequestFailed as exc:
            check(exc.status == 400, f"token reuse gave {exc.status}, not 400")
        serials = {n.node_id: format(n.identity.certificate.serial_number, "x") for n in mesh.nodes}
        for node in mesh.nodes:
            identity = node.trust.identity_of(node.identity.chain, now_ms=now_ms())
            check(identity.node_id == node.node_id, f"{node.node_id}'s certificate names another")
        return (
            f"CA API at {server.url}; {self.count} nodes enrolled over HTTPS with their own "
            "single-use tokens (a reused token was refused); every certificate chains to the root",
            {"ca_url": server.url, "serials": serials},
        )

    async def _tpm_identity(self) -> tuple[str, dict[str, Any]]:
        mesh = self.mesh
        on_devices = sorted(n.node_id for n in mesh.nodes if n.device is not None)
        attested = sorted(
            n.node_id for n in mesh.nodes if attested_platform_of(n.identity.certificate)
        )
        if self.tpm is None:
            check(not on_devices, f"nodes sign on a device without a TPM node: {on_devices}")
            return f"{self.tpm_absence}: {NO_TPM_LINE}", {"tpm": False, "reason": self.tpm_absence}
        assert mesh.ca is not None
        tpm = await self.tpm.ready()
        name = self.tpm_node
        node = next(n for n in mesh.nodes if n.node_id == name)
        check(on_devices == [name], f"nodes signing on a device: {on_devices}, not {name}")
        check(attested == [name], f"nodes with an attested platform: {attested}, not {name}")
        assert node.device is not None
        # Its certificate binds the TPM's key as its identity, apart from the TLS key.
        cert = node.identity.certificate
        identity = spki_der(identity_key_of(cert))
        check(
            identity == spki_der(device_public_key(node.device)),
            f"{name}'s certificate names another identity key than its TPM's",
        )
        check(identity != spki_der(cert.public_key()), f"{name}'s identity is its TLS key")
        # ...and the platform the CA attested: the PCRs quoted, and the TPM's own AK.
        platform = attested_platform_of(cert)
        assert platform is not None
        check(platform.device_class == DEVICE_CLASS, f"device class {platform.device_class}")
        check(platform.pcrs == DEFAULT_PCRS, f"{name}'s quote covered PCRs {platform.pcrs}")
        check(platform.ak_public == tpm.ak_public, f"{name}'s certificate names another AK")
        # The CA checked the EK certificate and the activated credential (require_ek),
        # and its audit keeps the quote for anyone to re-check.
        audit = mesh.ca.store.audit(limit=AUDIT_SCAN)  # newest first: reach back to node-3
        entries = [e for e in audit if (e.event, e.node_id) == ("enroll", name)]
        check(len(entries) == 1, f"the CA audited {len(entries)} enrollments of {name}")
        attestation = _mapping(entries[0].detail.get("attestation"), "audited attestation")
        evidence = _mapping(attestation.get("evidence"), "audited evidence")
        check(bool(evidence.get("quote")), f"the CA's audit holds no quote by {name}")
        check(bool(evidence.get("ek_certificate")), f"{name}'s AK was not tied to an EK")
        pcrs = pcr_range(platform.pcrs)
        files = self.count - 1
        return (
            f"{name}: identity key in a TPM (swtpm, handle 0x{IDENTITY_HANDLE:08x}), bound "
            f"to its TLS key by its certificate; attested: PCRs {pcrs}, AK tied to EK (EK "
            "certificate checked, credential activated), under the CA's policy "
            f"{POLICY_FILE}, the quote in its audit; the other {files} nodes keep their keys "
            "in files",
            {
                "tpm": True,
                "node": name,
                "identity_key": tpm.identity_uri,
                "device_class": platform.device_class,
                "pcrs": list(platform.pcrs),
                "ak_name": attestation.get("ak_name"),
                "policy": str(mesh.ca_dir / POLICY_FILE),
            },
        )

    async def _form(self) -> tuple[str, dict[str, Any]]:
        mesh = self.mesh
        try:
            await mesh.wait_for(mesh.connected, FORM_TIMEOUT, what="a connected mesh")
        except TimeoutError as exc:
            raise DemoFailure(f"{exc}; not joined to node-1: {mesh.unconnected()}") from None
        graph: dict[str, set[str]] = {}
        for node_id, client in self.clients.items():
            answer = await client.get("/v1/mesh/peers")
            graph[node_id] = {p["node_id"] for p in answer["peers"] if p["status"] == "connected"}
        lonely = sorted(n for n, peers in graph.items() if not peers)
        check(not lonely, f"nodes report no connected peer: {lonely}")
        check(is_connected(graph), f"the peer tables do not join into one mesh: {graph}")
        links = sum(len(peers) for peers in graph.values()) // 2
        alpn = {link.driver.core.established.alpn for n in mesh.nodes for link in n.links.values()}  # type: ignore[union-attr]
        check(alpn == {"dadm-mesh/1"}, f"links negotiated {alpn}")
        stats = [n.core.stats for n in mesh.nodes]
        refused = sum(s.refusals_received for s in stats)
        evicted = sum(s.evicted for s in stats)
        dials = sum(s.dials for s in stats)
        degrees = Counter(len(peers) for peers in graph.values())
        spread = ", ".join(f"{d}:{degrees[d]}" for d in sorted(degrees))
        return (
            f"{self.count} nodes joined by {links} TLS 1.3 mTLS links (ALPN dadm-mesh/1) from "
            f"one bootstrap peer and peer exchange; {dials} dials, {refused} refused at a "
            f"peer's cap, {evicted} spare links given up for newcomers; degree:nodes {spread}; "
            "checked through every node's peers API",
            {
                "links": links,
                "dials": dials,
                "dials_refused": refused,
                "evicted": evicted,
                "degrees": {str(d): degrees[d] for d in sorted(degrees)},
                "peers": {k: sorted(v) for k, v in graph.items()},
            },
        )

    async def _spread(self) -> tuple[str, dict[str, Any]]:
        mesh = self.mesh
        origin = mesh.nodes[0]
        digest = hashlib.sha256(b"demo: beacon to 203.0.113.7:4444").hexdigest()
        payload = anomaly_payload(digest, "c2-beacon", 0.9, {"rule": "demo-17"})
        message = origin.sign(payload)
        answer = await self.clients[origin.node_id].post("/v1/mesh/gossip", message.encode())
        check(answer.get("status") == "accepted", f"the API answered {answer}")
        self.message_id = message.message_id
        expected = {message.message_id: digest}
        signed = next((n for n in mesh.nodes if n.device is not None), None)
        if signed is not None:
            # The TPM node's own anomaly, signed in its TPM (a blocking TPM command), is
            # verified by every node with the identity key its certificate binds.
            tpm_digest = hashlib.sha256(b"demo: a TPM-signed report").hexdigest()
            tpm_payload = anomaly_payload(tpm_digest, "port-scan", 0.6, {"rule": "demo-tpm"})
            tpm_message = await asyncio.to_thread(signed.sign, tpm_payload)
            answer = await self.clients[signed.node_id].post(
                "/v1/mesh/gossip", tpm_message.encode()
            )
            check(answer.get("status") == "accepted", f"{signed.node_id}'s API answered {answer}")
            expected[tpm_message.message_id] = tpm_digest
        await mesh.wait_for(
            lambda: all(m in n.seen for n in mesh.nodes for m in expected),
            SPREAD_TIMEOUT,
            what="the anomaly on every node",
        )
        arrival: dict[str, float] = {}
        for node_id, client in self.clients.items():
            listed = (await client.get("/v1/mesh/anomalies"))["anomalies"]
            for message_id, held in expected.items():
                found = [a for a in listed if a["message_id"] == message_id]
                check(len(found) == 1, f"{node_id} lists anomaly {message_id} {len(found)} times")
                check(found[0]["hash"] == held, f"{node_id} holds another hash")
            mine = next(a for a in listed if a["message_id"] == message.message_id)
            arrival[node_id] = mine["received_at"] - message.timestamp
        duplicates = sum(n.engine.stats.duplicates for n in mesh.nodes)
        slowest = max(arrival.values())
        data: dict[str, Any] = {
            "message_id": message.message_id,
            "arrival_ms": arrival,
            "duplicates": duplicates,
        }
        also = ""
        if signed is not None:
            data["tpm_message_id"] = next(m for m in expected if m != message.message_id)
            also = f"; {signed.node_id}'s anomaly, signed in its TPM, reached every node too"
        return (
            f"node-1's signed anomaly reached {len(arrival)}/{self.count} nodes within "
            f"{slowest:.0f} ms of signing; {duplicates} duplicate copies dropped; each node "
            f"lists it once in its anomalies API{also}",
            data,
        )

    async def _store_and_forward(self) -> tuple[str, dict[str, Any]]:
        mesh = self.mesh
        sender = mesh.nodes[0]
        away = next(n for n in mesh.nodes if n.node_id == "node-2")
        directory, listen = away.directory, away.listen_address
        await away.quiesce()
        await away.stop()
        mesh.nodes.remove(away)
        # It comes back where its peers know it: on the port of its signed record.
        write_config(directory, dataclasses.replace(load_config(directory), listen=listen))
        payload = b"while node-2 was away: rotate the relay keys"
        body = {"destination": "node-2", "ttl_sec": 600, "payload": _b64(payload)}
        sent = await self.clients[sender.node_id].post("/v1/bundles", _json(body))
        bundle_id = str(sent["bundle_id"])
        holders = [n.node_id for n in mesh.nodes if n.bundle_store.get(bundle_id, "forwarding")]
        check(bool(holders), "no node holds the bundle for node-2")
        started = time.monotonic()
        back = await mesh.start_node(directory)
        self.clients[back.node_id] = NodeClient(back.directory)
        await mesh.wait_for(
            lambda: back.bundle_store.get(bundle_id, "inbox") is not None,
            BUNDLE_TIMEOUT,
            what="the bundle in node-2's inbox",
        )
        elapsed = time.monotonic() - started
        client = self.clients[back.node_id]
        listed = (await client.get("/v1/bundles", role="inbox"))["bundles"]
        found = [b for b in listed if b["bundle_id"] == bundle_id]
        check(len(found) == 1, f"node-2's inbox lists the bundle {len(found)} times")
        check(_unb64(found[0]["payload"]) == payload, "node-2 got another payload")
        check(found[0]["source"] == sender.node_id, f"the bundle came from {found[0]['source']}")
        await client.delete(f"/v1/bundles/{bundle_id}")
        await mesh.wait_for(mesh.connected, FORM_TIMEOUT, what="the mesh joined again")
        return (
            f"node-2 stopped; node-1's bundle {bundle_id} (201 once stored) was held by "
            f"{', '.join(holders)}; node-2 restarted and found it in its inbox within "
            f"{elapsed * 1000:.0f} ms, signed by node-1, then acknowledged it",
            {"bundle_id": bundle_id, "held_by": holders, "delivered_ms": round(elapsed * 1000)},
        )

    async def _revoke(self) -> tuple[str, dict[str, Any]]:
        mesh = self.mesh
        assert mesh.ca is not None
        assert mesh.ca_server is not None
        victim = next(n for n in mesh.nodes if n.node_id == self.victim)
        others = [n for n in mesh.nodes if n is not victim]
        admin = CaClient(mesh.ca_server.url, mesh.ca_dir / "ca.crt")
        token = mesh.ca.create_admin_token("demo")
        started = time.monotonic()
        await asyncio.to_thread(
            admin.revoke, node_id=self.victim, reason="keyCompromise", admin_token=token
        )

        def cut_off() -> bool:
            return all(self.victim not in n.links and self.victim not in n.peers for n in others)

        await mesh.wait_for(cut_off, REVOKE_TIMEOUT, what=f"every node cutting {self.victim} off")
        elapsed = time.monotonic() - started
        for node in others:
            peers = (await self.clients[node.node_id].get("/v1/mesh/peers"))["peers"]
            check(
                all(p["node_id"] != self.victim for p in peers),
                f"{node.node_id} still lists {self.victim}",
            )
        # Its gossip is refused, signature and all, by a node it never spoke to directly...
        forged = victim.sign(anomaly_payload("ee" * 16, "decoy", 0.1))
        try:
            await self.clients[others[-1].node_id].post("/v1/mesh/gossip", forged.encode())
            raise DemoFailure(f"{others[-1].node_id} accepted gossip from {self.victim}")
        except NodeApiError as exc:
            check(exc.status == 403, f"its gossip got {exc.status}, not 403")
        # ...and so is a new link: the TLS handshake fails on its certificate, with the
        # certificate_revoked alert (not a refusal after TLS, at link start).
        refusal = await _link_refusal(victim, mesh.nodes[0].listen_address)
        check(refusal is not None, f"{self.victim} could still open a link")
        check(
            refusal is not None and "alert certificate revoked" in refusal,
            f"{self.victim}'s new link failed, but not at the TLS handshake: {refusal}",
        )
        check(all(forged.message_id not in n.seen for n in others), "the decoy spread")
        return (
            f"{self.victim} revoked through the CA API; all {len(others)} other nodes closed "
            f"its links and dropped it from their peer tables within {elapsed * 1000:.0f} ms "
            "(CRL fetch and push); its gossip got 403 and its new link failed the TLS handshake "
            "(certificate_revoked alert)",
            {"revoked": self.victim, "cut_off_ms": round(elapsed * 1000, 1), "refusal": refusal},
        )

    async def _shutdown(self) -> tuple[str, dict[str, Any]]:
        mesh = self.mesh
        nodes = list(mesh.nodes)
        closed: list[str] = []
        for node in nodes:
            node.listeners.append(
                lambda event, fields: closed.append(event) if event == "link.down" else None
            )
        await mesh.stop()
        for node in nodes:
            check(not node.links, f"{node.node_id} kept links open")
            check(not (node.directory / RUN_FILE).exists(), f"{node.node_id} left {RUN_FILE}")
        kept = 0
        if self.message_id is not None:
            for node in nodes:
                store = MeshStore(node.directory / STORE_FILE)
                try:
                    ids = {i.message_id for i in store.indicators()}
                    seen = {m for m, _ in store.seen()}
                finally:
                    store.close()
                check(self.message_id in ids, f"{node.node_id} lost the anomaly on disk")
                check(self.message_id in seen, f"{node.node_id} lost its seen-cache")
                kept += 1
        return (
            f"{len(nodes)} nodes closed their links with CLOSE frames, stopped their APIs and "
            f"committed their stores ({kept} hold the anomaly and its seen-id on disk); the CA "
            "stopped",
            {"links_closed": len(closed)},
        )


async def run_mesh_demo(
    workdir: Path,
    nodes: int,
    progress: Progress | None = None,
    *,
    tpm: bool | None = None,
    passphrase: bytes | None = None,
    before_shutdown: Callable[[MeshDemo], Awaitable[None]] | None = None,
) -> list[Step]:
    """The mesh demo in ``workdir``; ``passphrase`` encrypts the CA's keys."""
    demo = MeshDemo(workdir, nodes, tpm=tpm, passphrase=passphrase)
    return await demo.run(progress, before_shutdown)


async def _timed(
    name: str,
    action: Callable[[], Awaitable[tuple[str, dict[str, Any]]]],
    progress: Progress | None,
) -> Step:
    if progress is not None:
        progress(name, None)
    started = time.monotonic()
    try:
        detail, data = await action()
        step = Step(name, True, detail, time.monotonic() - started, data)
    except (DemoFailure, ProtocolError, OSError, TimeoutError) as exc:
        step = Step(name, False, f"{type(exc).__name__}: {exc}", time.monotonic() - started)
    if progress is not None:
        progress(name, step)
    return step


async def _link_refusal(node: MeshNode, address: str) -> str | None:
    """Why ``node`` cannot open a link to ``address`` (None: it can)."""
    try:
        link = await node.dial(address)
    except (LinkFailed, OSError) as exc:
        return str(exc)
    link.close()
    return None


def _mapping(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise DemoFailure(f"no {what}: {value!r}")
    return value


def _index(node: MeshNode) -> int:
    return int(node.node_id.rsplit("-", 1)[1])


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


def _json(data: dict[str, Any]) -> bytes:
    return json.dumps(data).encode()
