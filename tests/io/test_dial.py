"""Dial with a deadline over loopback TCP (up, timed out, failed, cancelled, refused),
and the redial loop with an injected sleep."""

from __future__ import annotations

import asyncio
import socket
from asyncio.trsock import TransportSocket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import NoReturn

import pytest
from test_handle import WAIT, NotUp, Up, UpCore, send, within
from toy_protocol import ToyCore

from trustmesh.io import StreamDriver, StreamServer, serve_stream
from trustmesh.io.backoff import Backoff, redial
from trustmesh.io.dial import dial
from trustmesh.io.handle import Handle

ToyHandle = Handle[UpCore, Up]
Server = Callable[[Callable[[StreamDriver[ToyCore]], Awaitable[None]]], Awaitable[int]]


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    """Start a toy server running ``then(driver)`` on each connection; return its port."""
    servers: list[StreamServer[ToyCore]] = []

    async def start(then: Callable[[StreamDriver[ToyCore]], Awaitable[None]]) -> int:
        servers.append(await serve_stream(ToyCore, then, "127.0.0.1", 0))
        return servers[-1].port

    yield start
    for s in servers:
        s.close()
        await s.wait_closed()


async def say_up(driver: StreamDriver[ToyCore]) -> None:
    driver.act(send(b"UP"))
    await driver.wait_closed()


async def stay_silent(driver: StreamDriver[ToyCore]) -> None:
    await driver.wait_closed()


async def say_bye(driver: StreamDriver[ToyCore]) -> None:
    driver.close("go away")
    await driver.wait_closed()


class Maker:
    """The ``new_handle`` factory; keeps what it made so the test can look at it."""

    def __init__(self) -> None:
        self.made: list[ToyHandle] = []
        self.called = asyncio.Event()

    def __call__(self) -> ToyHandle:
        self.made.append(Handle(StreamDriver(UpCore()), up=Up, failure=NotUp))
        self.called.set()
        return self.made[-1]


def socket_closed(handle: ToyHandle) -> bool:
    """The handle's socket is closed (asyncio keeps the object, with no descriptor)."""
    sock = handle.driver.get_extra_info("socket")
    return isinstance(sock, TransportSocket) and sock.fileno() == -1


async def test_dial_returns_the_handle_once_up(server: Server) -> None:
    port = await server(say_up)
    maker = Maker()
    handle = await within(dial(maker, "127.0.0.1", port, timeout=WAIT, local_addr=("127.0.0.1", 0)))
    assert maker.made == [handle] and handle.up_event == Up()
    assert not handle.driver.closed
    handle.driver.close()
    await within(handle.wait_closed())


async def test_a_dial_not_up_in_time_is_aborted_and_its_socket_released(
    server: Server,
) -> None:
    port = await server(stay_silent)  # accepts, never says UP
    maker = Maker()
    with pytest.raises(TimeoutError):
        await within(dial(maker, "127.0.0.1", port, timeout=0.05, timeout_reason="too slow"))
    [handle] = maker.made
    assert handle.closed_event is not None and handle.closed_event.reason == "too slow"
    assert socket_closed(handle)


async def test_a_connection_that_ends_before_up_raises_the_handle_failure(
    server: Server,
) -> None:
    port = await server(say_bye)
    maker = Maker()
    with pytest.raises(NotUp, match="peer said bye"):
        await within(dial(maker, "127.0.0.1", port, timeout=WAIT))
    [handle] = maker.made
    assert handle.closed_event is not None and handle.closed_event.by_peer  # not aborted


async def test_a_cancelled_dial_aborts_its_connection(server: Server) -> None:
    port = await server(stay_silent)
    maker = Maker()
    task = asyncio.create_task(dial(maker, "127.0.0.1", port, timeout=WAIT, cancel_reason="stop"))
    await within(maker.called.wait())
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await within(task)
    [handle] = maker.made
    assert handle.closed_event is not None and handle.closed_event.reason == "stop"
    assert socket_closed(handle)


