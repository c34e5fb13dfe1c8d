"""One mesh link as the node sees it: a TLS connection running a :class:`MeshLink`, and
a reader task that hands every event to the node."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from trustmesh.io.stream import StreamDriver
from trustmesh.mesh.link import CloseCode, LinkClosed, LinkUp, MeshLink, PeerAddress
from trustmesh.sansio import ConnectionClosed, Event
from trustmesh.tls import TlsStream

EventHandler = Callable[["Link", Event], None]


class Link:
    def __init__(
        self,
        driver: StreamDriver[TlsStream],
        core: MeshLink,
        *,
        address: str | None,
        on_event: EventHandler,
    ) -> None:
        self.driver = driver
        self.core = core
        self.address = address  # what we dialled (None for an inbound link)
        self.listen: str | None = None  # the peer's advertised address, from its HELLO
        self.closed_event: ConnectionClosed | None = None
        self._on_event = on_event
        loop = asyncio.get_running_loop()
        self._up: asyncio.Future[LinkUp] = loop.create_future()
        self._reader = loop.create_task(self._read())

    @property
    def initiator(self) -> bool:
        return self.core.initiator

    @property
    def peer_id(self) -> str | None:
        return self.core.peer_id

    @property
    def was_up(self) -> bool:
        """Both HELLOs were exchanged at some point (the link may be closed since)."""
        return self._up.done() and not self._up.exception()

    @property
    def up(self) -> bool:
        return self._up.done() and not self._up.exception() and self.closed_event is None

    @property
    def serial(self) -> int | None:
        """The peer certificate's serial, once TLS is up."""
        tls = self.driver.core.established
        return tls.peer_chain[0].serial_number if tls is not None and tls.peer_chain else None

    @property
    def dialler_port(self) -> int:
        """The TCP port of the side that dialled: both ends of a link know it."""
        name = "sockname" if self.initiator else "peername"
        address = self.driver.get_extra_info(name)
        return int(address[1]) if isinstance(address, tuple) and len(address) > 1 else 0

    @property
    def direction(self) -> str:
        return "outbound" if self.initiator else "inbound"

    async def wait_up(self) -> LinkUp:
        return await asyncio.shield(self._up)

    async def wait_closed(self) -> ConnectionClosed:
        event = await self.driver.wait_closed()
        await asyncio.shield(self._reader)
        return event

    def send_gossip(self, raw: bytes) -> None:
        self._act(lambda core: core.send_gossip(raw))

    def send_crl(self, der: bytes) -> None:
        self._act(lambda core: core.send_crl(der))

    def send_peers(self, peers: list[PeerAddress], records: list[bytes] | None = None) -> None:
        self._act(lambda core: core.send_peers(peers, records or ()))

    def send_ihave(self, ids: list[str]) -> None:
        self._act(lambda core: core.send_ihave(ids))

    def send_iwant(self, ids: list[str]) -> None:
        self._act(lambda core: core.send_iwant(ids))

    def close(self, code: str = CloseCode.SHUTDOWN, reason: str = "closed") -> None:
        error = code != CloseCode.SHUTDOWN
        self._act(lambda core: core.close_with(code, reason, error=error))

    def abort(self, reason: str) -> None:
        self.driver.abort(reason)

    def _act(self, action: Callable[[MeshLink], list[Event]]) -> None:
        if self.driver.closed:
            return
        self.driver.act(lambda tls: tls.inner_action(lambda _: action(self.core)))

    async def _read(self) -> None:
        try:
            async for event in self.driver:
                if isinstance(event, LinkUp):
                    self.listen = event.listen
                    self._up.set_result(event)
                elif isinstance(event, ConnectionClosed):
                    self._finish(event)
                self._on_event(self, event)
        finally:
            if self.closed_event is None:
                self._finish(ConnectionClosed("link reader stopped", error=True))

    def _finish(self, event: ConnectionClosed) -> None:
        self.closed_event = event
        if not self._up.done():
            reason = event.reason
            code = event.code if isinstance(event, LinkClosed) else None
            self._up.set_exception(LinkFailed(reason, code=code))
            self._up.exception()  # retrieved: nobody may be waiting


class LinkFailed(Exception):
    """A link ended before both HELLOs were exchanged."""

    def __init__(self, reason: str, *, code: str | None = None) -> None:
        super().__init__(reason)
        self.code = code
