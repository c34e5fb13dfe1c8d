"""What the dashboard tests and the screenshot script share: a local mesh whose node-1
is linked to every other node, and a page in headless Chromium (Debian's ``chromium``,
driven by Playwright with that binary: no browser download).

Not a test module (no ``test_`` prefix).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

from trustmesh.node.local import LocalMesh

if TYPE_CHECKING:
    from playwright.async_api import Page

# Debian's package; TRUSTMESH_CHROMIUM names another build of Chromium.
CHROMIUM = os.environ.get("TRUSTMESH_CHROMIUM", "/usr/bin/chromium")
# Digests and CRL polls often, so that the mesh forms, and a revocation arrives, within
# a second or two.
SETTINGS = {"digest_interval": 0.2, "crl_interval": 1.0}
FORM_TIMEOUT = 20.0
WIDTH, HEIGHT = 1280, 980


def chromium_missing() -> str | None:
    """Why the browser cannot run here (None: it can)."""
    if not Path(CHROMIUM).exists() and shutil.which(CHROMIUM) is None:
        return f"{CHROMIUM} is missing: apt-get install chromium (scripts/dev test installs it)"
    return None


async def start_mesh(workdir: Path, nodes: int) -> LocalMesh:
    """A running mesh of ``nodes`` nodes, node-1 linked (at both ends) to each other."""
    mesh = LocalMesh(workdir, nodes, node_settings=dict(SETTINGS))
    try:
        await mesh.start()
        first, others = mesh.nodes[0], mesh.nodes[1:]

        def star() -> bool:
            return all(n.node_id in first.links and first.node_id in n.links for n in others)

        await mesh.wait_for(star, FORM_TIMEOUT, what="node-1 linked to every node")
    except BaseException:
        await mesh.stop()
        raise
    return mesh


@contextlib.asynccontextmanager
async def browser_page() -> AsyncIterator[Page]:
    """A page of a fresh headless Chromium (closed on the way out)."""
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            # As root (CI) Chromium's sandbox cannot start; /dev/shm may be small.
            args=["--no-sandbox", "--disable-dev-shm-usage"],
        )
        try:
            page = await browser.new_page(viewport={"width": WIDTH, "height": HEIGHT})
            yield page
        finally:
            await browser.close()


async def node_count(page: Page) -> int:
    count = await page.evaluate("document.querySelectorAll('#graph g.node').length")
    assert isinstance(count, int)
    return count
