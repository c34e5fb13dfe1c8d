"""How a node makes its link streams and dials (docs/protocols/mesh-link.md sections 2
and 4): a :class:`MeshLink` inside a :class:`TlsStream` with the node's current
identity, and resumption tickets kept per address (section 2.4)."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Sequence
from typing import Any

from OpenSSL import SSL

from trustmesh.clock import Clock
from trustmesh.io.dial import dial
from trustmesh.io.stream import StreamDriver
from trustmesh.mesh.link import LinkConfig, MeshLink, split_address
from trustmesh.node.config import NodeConfig
from trustmesh.node.identity import Identity
from trustmesh.node.links import Link, LinkFailed
from trustmesh.tls import TlsStream
from trustmesh.tls.tickets import TicketCache

DIAL_TIMEOUT = 10.0
CLOSE_TIMEOUT = 5.0

OpenLink = Callable[[StreamDriver[TlsStream], str | None], Link]
# Run on a dialled peer's chain once it validated, with the node_id it names; raises a
# MeshError to refuse the link (an mDNS advert's check: node/discovery.py AdvertCheck).
PeerCheck = Callable[[str, Sequence[Any]], None]


class Dialer:
    def __init__(
        self,
        config: NodeConfig,
        clock: Clock,
        *,
        identity: Callable[[], Identity],
        advertised: Callable[[], str],
        authorize: Callable[[Sequence[Any]], str],
        crl_number: Callable[[], int],
        tickets: int,
        attest: bool = False,
    ) -> None:
        self.config = config
        self.attest = attest  # links speak attestation (we check peers, or can quote)
        self.clock = clock
        self._identity = identity
        self._advertised = advertised
        self._authorize = authorize
        self._crl_number = crl_number
        self.tickets = TicketCache(tickets)

    def new_stream(
        self,
        *,
        initiator: bool,
        session: SSL.Session | None = None,
        check: PeerCheck | None = None,
    ) -> TlsStream:
        c = self.config
        authorize = self._authorize
        if check is not None:
            authorize = functools.partial(_authorize_then, self._authorize, check)
        core = MeshLink(
            LinkConfig(
                c.node_id,
                self._advertised(),
                c.hold_time,
                hello_timeout=c.hello_timeout,
                min_hold_time=c.min_hold_time,
                allow_zero_hold=c.allow_zero_hold,
                attest=self.attest,
            ),
            initiator=initiator,
            authorize=authorize,
            crl_number=self._crl_number,
        )
        identity = self._identity()
        stream = TlsStream(
            identity.client if initiator else identity.server,
            core,
            session=session,
            handshake_timeout=DIAL_TIMEOUT,
            unix_offset=self.clock.time_ms() / 1000 - asyncio.get_running_loop().time(),
        )
        core.bind(stream)
        return stream

    async def dial(
        self, address: str, open_link: OpenLink, *, check: PeerCheck | None = None
    ) -> Link:
        """Open a link to ``address`` and return it once both HELLOs are exchanged
        (raises :class:`LinkFailed` or ``OSError``). The last link's ticket to the
        address is offered; if the peer refuses that resumption, one full handshake
        follows at once, so the failure says what the peer's checks say. ``check``
        also runs on the peer's chain (it may refuse the link)."""
        ticket = self.tickets.get(address, self.clock.time_ms() / 1000)
        try:
            return await self._dial(address, ticket, open_link, check)
        except LinkFailed as exc:
            if ticket is None or "(resumed session)" not in str(exc):
                raise
        return await self._dial(address, None, open_link, check)

    async def _dial(
        self,
        address: str,
        ticket: SSL.Session | None,
        open_link: OpenLink,
        check: PeerCheck | None = None,
    ) -> Link:
        host, port = split_address(address)
        stream = self.new_stream(initiator=True, session=ticket, check=check)
        try:
            link = await dial(
                lambda: open_link(StreamDriver(stream), address),
                host,
                port,
                timeout=DIAL_TIMEOUT,
                timeout_reason="no HELLO in time",
                close_timeout=CLOSE_TIMEOUT,
            )
        except TimeoutError:
            self.tickets.forget(address)  # the next dial is a full handshake
            raise LinkFailed(f"no link with {address} within {DIAL_TIMEOUT:g} s") from None
        except BaseException:
            self.tickets.forget(address)
            raise
        fresh = stream.session()
        if fresh is not None:  # resume the next link to this address
            self.tickets.put(address, fresh, stream.ticket_expiry(self.clock.time_ms() / 1000))
        return link


def _authorize_then(
    authorize: Callable[[Sequence[Any]], str], check: PeerCheck, chain: Sequence[Any]
) -> str:
    node_id = authorize(chain)
    check(node_id, chain)
    return node_id
