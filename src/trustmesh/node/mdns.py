"""The mDNS driver of discovery: python-zeroconf's asyncio API around the sans-IO table
of ``trustmesh.node.discovery`` (docs/protocols/discovery.md).

    discovery = MdnsDiscovery(node_id, "0.0.0.0", 7400, fingerprint, clock=clock,
                              changed=lambda pairs: ..., emit=log)
    await discovery.start()        # advertise _dadm-mesh._tcp.local., browse for peers
    check = await discovery.check_for("10.0.0.7:7400")   # rate-limited; None: not ours
    ...                            # dial with ``check`` run on the peer's chain
    discovery.dialled(check)       # a mismatch drops the advert
    await discovery.stop()         # goodbye packets

Zeroconf listens on the interfaces the node's links listen on: every interface for a
wildcard (``0.0.0.0``, ``::``), that one address otherwise. Resolving an advert (SRV,
TXT, A/AAAA) runs in ``RESOLVERS`` tasks that take service names from a bounded queue,
so a LAN host that announces thousands of names costs a bounded amount of work.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Callable
from typing import Any, Protocol

import ifaddr  # comes with zeroconf (its own interface enumeration)
from zeroconf import InterfaceChoice, IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from trustmesh.clock import Clock
from trustmesh.io.tasks import TaskSet, within
from trustmesh.mesh.link import join_address
from trustmesh.node.discovery import (
    MAX_CANDIDATES,
    SERVICE_TYPE,
    Advert,
    AdvertCheck,
    Candidates,
    MalformedAdvert,
    encode_txt,
    instance_name,
    parse_txt,
    pick_address,
)

__all__ = ["MdnsDiscovery", "MdnsSetup", "mdns_setup"]

log = logging.getLogger("trustmesh.node.mdns")

RESOLVERS = 4  # adverts resolved at once
MAX_PENDING = MAX_CANDIDATES  # service names waiting to be resolved (the oldest go)
RESOLVE_TIMEOUT_MS = 3000
STOP_TIMEOUT = 3.0

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Pairs = list[tuple[str, str]]


class Emit(Protocol):
    def __call__(self, event: str, *, level: int = ..., **fields: Any) -> None: ...


class MdnsSetup:
    """Where zeroconf listens and what the advert says about us, from the host the
    links listen on: ``interfaces`` and ``ip_version`` for zeroconf, the ``addresses``
    to advertise, the ``networks`` we are on (a discovered peer inside one is dialled at
    that address first), and whether we listen on loopback (then only loopback adverts
    are used; else never loopback)."""

    def __init__(
        self,
        interfaces: list[str] | InterfaceChoice,
        ip_version: IPVersion,
        addresses: list[str],
        networks: list[Network],
        loopback: bool,
    ) -> None:
        self.interfaces = interfaces
        self.ip_version = ip_version
        self.addresses = addresses
        self.networks = networks
        self.loopback = loopback


def mdns_setup(host: str, adapters: list[ifaddr.Adapter] | None = None) -> MdnsSetup:
    """The :class:`MdnsSetup` for links listening on ``host`` (an IP address; the config
    checks it). ``adapters``: the interfaces (default: ifaddr's view of this host)."""
    listen = ipaddress.ip_address(host)
    found = ifaddr.get_adapters() if adapters is None else adapters
    ours: list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, Network]] = []
    for adapter in found:
        for ip in adapter.ips:
            text = ip.ip if isinstance(ip.ip, str) else ip.ip[0]
            with contextlib.suppress(ValueError):
                network = ipaddress.ip_network(f"{text}/{ip.network_prefix}", strict=False)
                ours.append((ipaddress.ip_address(text), network))
    if listen.is_unspecified:
        version = IPVersion.V4Only if listen.version == 4 else IPVersion.All
        versions = {4} if listen.version == 4 else {4, 6}
        chosen = [
            (a, n)
            for a, n in ours
            if a.version in versions and not a.is_loopback and not a.is_link_local
        ]
        return MdnsSetup(
            InterfaceChoice.All,
            version,
            [str(a) for a, _ in chosen],
            [n for _, n in chosen],
            loopback=False,
        )
    version = IPVersion.V4Only if listen.version == 4 else IPVersion.V6Only
    networks = [n for a, n in ours if a == listen]
    return MdnsSetup([str(listen)], version, [str(listen)], networks, loopback=listen.is_loopback)


