"""A second `node run` on one directory: refused while the first runs, naming its pid;
never blocked by the run.json of a node that died."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from trustmesh.node.bundles import NodeRunningError, StoreBusyError, StoreLock
from trustmesh.node.runfile import RUN_FILE, running_pid, write_run_file


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_running_node_is_named_by_its_pid(tmp_path: Path) -> None:
    lock = StoreLock(tmp_path)  # the running node: it holds the lock, then writes run.json
    write_run_file(tmp_path, "node-1", "127.0.0.1:7400", "https://127.0.0.1:7401")
    try:
        with pytest.raises(NodeRunningError) as refused:
            StoreLock.check_free(tmp_path)
        assert str(refused.value) == f"node already running (pid {os.getpid()}) in {tmp_path}"
        with pytest.raises(NodeRunningError):
            StoreLock(tmp_path)
    finally:
        lock.release()
    StoreLock.check_free(tmp_path)


def test_a_stale_run_file_blocks_nothing(tmp_path: Path) -> None:
    # A node killed with -9 leaves run.json behind; the kernel released its lock.
    (tmp_path / RUN_FILE).write_text(f'{{"pid": {dead_pid()}, "node_id": "node-1"}}\n')
    assert running_pid(tmp_path) is None
    StoreLock.check_free(tmp_path)
    StoreLock(tmp_path).release()


def test_a_lock_held_by_another_command_is_not_called_a_running_node(tmp_path: Path) -> None:
    # An offline `node bundle` command holds the lock; run.json is stale or absent.
    lock = StoreLock(tmp_path)
    try:
        for run_file in (None, f'{{"pid": {dead_pid()}}}', "not json", '{"pid": "12"}'):
            if run_file is not None:
                (tmp_path / RUN_FILE).write_text(run_file)
            with pytest.raises(StoreBusyError) as busy:
                StoreLock.check_free(tmp_path)
            assert not isinstance(busy.value, NodeRunningError)
            assert "in use by another process" in str(busy.value)
    finally:
        lock.release()


def test_checking_an_empty_directory_leaves_it_empty(tmp_path: Path) -> None:
    StoreLock.check_free(tmp_path)  # `node run` on a directory without node.toml
    assert list(tmp_path.iterdir()) == []
