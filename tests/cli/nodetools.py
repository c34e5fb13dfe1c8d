"""What the node process tests share: ``trustmesh node run`` as a subprocess whose JSON
lines (``started``/``stopped`` on stdout, log events on stderr) a test can wait on.

Not a test module (no ``test_`` prefix); test_node_cli.py imports it as ``nodetools``
(``tests/cli`` is on the import path, as for ``catools``). A thread per stream pumps its
lines into a list kept for the whole run, so a wait also sees what was logged before it
began; every wait is bounded by ``WAIT`` and wakes on each new line, never by sleeping.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from catools import WAIT
from clitools import TRUSTMESH, clean_env

Line = dict[str, Any]


class JsonLines:
    """The lines of one output stream of a process: JSON objects in ``lines``, anything
    else (a traceback, say) in ``other``."""

    def __init__(self, stream: IO[str], name: str) -> None:
        self.name = name
        self.lines: list[Line] = []
        self.other: list[str] = []
        self.ended = False
        self._changed = threading.Condition()
        self._stream = stream
        self._reader = threading.Thread(target=self._pump, name=name, daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        for text in self._stream:
            try:
                data = json.loads(text)
            except ValueError:
                data = None
            with self._changed:
                if isinstance(data, dict):
                    self.lines.append(data)
                else:
                    self.other.append(text.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self.ended = True
            self._changed.notify_all()

    def wait_for(self, match: Callable[[Line], bool], what: str, timeout: float = WAIT) -> Line:
        """The first line (logged so far or later) that ``match`` accepts."""
        deadline = time.monotonic() + timeout
        checked = 0
        with self._changed:
            while True:
                for line in self.lines[checked:]:
                    if match(line):
                        return line
                checked = len(self.lines)
                if self.ended:
                    raise AssertionError(f"{self.name} ended without {what}: {self.dump()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {what} on {self.name} in {timeout:g} s")
                self._changed.wait(left)

    def wait_ended(self, timeout: float = WAIT) -> None:
        self._reader.join(timeout)
        assert not self._reader.is_alive(), f"{self.name} still open after {timeout:g} s"

    def close(self) -> None:
        self._reader.join(WAIT)
        self._stream.close()

    def dump(self) -> str:
        with self._changed:
            return "\n".join([*map(json.dumps, self.lines), *self.other])


class NodeRun:
    """``trustmesh node run --dir D``; ``started()`` waits for its first stdout line."""

    def __init__(self, directory: Path, *, passphrase: str | None = None) -> None:
        self.directory = directory
        env = clean_env() if passphrase is None else clean_env(TRUSTMESH_PASSPHRASE=passphrase)
        self.proc = subprocess.Popen(
            [TRUSTMESH, "node", "run", "--dir", str(directory)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self.proc.stdout is not None
        assert self.proc.stderr is not None
        self.stdout = JsonLines(self.proc.stdout, f"{directory.name} stdout")
        self.stderr = JsonLines(self.proc.stderr, f"{directory.name} stderr")

    def started(self, timeout: float = WAIT) -> Line:
        """The ``started`` line: node_id, the real listen address and API URL."""
        first = self.stdout.wait_for(lambda line: True, "a first line", timeout)
        assert first["event"] == "started", f"{first}; stderr: {self.stderr.dump()}"
        return first

    def event(self, event: str, timeout: float = WAIT, **fields: Any) -> Line:
        """The first log line of ``event`` whose fields include ``fields``."""

        def match(line: Line) -> bool:
            return line.get("event") == event and all(line.get(k) == v for k, v in fields.items())

        what = f"{event} {fields}" if fields else event
        return self.stderr.wait_for(match, what, timeout)

    def terminate(self) -> int:
        """SIGTERM; the exit code, once both streams have ended."""
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=WAIT)
        self.stdout.wait_ended()
        self.stderr.wait_ended()
        return code

    def close(self) -> None:
        """Kill it if still running (a test that failed half-way); release the pipes."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=WAIT)
        self.stdout.close()
        self.stderr.close()


@contextmanager
def running(*nodes: tuple[Path, str | None]) -> Iterator[list[NodeRun]]:
    """``node run`` for each (directory, passphrase), all started at once; each is
    killed on the way out unless the block stopped it."""
    runs: list[NodeRun] = []
    try:
        for directory, passphrase in nodes:
            runs.append(NodeRun(directory, passphrase=passphrase))
        yield runs
    finally:
        for run in runs:
            run.close()