class MdnsDiscovery:
    """Advertise this node and keep the table of discovered ones; ``changed(pairs)``
    gets the (node_id, address) of every candidate each time they change (the node
    hands them to ``NodeCore.discovered``)."""

    def __init__(
        self,
        node_id: str,
        host: str,
        port: int,
        fingerprint: str,
        *,
        clock: Clock,
        changed: Callable[[Pairs], None],
        emit: Emit,
        setup: MdnsSetup | None = None,
        service_type: str = SERVICE_TYPE,
    ) -> None:
        self.node_id = node_id
        self.port = port
        self.clock = clock
        self.service_type = service_type
        self.setup = setup if setup is not None else mdns_setup(host)
        self._advert = Advert(node_id, fingerprint)
        self._changed = changed
        self._emit = emit
        own = {join_address(a, port) for a in self.setup.addresses}
        self.candidates = Candidates(node_id, now=clock.monotonic(), own_addresses=own)
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._pending: dict[str, None] = {}  # service names to resolve, oldest first
        self._wake = asyncio.Event()
        self._tasks = TaskSet()
        self.malformed = 0  # adverts that did not parse

    @property
    def instance(self) -> str:
        """Our service name (zeroconf may have renamed it after a conflict)."""
        if self._info is not None:
            return self._info.name
        return f"{instance_name(self.node_id)}.{self.service_type}"

    async def start(self) -> None:
        """Open the sockets, start browsing, and advertise (probing and announcing run
        in the background). Raises ``OSError`` when no socket can be opened."""
        setup = self.setup
        self._zc = AsyncZeroconf(interfaces=setup.interfaces, ip_version=setup.ip_version)
        self._info = self._service_info(self.instance)
        for _ in range(RESOLVERS):
            self._tasks.spawn(self._resolver())
        self._tasks.spawn(self._register(self._info))
        self._browser = AsyncServiceBrowser(
            self._zc.zeroconf, self.service_type, handlers=[self._on_state_change]
        )
        self._emit(
            "mdns.started",
            instance=self.instance,
            addresses=setup.addresses,
            port=self.port,
            fingerprint=self._advert.fingerprint,
        )

    async def stop(self) -> None:
        """Stop browsing and resolving; say goodbye (bounded by ``STOP_TIMEOUT``)."""
        await self._tasks.cancel(STOP_TIMEOUT, "mDNS tasks")
        browser, self._browser = self._browser, None
        if browser is not None:
            await browser.async_cancel()
        zc, self._zc = self._zc, None
        if zc is not None:
            await within(STOP_TIMEOUT, zc.async_close(), what="mDNS goodbye")

    def _service_info(self, name: str) -> AsyncServiceInfo:
        return AsyncServiceInfo(
            self.service_type,
            name,
            port=self.port,
            properties=encode_txt(self._advert),
            server=f"{instance_name(self.node_id)}.local.",
            parsed_addresses=self.setup.addresses,
        )

    async def _register(self, info: AsyncServiceInfo) -> None:
        assert self._zc is not None
        try:
            announced = await self._zc.async_register_service(info, allow_name_change=True)
            await announced
        except Exception as exc:  # zeroconf's own errors: a node without an advert still browses
            self._emit("mdns.advertise_failed", level=logging.WARNING, error=_why(exc))
            return
        self._emit("mdns.advertised", level=logging.DEBUG, instance=info.name)

    async def readvertise(self, fingerprint: str) -> None:
        """Our certificate changed (renewal): announce its fingerprint."""
        self._advert = Advert(self.node_id, fingerprint)
        if self._zc is None or self._info is None:
            return
        self._info = self._service_info(self._info.name)
        try:
            await (await self._zc.async_update_service(self._info))
        except Exception as exc:  # as in _register
            self._emit("mdns.advertise_failed", level=logging.WARNING, error=_why(exc))

    # --- discovered adverts -------------------------------------------------------------

    def _on_state_change(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        if name.lower() == self.instance.lower():
            return
        if state_change is ServiceStateChange.Removed:
            self._pending.pop(name, None)
            if self.candidates.withdraw(name):
                self._emit("mdns.withdrawn", level=logging.DEBUG, instance=name)
                self._changed(self.candidates.pairs())
            return
        self._pending.pop(name, None)  # to the back of the queue
        self._pending[name] = None
        while len(self._pending) > MAX_PENDING:
            del self._pending[next(iter(self._pending))]
        self._wake.set()

    async def _resolver(self) -> None:
        while True:
            while not self._pending:
                self._wake.clear()
                await self._wake.wait()
            name = next(iter(self._pending))
            del self._pending[name]
            try:
                await self._resolve(name)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a hostile advert must not end a resolver
                self._emit("mdns.resolve_failed", level=logging.DEBUG, error=_why(exc))

    async def _resolve(self, name: str) -> None:
        zc = self._zc
        if zc is None:
            return
        info = AsyncServiceInfo(self.service_type, name)
        if not info.load_from_cache(zc.zeroconf) and not await info.async_request(
            zc.zeroconf, RESOLVE_TIMEOUT_MS
        ):
            self._emit("mdns.unresolved", level=logging.DEBUG, instance=name)
            return
        try:
            advert = parse_txt(info.text or b"")
            address = pick_address(
                info.parsed_addresses(),
                info.port,
                loopback=self.setup.loopback,
                networks=self.setup.networks,
            )
        except MalformedAdvert as exc:
            self.malformed += 1
            self._emit("mdns.malformed", level=logging.DEBUG, instance=name, error=str(exc))
            return
        if self.candidates.offer(name, advert, address, self.clock.monotonic()):
            fields = {"node_id": advert.node_id, "address": address, "instance": name}
            self._emit("mdns.discovered", level=logging.DEBUG, **fields)
            self._changed(self.candidates.pairs())

    # --- dialling -----------------------------------------------------------------------

    async def check_for(self, address: str) -> AdvertCheck | None:
        """What a dial of ``address`` must prove, if it is a discovered candidate (None
        otherwise), once the dial rate allows it (this waits for its slot)."""
        check = self.candidates.check_for(address)
        if check is None:
            return None
        delay = self.candidates.dial_delay(self.clock.monotonic())
        if delay > 0:
            await asyncio.sleep(delay)
        return check

    def dialled(self, check: AdvertCheck) -> None:
        """A dial with ``check`` ended: a mismatch drops the advert (it is ignored for
        ``REFUSE_HOLD``), a match marks it verified."""
        if check.mismatch is not None:
            self.candidates.refuse(check, self.clock.monotonic())
            self._emit(
                "mdns.refused",
                level=logging.WARNING,
                node_id=check.node_id,
                address=check.address,
                fingerprint=check.fingerprint,
                reason=check.mismatch,
            )
            self._changed(self.candidates.pairs())
        elif check.passed:
            self.candidates.verified(check)
            self._emit("mdns.verified", node_id=check.node_id, address=check.address)


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
