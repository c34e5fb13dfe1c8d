"""``run.json``: where a running node really listens (ports given as 0 are known only
once it listens). ``trustmesh node`` commands read it to find the node's API."""

from __future__ import annotations

import json
import os
from pathlib import Path

RUN_FILE = "run.json"
# The running node's read-only API, plain HTTP on a Unix socket of mode 0600 (the file's
# permission is the credential): what `node health`, `peers` and `anomalies` use.
API_SOCKET = "api.sock"


def running_pid(directory: Path) -> int | None:
    """The pid run.json names, if that process is alive; None without a run.json, or
    when it is left over from a node that died (kill -9, a crash, a reboot)."""
    try:
        pid = json.loads((directory / RUN_FILE).read_text()).get("pid")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return None
    try:
        os.kill(pid, 0)  # signal 0: only whether the process exists
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid  # alive, another user's
    return pid


def write_run_file(directory: Path, node_id: str, listen: str, api_url: str) -> None:
    state = {
        "pid": os.getpid(),
        "node_id": node_id,
        "listen": listen,
        "api": api_url.removeprefix("https://"),
    }
    tmp = directory / f"{RUN_FILE}.tmp"
    tmp.write_text(json.dumps(state) + "\n")
    os.replace(tmp, directory / RUN_FILE)
