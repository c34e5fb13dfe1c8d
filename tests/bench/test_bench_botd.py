"""The BOTD benchmark's own measurements work (the pyln-proto anchor needs its own venv
and is exercised by `python -m bench botd`, not here)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from bench import botd as botd_bench


def test_handshake_rate_completes_real_handshakes() -> None:
    assert botd_bench._handshake_rate(0.02) > 0


async def test_botd_loopback_transfer_counts_every_byte() -> None:
    loopback = botd_bench._Loopback()
    await loopback.start()
    try:
        async with asyncio.timeout(10):
            seconds = await loopback.transfer(os.urandom(64 * 1024), 2 * botd_bench.MIB)
    finally:
        await loopback.stop()
    assert seconds > 0
    assert loopback.received == 2 * botd_bench.MIB


async def test_tls_anchor_transfer_counts_every_byte(tmp_path: Path) -> None:
    anchor = botd_bench._TlsLoopback(tmp_path)
    await anchor.start()
    try:
        async with asyncio.timeout(10):
            seconds = await anchor.transfer(os.urandom(64 * 1024), 2 * botd_bench.MIB)
    finally:
        await anchor.stop()
    assert seconds > 0
    assert anchor.received == 2 * botd_bench.MIB
    assert anchor.writer.get_extra_info("ssl_object").version() == "TLSv1.3"
