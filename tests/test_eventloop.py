"""trustmesh.eventloop: uvloop when installed, asyncio's loop with TRUSTMESH_NO_UVLOOP=1."""

from __future__ import annotations

import asyncio
import importlib.util

import pytest

from trustmesh import eventloop

HAVE_UVLOOP = importlib.util.find_spec("uvloop") is not None


async def loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_the_escape_hatch_keeps_asyncio(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(eventloop.NO_UVLOOP_ENV, "1")
    assert eventloop.event_loop_name() == "asyncio"
    assert eventloop.run(loop_module()).startswith("asyncio")
    before = asyncio.get_event_loop_policy()
    with eventloop.installed() as name:
        assert name == "asyncio"
        assert asyncio.get_event_loop_policy() is before


def test_the_name_says_which_loop_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(eventloop.NO_UVLOOP_ENV, raising=False)
    name = eventloop.event_loop_name()
    assert name == ("uvloop" if HAVE_UVLOOP else "asyncio")
    assert eventloop.run(loop_module()).startswith(name)


@pytest.mark.skipif(
    not HAVE_UVLOOP,
    reason="needs uvloop, an optional extra (trustmesh[fast]); scripts/dev test installs"
    " it, so CI runs this",
)
def test_installed_sets_the_policy_for_asyncio_run_and_restores_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(eventloop.NO_UVLOOP_ENV, raising=False)
    before = asyncio.get_event_loop_policy()
    with eventloop.installed() as name:
        assert name == "uvloop"
        assert asyncio.run(loop_module()).startswith("uvloop")
    assert asyncio.get_event_loop_policy() is before
