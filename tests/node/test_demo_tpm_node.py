"""The demo's TPM node (issue 20): with swtpm installed, node-3 keeps its identity key in
a software TPM and enrolls with a quote the demo CA checks; its gossip, signed in the
TPM, is kept by every node; the swtpm is stopped at the end, when a step fails, and
when the demo is interrupted (Ctrl-C cancels it)."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

import trustmesh.demo.tpm as demo_tpm
from trustmesh.demo.mesh import MeshDemo
from trustmesh.mesh.store import MeshStore
from trustmesh.node.runtime import STORE_FILE
from trustmesh.tpm import swtpm
from trustmesh.tpm.policy import AttestationPolicyFile, DeviceClass, load_policy

WAIT = 30.0


def _tpm_demo(workdir: Path, nodes: int) -> tuple[MeshDemo, demo_tpm.DemoTpm]:
    if not swtpm.available():
        pytest.fail("swtpm is not installed; scripts/dev test installs it")
    demo = MeshDemo(workdir, nodes, tpm=True)
    assert demo.tpm is not None
    return demo, demo.tpm


async def test_the_tpm_node_gossip_is_kept_by_every_node_and_the_swtpm_stops(
    tmp_path: Path,
) -> None:
    demo, tpm = _tpm_demo(tmp_path, 4)
    steps = await demo.run()
    assert [(s.name, s.detail) for s in steps if not s.ok] == []
    device = next(s for s in steps if s.name == "tpm identity")
    assert device.data["tpm"] is True
    assert device.detail.startswith("node-3: identity key in a TPM (swtpm")
    assert "attested: PCRs 0-7, AK tied to EK" in device.detail
    assert "the other 3 nodes keep their keys in files" in device.detail
    tpm_message = next(s for s in steps if s.name == "anomaly gossip").data["tpm_message_id"]
    for index in range(1, 5):
        store = MeshStore(tmp_path / f"node-{index}" / STORE_FILE)
        try:
            kept = {i.message_id: i.origin for i in store.indicators()}
        finally:
            store.close()
        assert kept.get(tpm_message) == "node-3", index
    ready = await tpm.ready()
    assert ready.swtpm.process.poll() is not None  # stopped by the demo


async def test_a_quote_the_ca_refuses_fails_the_demo_and_stops_the_swtpm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def strict(path: Path | str) -> AttestationPolicyFile:
        # The CA admits only another platform: PCR 0 must hold 11...11.
        other = DeviceClass("other", {0: frozenset({b"\x11" * 32})})
        return dataclasses.replace(load_policy(path), device_classes=(other,))

    monkeypatch.setattr(demo_tpm, "load_policy", strict)
    demo, tpm = _tpm_demo(tmp_path, 3)
    steps = await demo.run()
    assert [s.name for s in steps if s.ok] == ["clean shutdown"]
    assert "attestation" in steps[0].detail, steps[0].detail
    assert all(s.detail.startswith("not run") for s in steps[1:-1])
    assert not (tmp_path / "node-3" / "node.key").exists()
    ready = await tpm.ready()
    assert ready.swtpm.process.poll() is not None


async def test_an_interrupted_demo_stops_its_swtpm(tmp_path: Path) -> None:
    demo, tpm = _tpm_demo(tmp_path, 3)
    running = asyncio.create_task(demo.run())
    # Ctrl-C cancels the demo's task (asyncio.run does): here, once its swtpm is up.
    ready = await asyncio.wait_for(tpm.ready(), WAIT)
    assert ready.swtpm.process.poll() is None
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert ready.swtpm.process.poll() is not None
    await demo.mesh.stop()  # what asyncio.run's exit would drop; here, tidily
