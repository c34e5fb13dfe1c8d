"""trustmesh.clock: the system clock and the fake one tests drive by hand."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta, timezone

import pytest

from trustmesh.clock import SYSTEM_CLOCK, Clock, FakeClock


def test_the_system_clock_reads_real_time() -> None:
    before = datetime.now(UTC)
    now = SYSTEM_CLOCK.now()
    after = datetime.now(UTC)
    assert now.tzinfo is UTC
    assert before <= now <= after
    ms = SYSTEM_CLOCK.time_ms()
    assert abs(ms - time.time() * 1000) < 60_000
    first = SYSTEM_CLOCK.monotonic()
    assert SYSTEM_CLOCK.monotonic() >= first


def test_a_fake_clock_stands_still_until_advanced() -> None:
    start = datetime(2030, 2, 3, 4, 5, 6, 789000, tzinfo=UTC)
    clock: Clock = FakeClock(start, monotonic=100.0)
    assert clock.now() == clock.now() == start
    assert clock.time_ms() == int(start.timestamp()) * 1000 + 789
    assert clock.monotonic() == 100.0
    assert isinstance(clock, FakeClock)
    clock.advance(1.5)
    assert clock.now() == start + timedelta(seconds=1.5)
    assert clock.monotonic() == 101.5
    clock.advance(timedelta(minutes=1))
    assert clock.now() == start + timedelta(seconds=61.5)
    assert clock.time_ms() == int(start.timestamp()) * 1000 + 789 + 61_500
    assert clock.monotonic() == 161.5


def test_a_fake_clock_refuses_to_go_back_or_to_be_naive() -> None:
    clock = FakeClock()
    assert clock.now() == FakeClock.DEFAULT_START
    with pytest.raises(ValueError, match="negative"):
        clock.advance(-1)
    with pytest.raises(ValueError, match="aware"):
        FakeClock(datetime(2030, 1, 1))  # naive: the point of the test
    with pytest.raises(ValueError, match="aware"):
        clock.set(datetime(2030, 1, 1))


def test_setting_a_fake_clock_steps_the_wall_clock_only() -> None:
    clock = FakeClock(monotonic=5.0)
    earlier = datetime(2029, 1, 1, 1, 0, tzinfo=timezone(timedelta(hours=1)))
    clock.set(earlier)  # as an NTP step backwards
    assert clock.now() == earlier
    assert clock.now().tzinfo is UTC  # stored in UTC
    assert clock.monotonic() == 5.0
