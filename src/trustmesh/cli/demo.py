"""``trustmesh demo``: the main job, a self-checking mesh on loopback."""

from __future__ import annotations

import asyncio
import logging
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click

from trustmesh.cli.output import emit
from trustmesh.demo import Step, run_mesh_demo, run_tour
from trustmesh.demo.mesh import MAX_NODES

if TYPE_CHECKING:
    from rich.status import Status


@click.command()
@click.option(
    "--nodes",
    type=click.IntRange(3, MAX_NODES),
    default=5,
    show_default=True,
    help="How many mesh nodes to run (each with its own CA enrollment, TLS identity, "
    "link listener and HTTPS API, in one process).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@click.option(
    "--keep",
    type=click.Path(file_okay=False, path_type=Path),
    help="Keep the demo's files (CA, node directories) here instead of a temporary dir.",
)
@click.option(
    "--tour",
    is_flag=True,
    help="Instead of the mesh, tour the foundation: keys, peer IDs, signatures, ECDH, BOTD #2.",
)
def demo(nodes: int, as_json: bool, keep: Path | None, tour: bool) -> int:
    """Run a zero-trust mesh on loopback and check every step.

    \b
    1. an embedded CA; each node enrolls over HTTPS with its own single-use token
    2. the nodes form a mesh of TLS 1.3 mTLS links (ALPN dadm-mesh/1)
    3. node-1 publishes a signed anomaly signature; it reaches every node (timed)
    4. the last node is revoked; every other node cuts it off and refuses it
    5. everything shuts down cleanly

    Real TLS, real HTTP, real files, in one process. Exits 0 only when every step was
    verified. --json prints {"ok", "steps": [{"name", "ok", "seconds", "detail"}]}.
    """
    live = _LiveProgress() if not (as_json or tour) and sys.stdout.isatty() else None
    if logging.getLogger().level > logging.DEBUG:
        # The steps report what happened; the CA's and nodes' own warnings (a revocation
        # is one) would only interleave with them. --debug shows them.
        logging.getLogger("trustmesh").setLevel(logging.ERROR)

    def job(workdir: Path) -> Awaitable[list[Step]]:
        if tour:
            return run_tour(workdir)
        return run_mesh_demo(workdir, nodes, live.update if live else None)

    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        steps = _run(job, keep, live)
    else:
        with tempfile.TemporaryDirectory(prefix="trustmesh-demo-") as tmp:
            steps = _run(job, Path(tmp), live)
    ok = all(step.ok for step in steps)
    if as_json:
        emit({"ok": ok, "steps": [s.to_json() for s in steps]}, as_json=True)
    elif live is None:
        lines = [f"{'ok ' if s.ok else 'FAIL'} {s.name:<18} {s.detail}" for s in steps]
        lines.append(f"\n{sum(s.ok for s in steps)}/{len(steps)} steps passed")
        emit({}, as_json=False, human="\n".join(lines))
    else:
        live.summary(steps)
    return 0 if ok else 1


def _run(
    job: Callable[[Path], Awaitable[list[Step]]], workdir: Path, live: _LiveProgress | None
) -> list[Step]:
    async def main() -> list[Step]:
        return await job(workdir)

    if live is None:
        return asyncio.run(main())
    with live:
        return asyncio.run(main())


class _LiveProgress:
    """A spinner for the running step and a line for each finished one (rich, on a TTY)."""

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console()
        self._status: Status | None = None

    def __enter__(self) -> _LiveProgress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop()

    def update(self, name: str, step: Step | None) -> None:
        if step is None:
            self._status = self.console.status(f"[bold]{name}[/] ...")
            self._status.start()
            return
        self._stop()
        mark = "[green]ok[/]  " if step.ok else "[red]FAIL[/]"
        self.console.print(f"{mark} [bold]{name:<18}[/] {step.seconds:6.2f}s  {step.detail}")

    def summary(self, steps: list[Step]) -> None:
        passed = sum(s.ok for s in steps)
        colour = "green" if passed == len(steps) else "red"
        self.console.print(f"\n[{colour}]{passed}/{len(steps)} steps passed[/]")

    def _stop(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None
