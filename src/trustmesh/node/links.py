"""One mesh link as the node sees it: a TLS connection running a :class:`MeshLink`, and
a reader task (a :class:`~trustmesh.io.handle.Handle`) that hands every event to the
node."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from trustmesh.io.handle import Handle
from trustmesh.io.stream import StreamDriver
from trustmesh.mesh import node as node_core
from trustmesh.mesh.link import CLEAN_CLOSES, CloseCode, LinkClosed, LinkUp, MeshLink, PeerAddress
from trustmesh.sansio import ConnectionClosed, Event
from trustmesh.tls import TlsStream

EventHandler = Callable[["Link", Event], None]


class Link(Handle[TlsStream, LinkUp]):
    def __init__(
        self,
        driver: StreamDriver[TlsStream],
        core: MeshLink,
        *,
        address: str | None,
        on_event: EventHandler,
    ) -> None:
        self.core = core
        self.address = address  # what we dialled (None for an inbound link)
        self.listen: str | None = None  # the peer's advertised address, from its HELLO
        self._on_event = on_event
        super().__init__(driver, up=LinkUp, failure=_failure, on_event=self._event, name="link")

    @property
    def initiator(self) -> bool:
        return self.core.initiator

    @property
    def peer_id(self) -> str | None:
        return self.core.peer_id

    @property
    def was_up(self) -> bool:
        """Both HELLOs were exchanged at some point (the link may be closed since)."""
        return self.up_event is not None

    @property
    def up(self) -> bool:
        return self.up_event is not None and self.closed_event is None

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

    def send_gossip(self, raw: bytes) -> None:
        self._act(lambda core: core.send_gossip(raw))

    def send_crl(self, der: bytes) -> None:
        self._act(lambda core: core.send_crl(der))

    def send_peers(
        self,
        peers: list[PeerAddress],
        records: list[bytes] | None = None,
        *,
        room: int | None = None,
        spare: int | None = None,
        open_ids: Sequence[str] = (),
    ) -> None:
        self._act(
            lambda core: core.send_peers(
                peers, records or (), room=room, spare=spare, open_ids=open_ids
            )
        )

    def send_ihave(self, ids: list[str]) -> None:
        self._act(lambda core: core.send_ihave(ids))

    def send_iwant(self, ids: list[str]) -> None:
        self._act(lambda core: core.send_iwant(ids))

    def close(self, code: str = CloseCode.SHUTDOWN, reason: str = "closed") -> None:
        error = code not in CLEAN_CLOSES
        self._act(lambda core: core.close_with(code, reason, error=error))

    def carry(self, action: node_core.LinkAction[Link]) -> None:
        """Carry out a node core's action on this link (a frame to send, or CLOSE)."""
        self._act(lambda core: node_core.send_on(core, action))

    def _act(self, action: Callable[[MeshLink], list[Event]]) -> None:
        if self.driver.closed:
            return
        self.driver.act(lambda tls: tls.inner_action(lambda _: action(self.core)))

    def _event(self, event: Event) -> None:
        if isinstance(event, LinkUp):
            self.listen = event.listen
        self._on_event(self, event)


class LinkFailed(Exception):
    """A link ended before both HELLOs were exchanged."""

    def __init__(self, reason: str, *, code: str | None = None) -> None:
        super().__init__(reason)
        self.code = code


def _failure(event: ConnectionClosed) -> LinkFailed:
    return LinkFailed(event.reason, code=event.code if isinstance(event, LinkClosed) else None)
