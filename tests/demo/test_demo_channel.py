"""The demo channel's core, driven directly with a fake clock, and over the memory pipe."""

from __future__ import annotations

import asyncio
import functools
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trustmesh.crypto.keys import KeyKind, PrivateKey
from trustmesh.demo.channel import (
    MAX_MESSAGE,
    NONCE_SIZE,
    ChannelReady,
    DemoChannel,
    MessageReceived,
)
from trustmesh.io import memory_pipe
from trustmesh.sansio import ConnectionClosed
from trustmesh.wire.frames import encode_frame

A = PrivateKey.generate(KeyKind.SECP256K1)
B = PrivateKey.generate(KeyKind.SECP256K1)


def pair(idle: float = 30.0) -> tuple[DemoChannel, DemoChannel]:
    a = DemoChannel(
        A, B.public_key(), initiator=True, nonce=os.urandom(NONCE_SIZE), idle_timeout=idle
    )
    b = DemoChannel(
        B, A.public_key(), initiator=False, nonce=os.urandom(NONCE_SIZE), idle_timeout=idle
    )
    return a, b


def handshake(a: DemoChannel, b: DemoChannel, now: float = 0.0) -> None:
    a.start(now)
    b.start(now)
    assert b.receive_data(a.data_to_send(), 0.0) == [ChannelReady()]
    assert a.receive_data(b.data_to_send(), 0.0) == [ChannelReady()]


def test_messages_flow_both_ways() -> None:
    a, b = pair()
    handshake(a, b)
    a.send(b"to b")
    b.send(b"to a")
    assert b.receive_data(a.data_to_send(), 0.0) == [MessageReceived(b"to b")]
    assert a.receive_data(b.data_to_send(), 0.0) == [MessageReceived(b"to a")]


def test_wrong_peer_key_cannot_talk() -> None:
    mallory = PrivateKey.generate(KeyKind.SECP256K1)
    a = DemoChannel(mallory, B.public_key(), initiator=True, nonce=os.urandom(NONCE_SIZE))
    _, b = pair()
    handshake(a, b)
    a.send(b"hello")
    [event] = b.receive_data(a.data_to_send(), 0.0)
    assert isinstance(event, ConnectionClosed)
    assert event.error
    assert "failed authentication" in event.reason


def test_replayed_record_closes() -> None:
    a, b = pair()
    handshake(a, b)
    a.send(b"once")
    record = a.data_to_send()
    assert b.receive_data(record, 0.0) == [MessageReceived(b"once")]
    [event] = b.receive_data(record, 0.0)
    assert isinstance(event, ConnectionClosed)
    assert event.error


def test_idle_timer_with_fake_clock() -> None:
    a, b = pair(idle=10.0)
    handshake(a, b, now=100.0)
    assert b.get_timer() == 110.0
    assert b.handle_timer(105.0) == []  # early call: nothing happens
    # The peer spoke since the deadline was set: the deadline moves instead of closing.
    assert b.handle_timer(110.0) == []
    assert b.get_timer() == 120.0
    [event] = b.handle_timer(120.0)
    assert isinstance(event, ConnectionClosed)
    assert event.reason == "idle timeout"
    assert b.get_timer() is None


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=200))
def test_hostile_bytes_close_cleanly(data: bytes) -> None:
    a, b = pair()
    handshake(a, b)
    events = b.receive_data(encode_frame(data), 0.0) + b.receive_data(data, 0.0)
    assert all(isinstance(e, MessageReceived | ConnectionClosed) for e in events)
    assert not any(isinstance(e, MessageReceived) for e in events)


async def test_over_memory_pipe() -> None:
    a, b = pair()
    da, db = await memory_pipe(a, b)
    async with asyncio.timeout(5):
        assert isinstance(await da.next_event(), ChannelReady)
        assert isinstance(await db.next_event(), ChannelReady)
        da.act(functools.partial(DemoChannel.send, data=b"over the pipe"))
        assert await db.next_event() == MessageReceived(b"over the pipe")
        da.close("done")
        closed = await db.wait_closed()
    assert closed.by_peer


def test_oversized_send_is_refused_without_spending_a_nonce() -> None:
    a, b = pair()
    handshake(a, b)
    with pytest.raises(ValueError, match="exceeds"):
        a.send(b"x" * (MAX_MESSAGE + 1))
    a.send(b"y" * MAX_MESSAGE)
    a.send(b"next")
    assert b.receive_data(a.data_to_send(), 0.0) == [
        MessageReceived(b"y" * MAX_MESSAGE),
        MessageReceived(b"next"),
    ]


def test_messages_before_bad_input_are_delivered() -> None:
    a, b = pair()
    handshake(a, b)
    a.send(b"m1")
    a.send(b"m2")
    events = b.receive_data(a.data_to_send() + b"\xff" * 10, 0.0)  # then a bad frame prefix
    assert events[:2] == [MessageReceived(b"m1"), MessageReceived(b"m2")]
    assert isinstance(events[2], ConnectionClosed)
    assert events[2].error
