"""``trustmesh demo``: the main job, a self-checking tour."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import click

from trustmesh.cli.output import emit
from trustmesh.demo import run_demo


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@click.option(
    "--keep",
    type=click.Path(file_okay=False, path_type=Path),
    help="Keep the demo's key files in this directory instead of a temporary one.",
)
def demo(as_json: bool, keep: Path | None) -> int:
    """Show what trustmesh does, checking every step.

    Generates encrypted keys of every type, derives libp2p peer IDs (checked against the
    spec's test vector), signs and verifies, agrees ECDH secrets, and runs an encrypted
    channel over TCP loopback. Exits 0 only when every step worked.
    """
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        steps = asyncio.run(run_demo(keep))
    else:
        with tempfile.TemporaryDirectory(prefix="trustmesh-demo-") as tmp:
            steps = asyncio.run(run_demo(Path(tmp)))
    ok = all(step.ok for step in steps)
    if as_json:
        emit(
            {
                "ok": ok,
                "steps": [
                    {"name": s.name, "ok": s.ok, "detail": s.detail, **s.data} for s in steps
                ],
            },
            as_json=True,
        )
    else:
        lines = [f"{'ok ' if s.ok else 'FAIL'} {s.name:<15} {s.detail}" for s in steps]
        lines.append(f"\n{sum(s.ok for s in steps)}/{len(steps)} steps passed")
        emit({}, as_json=False, human="\n".join(lines))
    return 0 if ok else 1
