"""Take the README's dashboard screenshot (docs/dashboard.png):

    .venv/bin/python tests/dashboard/screenshot.py docs/dashboard.png

A five-node mesh on loopback with fixed names; node-2 and node-4 publish anomalies,
node-5 is revoked; then headless Chromium photographs node-1's dashboard, served by the
proxy of ``trustmesh node dashboard``. Only the times and the serials change between two
runs.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

from dashtools import browser_page, chromium_missing, node_count, start_mesh

from trustmesh.mesh.gossip import anomaly_payload
from trustmesh.node.dashboard import DashboardProxy

NODES = 5
ANOMALIES = (  # (publishing node, hash, kind, risk)
    (2, "9f86d081884c7d659a2feaa0c55ad015", "port-scan", 0.8),
    (4, "2c26b46b68ffc68ff99b453c1d304134", "credential-stuffing", 0.65),
    (3, "fcde2b2edba56bf408601fb721fe9b5c", "dns-tunnel", 0.4),
)
SHOWN_MS = 15_000


async def take(out: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="trustmesh-dashboard-") as tmp:
        mesh = await start_mesh(Path(tmp), NODES)
        try:
            assert mesh.ca is not None
            for index, digest, kind, risk in ANOMALIES:
                mesh.nodes[index - 1].publish(anomaly_payload(digest, kind, risk))
            victim = f"node-{NODES}"
            mesh.ca.revoke(node_id=victim, reason="keyCompromise")
            async with DashboardProxy(mesh.nodes[0].directory) as proxy, browser_page() as page:
                await page.goto(proxy.url)
                await page.wait_for_selector(
                    f'#graph g.node[data-node="{victim}"][data-state="revoked"]',
                    timeout=SHOWN_MS,
                )
                await page.wait_for_function(
                    f"document.querySelectorAll('#anomalies tr[data-message]').length"
                    f" === {len(ANOMALIES)}",
                    timeout=SHOWN_MS,
                )
                assert await node_count(page) == NODES
                await page.screenshot(path=str(out), full_page=True)
        finally:
            await mesh.stop()


def main() -> int:
    missing = chromium_missing()
    if missing is not None:
        print(missing, file=sys.stderr)
        return 1
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/dashboard.png")
    asyncio.run(take(out))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
