"""The BOTD benchmark's own measurements work (the pyln-proto anchor needs its own venv
and is exercised by `python -m bench botd`, not here)."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag

from bench import botd as botd_bench
from bench.harness import report as report_of


def test_handshake_rate_completes_real_handshakes() -> None:
    assert botd_bench._handshake_rate(0.02) > 0


async def transferred(side: botd_bench._Side, rounds: int = 1) -> float:
    """Start ``side``, move 2 MiB in 64 KiB messages ``rounds`` times, stop it; the
    seconds of the last round."""
    await side.start()
    try:
        async with asyncio.timeout(10):
            for _ in range(rounds):
                seconds = await side.transfer(os.urandom(64 * 1024), 2 * botd_bench.MIB)
    finally:
        await side.stop()
    return seconds


async def test_botd_loopback_transfer_counts_every_byte() -> None:
    loopback = botd_bench._Loopback()
    assert await transferred(loopback) > 0
    assert loopback.received == 2 * botd_bench.MIB


async def test_tls_anchor_transfer_counts_every_byte(tmp_path: Path) -> None:
    anchor = botd_bench._TlsLoopback(tmp_path)
    assert await transferred(anchor) > 0
    assert anchor.received == 2 * botd_bench.MIB
    assert anchor.writer.get_extra_info("ssl_object").version() == "TLSv1.3"


def test_crypto_ceiling_rate_runs_the_handshake_operations() -> None:
    assert botd_bench._crypto_ceiling_rate(0.02) > 0


async def test_tcp_anchor_transfer_counts_every_byte() -> None:
    anchor = botd_bench._TcpLoopback()
    assert await transferred(anchor) > 0
    assert anchor.received == 2 * botd_bench.MIB


class FakePyln:
    """Stands in for the pyln-proto worker, which needs its own venv."""

    def __enter__(self) -> FakePyln:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None

    def rate(self, metric: str, seconds: float) -> float:
        return 1000.0


def test_quick_run_reports_every_figure_and_the_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(botd_bench, "PylnAnchor", FakePyln)
    results = botd_bench.run(quick=True)
    by_metric = {r.metric: r for r in results}
    assert set(by_metric) == {
        "handshakes_per_s",
        "crypto_ceiling_ratio",
        "throughput_64k",
        "mib_per_s",
        "bulk_floor_ratio",
        "messages_1k_per_s",
    }
    for result in results:
        assert result.value > 0 and result.anchor_value > 0
    # The ceiling row divides the same handshake figure by the ceiling's rate, and the
    # TCP row shares the bulk figure with the TLS row.
    assert by_metric["crypto_ceiling_ratio"].value == by_metric["handshakes_per_s"].value
    assert 0 < by_metric["crypto_ceiling_ratio"].ratio < 1
    assert by_metric["mib_per_s"].value == by_metric["throughput_64k"].value
    assert by_metric["bulk_floor_ratio"].value == by_metric["throughput_64k"].value
    report = json.loads(report_of("botd", results, as_json=True, info=botd_bench.info()))
    assert report["event_loop"] in ("uvloop", "asyncio")
    assert {r["metric"] for r in report["results"]} == set(by_metric)
    text = report_of("botd", results, as_json=False, info=botd_bench.info())
    assert "event_loop: " in text and "crypto_ceiling_ratio" in text


def test_the_allocator_pin_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    """python -m bench botd runs in a process with glibc's allocator pinned (it
    re-executes itself when it is not), and the report says which it was."""
    for name, value in botd_bench.PROCESS_ENV.items():
        monkeypatch.setenv(name, value)
    assert str(botd_bench.info()["allocator"]).startswith("glibc pinned")
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    assert "not pinned" in str(botd_bench.info()["allocator"])


async def test_aead_floor_opens_and_counts_every_byte() -> None:
    floor = botd_bench._AeadFloor()
    assert await transferred(floor, rounds=2) > 0
    assert floor.received == 2 * botd_bench.MIB  # the second round, counted afresh
    assert floor._counter == 64  # every record sealed under its own nonce


async def test_aead_floor_refuses_a_record_it_cannot_open() -> None:
    """The floor really authenticates: a record sealed under another nonce fails to open."""
    floor = botd_bench._AeadFloor()
    await floor.start()
    loop = asyncio.get_running_loop()
    failure: asyncio.Future[BaseException] = loop.create_future()
    loop.set_exception_handler(lambda _loop, context: failure.set_result(context["exception"]))
    try:
        floor.target = 1
        record = floor._aead.encrypt(botd_bench._NONCE(7), b"x" * 100, None)  # expects 0
        floor.transport.writelines((len(record).to_bytes(4, "big"), record))
        async with asyncio.timeout(10):
            error = await failure
    finally:
        loop.set_exception_handler(None)
        await floor.stop()
    assert isinstance(error, InvalidTag)
    assert floor.received == 0
