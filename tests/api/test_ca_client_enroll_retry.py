"""An enrollment whose answer was lost is finished by running it again (issue 16 item 4,
the client's half): the key is written before the CA is asked, and the retry with the
same key and token gets the certificate the CA already issued."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from ca_support import RunningCa

from trustmesh.api.ca_client import PENDING_KEY, CaClient, enroll_node
from trustmesh.pki.errors import PkiError


async def test_an_enrollment_whose_answer_was_lost_finishes_on_the_next_run(
    ca_api: RunningCa, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = ca_api.token("node-1")
    out = tmp_path / "node-1"
    ca_file = ca_api.directory / "ca.crt"
    real_enroll = CaClient.enroll

    def answer_lost(self: CaClient, *args: Any, **kwargs: Any) -> dict[str, Any]:
        real_enroll(self, *args, **kwargs)  # the CA commits the certificate ...
        raise PkiError("connection reset by peer")  # ... and its answer never arrives

    monkeypatch.setattr(CaClient, "enroll", answer_lost)
    with pytest.raises(PkiError, match="connection reset"):
        await asyncio.to_thread(
            enroll_node, ca_api.url, ca_file, token, "node-1", out, passphrase=None
        )
    assert (out / PENDING_KEY).exists()
    assert not (out / "node.key").exists()

    monkeypatch.setattr(CaClient, "enroll", real_enroll)
    done = await asyncio.to_thread(
        enroll_node, ca_api.url, ca_file, token, "node-1", out, passphrase=None
    )
    issued = ca_api.ca.store.by_node("node-1")
    assert len(issued) == 1  # the retry got the certificate issued the first time
    assert format(issued[0].serial, "x") == done.serial
    assert (out / "node.key").exists()
    assert not (out / PENDING_KEY).exists()


async def test_a_spent_token_with_another_key_is_still_refused(
    ca_api: RunningCa, tmp_path: Path
) -> None:
    token = ca_api.token("node-2")
    ca_file = ca_api.directory / "ca.crt"
    await asyncio.to_thread(
        enroll_node, ca_api.url, ca_file, token, "node-2", tmp_path / "a", passphrase=None
    )
    with pytest.raises(PkiError, match="token"):
        await asyncio.to_thread(
            enroll_node, ca_api.url, ca_file, token, "node-2", tmp_path / "b", passphrase=None
        )
