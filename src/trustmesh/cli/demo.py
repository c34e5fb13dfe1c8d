"""``trustmesh demo``: the main job, a self-checking mesh on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import click

from trustmesh.cli.output import emit
from trustmesh.demo import Step, run_mesh_demo, run_tour
from trustmesh.demo.mesh import MAX_NODES, MeshDemo

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
    help="Keep the demo's files (CA, node directories) here instead of a temporary dir."
    " The CA's keys are encrypted with the passphrase of --passphrase-file (or"
    " $TRUSTMESH_PASSPHRASE), else with a new one, printed at the end.",
)
@click.option(
    "--tour",
    is_flag=True,
    help="Instead of the mesh, tour the foundation: keys, peer IDs, signatures, ECDH, BOTD #2.",
)
@click.option(
    "--dashboard",
    is_flag=True,
    help="After the checks, keep the mesh up and serve its live dashboard on 127.0.0.1"
    " (the URL goes to stderr) until SIGINT or SIGTERM; then shut down as usual.",
)
@click.option(
    "--dashboard-port",
    type=click.IntRange(0, 65535),
    default=0,
    show_default=True,
    help="The dashboard's port (0: any free one).",
)
def demo(
    nodes: int,
    as_json: bool,
    keep: Path | None,
    tour: bool,
    dashboard: bool,
    dashboard_port: int,
) -> int:
    """Run a zero-trust mesh on loopback and check every step.

    \b
    1. an embedded CA; each node enrolls over HTTPS with its own single-use token
    2. the nodes form a mesh of TLS 1.3 mTLS links (ALPN dadm-mesh/1)
    3. node-1 publishes a signed anomaly signature; it reaches every node (timed)
    4. the last node is revoked; every other node cuts it off and refuses it
    5. everything shuts down cleanly

    Real TLS, real HTTP, real files, in one process. Exits 0 only when every step was
    verified. --json prints {"ok", "steps": [{"name", "ok", "seconds", "detail"}]}; with
    --keep also "ca_dir", "ca_passphrase" (the new passphrase; null when it was given)
    and "ca_passphrase_source".
    """
    live = _LiveProgress() if not (as_json or tour) and sys.stdout.isatty() else None
    kept = None if keep is None or tour else _kept_ca(keep)

    def job(workdir: Path) -> Awaitable[list[Step]]:
        if tour:
            return run_tour(workdir)
        secret = None if kept is None else kept.passphrase
        serve = partial(_serve_dashboard, dashboard_port) if dashboard else None
        return run_mesh_demo(
            workdir,
            nodes,
            live.update if live else None,
            passphrase=secret,
            before_shutdown=serve,
        )

    with _quiet_logs():
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
            steps = _run(job, keep, live)
        else:
            with tempfile.TemporaryDirectory(prefix="trustmesh-demo-") as tmp:
                steps = _run(job, Path(tmp), live)
    ok = all(step.ok for step in steps)
    if as_json:
        report: dict[str, object] = {"ok": ok, "steps": [s.to_json() for s in steps]}
        emit(report | ({} if kept is None else kept.to_json()), as_json=True)
    elif live is None:
        lines = [f"{'ok ' if s.ok else 'FAIL'} {s.name:<18} {s.detail}" for s in steps]
        lines.append(f"\n{sum(s.ok for s in steps)}/{len(steps)} steps passed")
        if kept is not None:
            lines.append(kept.human())
        emit({}, as_json=False, human="\n".join(lines))
    else:
        live.summary(steps)
        if kept is not None:
            click.echo(kept.human())
    return 0 if ok else 1


@contextlib.contextmanager
def _quiet_logs() -> Iterator[None]:
    """The steps report what happened; the CA's and nodes' own logs (a revocation is a
    warning, the revoked node's node.revoked an error) would only interleave with them.
    --debug shows them. The level is put back after, for whoever runs the demo in-process."""
    package = logging.getLogger("trustmesh")
    level = package.level
    if logging.getLogger().level > logging.DEBUG:
        package.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        package.setLevel(level)


@dataclass(frozen=True)
class _KeptCa:
    """The CA a kept demo leaves, and the passphrase of its keys: made up here and
    printed once, or the operator's (--passphrase-file ...), never printed."""

    directory: Path
    passphrase: bytes
    source: str | None  # None: made up here

    def to_json(self) -> dict[str, object]:
        return {
            "ca_dir": str(self.directory),
            "ca_passphrase": self.passphrase.decode() if self.source is None else None,
            "ca_passphrase_source": "generated" if self.source is None else self.source,
        }

    def human(self) -> str:
        if self.source is None:
            secret = self.passphrase.decode()
            return (
                f"\nThe CA is in {self.directory}; the passphrase of its keys is {secret}\n"
                "(give it to `trustmesh ca ... --dir` commands with --passphrase-file FILE or"
                " $TRUSTMESH_PASSPHRASE)"
            )
        return (
            f"\nThe CA is in {self.directory}; its keys are encrypted with the passphrase"
            f" from {self.source}"
        )


def _kept_ca(keep: Path) -> _KeptCa:
    """The kept CA's passphrase: the operator's, if given without a terminal
    (--passphrase-file, $TRUSTMESH_PASSPHRASE, $CREDENTIALS_DIRECTORY), else a new one."""
    from trustmesh.keystore.filestore import configured_passphrase

    found = configured_passphrase()
    if found is None:
        return _KeptCa(keep / "ca", secrets.token_urlsafe(18).encode(), None)
    return _KeptCa(keep / "ca", found.value, found.source)


async def _serve_dashboard(port: int, demo: MeshDemo) -> None:
    """``--dashboard``: the mesh's page until SIGINT or SIGTERM."""
    from trustmesh.cli.signals import stop_on_signals
    from trustmesh.demo.dashboard import MeshDashboard

    stop = stop_on_signals()
    page = MeshDashboard(lambda: demo.mesh.nodes, port=port)
    url = await page.start()
    click.echo(f"the demo mesh's dashboard: {url} (Ctrl-C to stop)", err=True)
    try:
        await stop.wait()
    finally:
        await page.stop()


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
