"""The dashboard in a real browser: headless Chromium loads the page from
``trustmesh node dashboard``'s proxy, shows the three nodes of a three-node mesh, and
shows a revocation within seconds, live (Server-Sent Events), without a reload."""

from __future__ import annotations

from pathlib import Path

import pytest
from dashtools import browser_page, chromium_missing, node_count, start_mesh

from trustmesh.mesh.gossip import anomaly_payload
from trustmesh.node.dashboard import DashboardProxy

pytestmark = pytest.mark.timeout(60)

SHOWN_MS = 10_000  # how long the page may take to show a change (it takes about one second)


@pytest.fixture(autouse=True)
def _chromium() -> None:
    missing = chromium_missing()
    if missing is not None:
        pytest.fail(missing)


async def test_the_page_shows_the_mesh_and_a_revocation_live(tmp_path: Path) -> None:
    mesh = await start_mesh(tmp_path, 3)
    try:
        assert mesh.ca is not None
        first = mesh.nodes[0]
        async with DashboardProxy(first.directory) as proxy, browser_page() as page:
            problems: list[str] = []
            page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
            page.on(
                "console",
                lambda m: (
                    problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None
                ),
            )
            await page.goto(proxy.url)
            # The page loads and draws the three nodes: node-1 itself and its two links.
            await page.wait_for_function(
                "document.querySelectorAll('#graph g.node').length === 3", timeout=SHOWN_MS
            )
            assert await node_count(page) == 3
            assert await page.text_content("#node-count") == "3"
            assert await page.text_content("#node-id") == "node-1"
            states = await page.eval_on_selector_all(
                "#graph g.node", "gs => gs.map(g => [g.dataset.node, g.dataset.state])"
            )
            assert sorted(states) == [
                ["node-1", "self"],
                ["node-2", "connected"],
                ["node-3", "connected"],
            ]
            assert await page.locator("#graph line.link").count() == 2
            await page.wait_for_selector("#live.on", timeout=SHOWN_MS)  # the stream is up

            # An anomaly node-2 publishes shows up, live.
            mesh.nodes[1].publish(anomaly_payload("c0ffee" * 4, "port-scan", 0.9))
            row = await page.wait_for_selector("#anomalies tr[data-message]", timeout=SHOWN_MS)
            assert row is not None
            assert "port-scan" in (await row.text_content() or "")

            # node-3 is revoked at the CA: node-1 fetches the CRL on its own (every
            # second here) and cuts node-3 off; the page shows it without a reload.
            mesh.ca.revoke(node_id="node-3", reason="keyCompromise")
            await page.wait_for_selector(
                '#graph g.node[data-node="node-3"][data-state="revoked"]', timeout=SHOWN_MS
            )
            assert await page.text_content("#revoked-count") == "1"
            assert await page.text_content("#revoked-nodes li[data-node='node-3']") == "node-3"
            assert await page.locator("#graph line.link").count() == 1
            assert await node_count(page) == 3  # still drawn, as revoked
            assert problems == []  # no script error, no blocked resource (CSP)
    finally:
        await mesh.stop()
