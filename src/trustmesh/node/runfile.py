"""``run.json``: where a running node really listens (ports given as 0 are known only
once it listens). ``trustmesh node`` commands read it to find the node's API."""

from __future__ import annotations

import json
import os
from pathlib import Path

RUN_FILE = "run.json"


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
