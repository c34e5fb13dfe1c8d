"""Attestation on mesh links (zero-trust-mesh.md 2.2, 5.1), whole nodes on loopback: each
node with its own swtpm, enrolled with a quote; peers challenge each other after the
handshake and check the quote (bound to the TLS exporter) against the AK and PCR digest
the CA put in the certificate. A node whose PCRs changed since enrollment is demoted,
cut off, or reported and revoked, by the checker's policy; a node without a TPM fails."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from trustmesh.mesh.gossip import anomaly_payload
from trustmesh.mesh.link import CloseCode
from trustmesh.node.local import LocalMesh
from trustmesh.node.runtime import MeshNode
from trustmesh.pki.attestation_report import judge_report
from trustmesh.pki.errors import PkiError
from trustmesh.tpm.device import TpmDevice
from trustmesh.tpm.evidence import QuoteEvidence
from trustmesh.tpm.policy import AttestationPolicyFile, load_policy
from trustmesh.tpm.swtpm import Swtpm

WAIT = 15.0
SETTINGS: dict[str, Any] = {"digest_interval": 0.2, "crl_interval": 3600.0}
PCRS = range(8)


def policy_for(directory: Path, tpms: list[Swtpm]) -> AttestationPolicyFile:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ek-ca.pem").write_bytes(b"".join(t.ek_ca + t.ek_root for t in tpms))
    zero = "0" * 64
    (directory / "policy.toml").write_text(
        'pcrs = [0, 1, 2, 3, 4, 5, 6, 7]\nrequire_ek = true\nek_ca_files = ["ek-ca.pem"]\n'
        '[[device_class]]\nname = "swtpm"\n[device_class.pcrs]\n'
        + "".join(f'{i} = "{zero}"\n' for i in PCRS)
    )
    return load_policy(directory / "policy.toml")


class Events:
    """What a node logs, kept for the test to wait on."""

    def __init__(self, node: MeshNode) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []
        node.listeners.append(lambda event, fields: self.seen.append((event, dict(fields))))

    def has(self, event: str, **fields: Any) -> bool:
        return any(
            e == event and all(f.get(k) == v for k, v in fields.items()) for e, f in self.seen
        )


async def start(
    mesh: LocalMesh, index: int, tpm: Swtpm | None, **settings: Any
) -> tuple[MeshNode, Events]:
    attest = None if tpm is None else f"tpm:{tpm.tcti}"
    directory = await mesh.enroll(index, attest=attest, **{**SETTINGS, **settings})
    node = await asyncio.to_thread(MeshNode.from_directory, directory)
    events = Events(node)
    await node.start()
    mesh.nodes.append(node)
    return node, events


async def start_changed(local: LocalMesh, index: int, tpm: Swtpm, pcr: int) -> MeshNode:
    """node-``index`` enrolled with a quote, then its PCR ``pcr`` extended (another kernel
    booted since enrollment, say), then started."""
    directory = await local.enroll(index, attest=f"tpm:{tpm.tcti}", **SETTINGS)
    with TpmDevice.open(tpm.tcti) as device:
        device.pcr_extend(pcr, bytes(range(32)))
    node = await asyncio.to_thread(MeshNode.from_directory, directory)
    await node.start()
    local.nodes.append(node)
    return node


async def two_tpms(
    mesh: Callable[[list[Swtpm]], LocalMesh], make_swtpm: Callable[[], Swtpm]
) -> tuple[list[Swtpm], LocalMesh]:
    tpms = [make_swtpm(), make_swtpm()]
    local = mesh(tpms)
    await local.start_ca()
    return tpms, local


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Callable[[list[Swtpm]], LocalMesh]]:
    made: list[LocalMesh] = []

    def make(tpms: list[Swtpm]) -> LocalMesh:
        local = LocalMesh(tmp_path, 1, attestation=policy_for(tmp_path / "policy", tpms))
        made.append(local)
        return local

    yield make
    for local in made:
        await local.stop()


async def test_attested_peers_prove_their_platform_on_every_link(
    mesh: Callable[[list[Swtpm]], LocalMesh], make_swtpm: Callable[[], Swtpm]
) -> None:
    tpms, local = await two_tpms(mesh, make_swtpm)
    one, one_events = await start(local, 1, tpms[0], link_attestation="close")
    _, two_events = await start(local, 2, tpms[1], link_attestation="close")
    await local.wait_for(
        lambda: (
            one_events.has("link.attested", peer="node-2")
            and two_events.has("link.attested", peer="node-1")
        ),
        WAIT,
        what="both ends attested",
    )
    assert "node-2" in one.links and one.links["node-2"].up
    assert not one_events.has("link.attestation_failed")


async def test_changed_pcrs_close_the_link_and_a_node_without_a_tpm_fails(
    mesh: Callable[[list[Swtpm]], LocalMesh], make_swtpm: Callable[[], Swtpm]
) -> None:
    tpms, local = await two_tpms(mesh, make_swtpm)
    checker, events = await start(local, 1, tpms[0], link_attestation="close")
    await start_changed(local, 2, tpms[1], 7)
    await local.wait_for(
        lambda: events.has("link.attestation_failed", peer="node-2"), WAIT, what="refusal"
    )
    failed = next(f for e, f in events.seen if e == "link.attestation_failed")
    assert "PCRs changed since enrollment" in failed["reason"], failed
    assert failed["policy"] == "close"
    await local.wait_for(
        lambda: events.has("link.down", peer="node-2"), WAIT, what="the link closed"
    )
    down = next(f for e, f in events.seen if e == "link.down" and f.get("peer") == "node-2")
    assert CloseCode.ATTESTATION in down["reason"]

    # A node with no TPM (a key file, enrolled without a quote) cannot prove anything.
    plain, _ = await start(local, 3, None)
    await local.wait_for(
        lambda: events.has("link.attestation_failed", peer="node-3"), WAIT, what="refusal"
    )
    reasons = [f["reason"] for e, f in events.seen if e == "link.attestation_failed"]
    assert any("does not attest" in r or "no attested platform" in r for r in reasons), reasons
    assert plain.node_id not in checker.links or not checker.links[plain.node_id].up


async def test_a_demoted_peer_keeps_its_link_but_gets_no_say_in_gossip(
    mesh: Callable[[list[Swtpm]], LocalMesh], make_swtpm: Callable[[], Swtpm]
) -> None:
    tpms, local = await two_tpms(mesh, make_swtpm)
    checker, events = await start(local, 1, tpms[0], link_attestation="demote")
    demoted = await start_changed(local, 2, tpms[1], 0)
    await local.wait_for(
        lambda: events.has("link.attestation_failed", peer="node-2"), WAIT, what="demotion"
    )
    assert "node-2" in checker.core.attestation.demoted
    assert checker.links["node-2"].up  # kept: demoted, not cut off
    # Nothing the checker spreads goes to the demoted peer ...
    assert "node-2" not in checker.core.gossip_peers()
    # ... and what the demoted peer sends is dropped unread.
    message = demoted.publish(anomaly_payload("ab" * 16, "port-scan", 0.5, {}))
    await local.wait_for(
        lambda: events.has("gossip.demoted_dropped", peer="node-2"), WAIT, what="a drop"
    )
    assert message.message_id not in checker.seen
    assert checker.links["node-2"].up


async def test_revoke_policy_reports_the_quote_and_the_ca_revokes(
    mesh: Callable[[list[Swtpm]], LocalMesh], make_swtpm: Callable[[], Swtpm]
) -> None:
    tpms, local = await two_tpms(mesh, make_swtpm)
    _, events = await start(local, 1, tpms[0], link_attestation="revoke")
    bad = await start_changed(local, 2, tpms[1], 4)
    await local.wait_for(
        lambda: events.has("attestation.reported", verdict="revoked"), WAIT, what="revocation"
    )
    assert local.ca is not None
    record = local.ca.store.get(bad.identity.certificate.serial_number)
    assert record is not None and record.revoked_at is not None
    assert record.reason == "privilegeWithdrawn"
    audit = [e for e in local.ca.store.audit() if e.event == "attestation-failure"]
    assert audit and audit[0].detail["reported_by"] == "node-1"


async def test_the_ca_believes_a_quote_not_a_reporter(
    mesh: Callable[[list[Swtpm]], LocalMesh], make_swtpm: Callable[[], Swtpm]
) -> None:
    tpms, local = await two_tpms(mesh, make_swtpm)
    one, _ = await start(local, 1, tpms[0])
    two, _ = await start(local, 2, tpms[1])
    assert local.ca is not None
    reporter = local.ca.store.get(one.identity.certificate.serial_number)
    target = two.identity.certificate.serial_number
    assert reporter is not None
    policy = local.attestation
    now = local.ca.clock.now()

    def quote(tpm: Swtpm) -> QuoteEvidence:
        with TpmDevice.open(tpm.tcti) as device:
            return device.quote(0x81010002, bytes(32), list(PCRS))

    # A fresh quote of a healthy node revokes nothing.
    verdict = judge_report(local.ca, reporter, target, quote(tpms[1]), policy, now)
    assert verdict.verdict == "passes" and not verdict.revoked
    # Another TPM's quote (the reporter's own) proves nothing about node-2.
    with pytest.raises(PkiError, match="not by the AK"):
        judge_report(local.ca, reporter, target, quote(tpms[0]), policy, now)
    # A quote with tampered PCR values does not verify.
    honest = quote(tpms[1])
    lying = QuoteEvidence(honest.quote, honest.signature, honest.ak_public, {7: b"\x01" * 32})
    with pytest.raises(PkiError, match="proves nothing"):
        judge_report(local.ca, reporter, target, lying, policy, now)
    record = local.ca.store.get(target)
    assert record is not None and record.revoked_at is None