@pytest.fixture
def refusing_port() -> Iterator[int]:
    """A loopback port that is bound but not listening: a dial to it is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


async def test_a_refused_dial_raises_oserror_and_makes_no_handle(refusing_port: int) -> None:
    maker = Maker()
    with pytest.raises(OSError):
        await within(dial(maker, "127.0.0.1", refusing_port, timeout=WAIT))
    assert maker.made == []


# --- redial --------------------------------------------------------------------------


class Stop(Exception):
    """Not in ``retry_on``: ends the loop, so the test can see what it did."""


class Script:
    """``connect``, ``use`` and ``sleep`` for :func:`redial`, following a script: each
    step is an exception for ``connect`` to raise, or the bool ``use`` returns."""

    def __init__(self, *steps: Exception | bool) -> None:
        self.steps = list(steps)
        self.log: list[str] = []
        self.failures: list[tuple[str, float]] = []

    async def connect(self) -> bool:
        self.log.append("dial")
        step = self.steps.pop(0) if self.steps else Stop()
        if isinstance(step, Exception):
            raise step
        return step

    async def use(self, ran_its_course: bool) -> bool:
        self.log.append(f"use:{ran_its_course}")
        return ran_its_course

    async def sleep(self, delay: float) -> None:
        self.log.append(f"sleep:{delay:g}")

    def on_failure(self, exc: Exception, delay: float) -> None:
        self.failures.append((str(exc), delay))

    async def until_wanted(self) -> None:
        self.log.append("wanted")

    def run(self, *, with_wanted: bool = False) -> Awaitable[NoReturn]:
        return redial(
            self.connect,
            self.use,
            backoff=Backoff(initial=1.0, maximum=8.0, jitter=0),
            retry_on=(OSError,),
            on_failure=self.on_failure,
            until_wanted=self.until_wanted if with_wanted else None,
            sleep=self.sleep,
        )


async def test_redial_backs_off_and_resets_after_a_connection_that_ran_its_course() -> None:
    script = Script(OSError("refused"), OSError("refused again"), False, True, False)
    with pytest.raises(Stop):
        await within(script.run())
    # fmt: off
    assert script.log == [
        "dial", "sleep:1",
        "dial", "sleep:2",
        "dial", "use:False", "sleep:4",  # ended badly: the delays keep growing
        "dial", "use:True", "sleep:1",  # ran its course: start afresh
        "dial", "use:False", "sleep:2",
        "dial",
    ]
    # fmt: on
    assert script.failures == [("refused", 1.0), ("refused again", 2.0)]


async def test_redial_caps_the_delay() -> None:
    script = Script(*[OSError("down")] * 6)
    with pytest.raises(Stop):
        await within(script.run())
    assert [delay for _, delay in script.failures] == [1, 2, 4, 8, 8, 8]


async def test_redial_waits_until_wanted_before_each_dial() -> None:
    script = Script(OSError("down"), True)
    with pytest.raises(Stop):
        await within(script.run(with_wanted=True))
    # fmt: off
    assert script.log == [
        "wanted", "dial", "sleep:1",
        "wanted", "dial", "use:True", "sleep:1",
        "wanted", "dial",
    ]
    # fmt: on


async def test_an_address_family_the_host_lacks_moves_on_to_the_next_address(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As loop.create_connection: socket() failing for one address (EAFNOSUPPORT, ::1 on
    # a host without IPv6) is that address's error, not the whole dial's.
    from trustmesh.io import dial as dial_module

    port = await server(say_up)
    loop = asyncio.get_running_loop()
    real_socket = socket.socket
    real_getaddrinfo = loop.getaddrinfo
    made: list[int] = []

    async def two_families(host: str, port: int, **kwargs: object) -> list[object]:
        infos = await real_getaddrinfo(host, port, type=socket.SOCK_STREAM)
        ipv6 = (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", port, 0, 0))
        return [ipv6, *infos]

    def no_ipv6(family: int = -1, *args: object) -> socket.socket:
        made.append(family)
        if family == socket.AF_INET6:
            raise OSError(97, "Address family not supported by protocol")
        return real_socket(family, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(loop, "getaddrinfo", two_families)
    monkeypatch.setattr(socket, "socket", no_ipv6)  # the module dial_module calls
    sock = await dial_module._connected_socket(loop, "127.0.0.1", port, None)
    try:
        assert made == [socket.AF_INET6, socket.AF_INET]
        assert sock.getpeername()[1] == port
    finally:
        sock.close()
