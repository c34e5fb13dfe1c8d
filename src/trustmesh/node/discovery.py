"""mDNS discovery of mesh nodes, sans-IO: the advertisement's TXT record, the table of
discovered candidates, and the check a discovered peer's certificate must pass
(docs/protocols/discovery.md).

Nothing here opens a socket or reads a clock: ``now`` (monotonic seconds) comes in from
the driver, ``trustmesh.node.mdns``, which runs python-zeroconf. What a LAN host sends us
is bounded here: a TXT record of at most ``MAX_TXT`` bytes parsed into an :class:`Advert`
or a typed :class:`MalformedAdvert`; at most ``MAX_CANDIDATES`` candidates kept (the
oldest unverified ones go first); refused adverts remembered, at most ``MAX_REFUSED``,
for ``REFUSE_HOLD`` seconds; and a token bucket on the dials that discovery causes.

A candidate is only an address to try. The node dials it through the same path as its
bootstrap list and its peer records (``NodeCore``), and the link is refused, once the
peer's certificate is known, unless that certificate validates, names the advertised
node_id and has the advertised fingerprint (:class:`AdvertCheck`).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NoReturn

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from trustmesh.errors import DecodeError, UnsupportedError
from trustmesh.mesh.errors import MeshError
from trustmesh.mesh.gossip import NODE_ID
from trustmesh.mesh.link import join_address

__all__ = [
    "MAX_CANDIDATES",
    "MAX_NODE_ID",
    "SERVICE_TYPE",
    "Advert",
    "AdvertCheck",
    "AdvertMismatch",
    "Candidate",
    "Candidates",
    "DiscoveryError",
    "MalformedAdvert",
    "UnsupportedAdvert",
    "certificate_fingerprint",
    "encode_txt",
    "instance_name",
    "parse_txt",
    "pick_address",
]

SERVICE_TYPE = "_dadm-mesh._tcp.local."
TXT_VERSION = 1
KEY_VERSION = "txtvers"  # RFC 6763 section 6.7: the first key
KEY_NODE_ID = "node_id"
KEY_FINGERPRINT = "fp"  # SHA-256 of the leaf certificate's DER, 64 lowercase hex digits
MAX_TXT = 512  # bytes of TXT rdata parsed at most (ours: 334 at most)
MAX_NODE_ID = 255 - len("node_id=")  # 247: a node_id's TXT string fits its length byte
MAX_TXT_STRINGS = 16  # strings in one TXT record
MAX_KEY = 32  # characters of a key (RFC 6763 section 6.4 suggests 9 at most)
MAX_INSTANCE = 63  # octets of a DNS label
MAX_ADDRESSES = 16  # addresses of one advert looked at
MAX_CANDIDATES = 256  # discovered candidates kept
MAX_REFUSED = 256  # refused adverts remembered
REFUSE_HOLD = 600.0  # seconds a refused advert is ignored
DIAL_RATE = 1.0  # dials of discovered candidates per second, on average
DIAL_BURST = 4  # and in a burst
FINGERPRINT = re.compile(r"[0-9a-f]{64}")


# --- errors --------------------------------------------------------------------------------


class DiscoveryError(MeshError):
    """Root of the discovery errors."""


class MalformedAdvert(DecodeError, DiscoveryError):
    """An mDNS advertisement (TXT record, port or addresses) we cannot use."""


class UnsupportedAdvert(MalformedAdvert, UnsupportedError):
    """An advertisement of a TXT version we do not speak."""


class AdvertMismatch(DiscoveryError):
    """A discovered peer's certificate is not the one it advertised (node_id or
    fingerprint): the link is refused (CLOSE ``refused``) and the advert dropped."""


# --- the advertisement ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Advert:
    """What a node's TXT record says: who it is, and which certificate it presents."""

    node_id: str
    fingerprint: str  # SHA-256 of the leaf DER, lowercase hex

    def __post_init__(self) -> None:
        if not isinstance(self.node_id, str) or NODE_ID.fullmatch(self.node_id) is None:
            raise MalformedAdvert(f"{KEY_NODE_ID}: not a node_id: {_show(self.node_id)}")
        if len(self.node_id) > MAX_NODE_ID:
            raise MalformedAdvert(
                f"{KEY_NODE_ID} of {len(self.node_id)} characters: at most {MAX_NODE_ID} "
                "fit a TXT string"
            )
        if not isinstance(self.fingerprint, str) or not FINGERPRINT.fullmatch(self.fingerprint):
            raise MalformedAdvert(
                f"{KEY_FINGERPRINT}: not 64 lowercase hex digits: {_show(self.fingerprint)}"
            )


def certificate_fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate's DER, lowercase hex (what ``fp`` carries)."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def encode_txt(advert: Advert) -> bytes:
    """The TXT rdata: ``txtvers=1``, ``node_id=...``, ``fp=...``, each a length byte then
    ``key=value`` in ASCII (RFC 6763 section 6)."""
    out = bytearray()
    for key, value in (
        (KEY_VERSION, str(TXT_VERSION)),
        (KEY_NODE_ID, advert.node_id),
        (KEY_FINGERPRINT, advert.fingerprint),
    ):
        item = f"{key}={value}".encode("ascii")
        out.append(len(item))  # at most 255: Advert keeps node_ids to MAX_NODE_ID
        out += item
    return bytes(out)


def parse_txt(data: bytes) -> Advert:
    """The :class:`Advert` of TXT rdata, or :class:`MalformedAdvert` (never another
    error). Keys are case-insensitive; the first of a repeated key counts and the rest
    are ignored, as are unknown keys and empty strings (RFC 6763 section 6.4)."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MalformedAdvert("TXT rdata is not bytes")
    data = bytes(data)
    if len(data) > MAX_TXT:
        raise MalformedAdvert(f"TXT record of {len(data)} bytes: at most {MAX_TXT}")
    values: dict[str, bytes | None] = {}
    offset = count = 0
    while offset < len(data):
        size = data[offset]
        start, end = offset + 1, offset + 1 + size
        if end > len(data):
            raise MalformedAdvert(f"TXT string of {size} bytes runs past the end", offset=offset)
        item, offset = data[start:end], end
        if not item:
            continue
        count += 1
        if count > MAX_TXT_STRINGS:
            raise MalformedAdvert(f"more than {MAX_TXT_STRINGS} TXT strings", offset=start)
        raw_key, equals, value = item.partition(b"=")
        if not raw_key:
            raise MalformedAdvert("a TXT string with an empty key", offset=start)
        if len(raw_key) > MAX_KEY or any(b < 0x20 or b > 0x7E for b in raw_key):
            raise MalformedAdvert(
                "a TXT key that is not 1 to 32 printable characters", offset=start
            )
        key = raw_key.decode("ascii").lower()
        values.setdefault(key, value if equals else None)
    version = _text(values, KEY_VERSION)
    if version != str(TXT_VERSION):
        raise UnsupportedAdvert(f"{KEY_VERSION} {_show(version)}: this node speaks {TXT_VERSION}")
    return Advert(_text(values, KEY_NODE_ID), _text(values, KEY_FINGERPRINT))


def _text(values: dict[str, bytes | None], key: str) -> str:
    value = values.get(key)
    if value is None:
        raise MalformedAdvert(f"no {key}=... in the TXT record")
    try:
        return value.decode("ascii")
    except UnicodeDecodeError:
        raise MalformedAdvert(f"{key}: not ASCII") from None


def _show(value: object) -> str:
    """A short excerpt of a peer's value for an error message."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def instance_name(node_id: str) -> str:
    """The DNS-SD instance label of a node: its node_id, when that is one DNS label
    (no dots, at most 63 octets); else the node_id with dots as dashes, cut to 54
    characters, then ``-`` and 8 hex digits of its SHA-256. The TXT node_id is what
    counts; the label is only unique and readable."""
    if "." not in node_id and len(node_id) <= MAX_INSTANCE:
        return node_id
    digest = hashlib.sha256(node_id.encode()).hexdigest()[:8]
    return f"{node_id.replace('.', '-')[:54]}-{digest}"


def pick_address(
    addresses: Sequence[str],
    port: int | None,
    *,
    loopback: bool = False,
    networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network] = (),
) -> str:
    """The ``host:port`` to dial of an advert's addresses (text, as zeroconf parses
    them) and SRV port: the first address inside one of ``networks`` (ours), else the
    first usable one. Unusable: unspecified, multicast, broadcast, IPv6 link-local (no
    scope), and loopback unless ``loopback`` (a node listening on loopback)."""
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise MalformedAdvert(f"SRV port {_show(port)} is not in 1..65535")
    usable: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for text in list(addresses)[:MAX_ADDRESSES]:
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            continue
        if address.is_unspecified or address.is_multicast or address.is_loopback != loopback:
            continue
        if address == ipaddress.IPv4Address("255.255.255.255"):
            continue
        if isinstance(address, ipaddress.IPv6Address) and (
            address.is_link_local or address.ipv4_mapped is not None
        ):
            continue
        usable.append(address)
    if not usable:
        raise MalformedAdvert(f"no usable address among {_show(list(addresses)[:4])}")
    near = [a for a in usable if any(a in n for n in networks if a.version == n.version)]
    chosen = (near or usable)[0]
    return join_address(str(chosen), port)


# --- the check on the link -------------------------------------------------------------------


@dataclass
class AdvertCheck:
    """What a link to a discovered address must prove once the peer's certificate is
    known: run after the chain validated (``NodeCore.authorize_chain``), with the
    node_id it names. Raises :class:`AdvertMismatch` (a ``MeshError``: the link sends
    CLOSE ``refused``); ``mismatch`` keeps why, for the driver to drop the advert."""

    address: str
    node_id: str
    fingerprint: str
    mismatch: str | None = None
    passed: bool = False

    def __call__(self, node_id: str, chain: Sequence[x509.Certificate]) -> None:
        if not chain:
            self._refuse("no certificate")
        if node_id != self.node_id:
            self._refuse(f"its certificate names {node_id!r}, not {self.node_id!r}")
        got = certificate_fingerprint(chain[0])
        if not hmac.compare_digest(got, self.fingerprint):
            self._refuse(f"its certificate's SHA-256 is {got}, not {self.fingerprint}")
        self.passed = True

    def _refuse(self, why: str) -> NoReturn:
        self.mismatch = why
        raise AdvertMismatch(f"not the node advertised by mDNS at {self.address}: {why}")


# --- the candidates ------------------------------------------------------------------------


@dataclass(slots=True)
class Candidate:
    address: str  # host:port to dial
    node_id: str
    fingerprint: str
    instance: str  # the mDNS service name it came under (lowercase)
    seen: float  # when the advert last arrived (monotonic seconds)
    verified: bool = False  # a link to it proved the advert


class Candidates:
    """The discovered nodes, one per address (the latest advert for an address wins),
    at most ``capacity``; adverts refused on a link are ignored for ``refuse_hold``
    seconds; dials of candidates are rate-limited (``dial_rate``/s, bursts of
    ``dial_burst``)."""

    def __init__(
        self,
        node_id: str,
        *,
        now: float,
        own_addresses: Iterable[str] = (),
        capacity: int = MAX_CANDIDATES,
        refused_capacity: int = MAX_REFUSED,
        refuse_hold: float = REFUSE_HOLD,
        dial_rate: float = DIAL_RATE,
        dial_burst: int = DIAL_BURST,
    ) -> None:
        if capacity < 1 or refused_capacity < 1:
            raise ValueError("capacities must be at least 1")
        self.node_id = node_id
        self.own_addresses = set(own_addresses)
        self.capacity = capacity
        self.refused_capacity = refused_capacity
        self.refuse_hold = refuse_hold
        self._by_address: dict[str, Candidate] = {}
        # (address, node_id, fingerprint) -> until when it is ignored; oldest first
        self._refused: dict[tuple[str, str, str], float] = {}
        if dial_rate <= 0 or dial_burst < 1:
            raise ValueError("a dial rate needs dial_rate > 0 and dial_burst >= 1")
        # The dial rate as a GCRA: each dial reserves the next slot.
        self._interval = 1.0 / dial_rate
        self._tolerance = (dial_burst - 1) * self._interval
        self._next_slot = now
        self.evicted = 0
        self.refusals = 0

    def __len__(self) -> int:
        return len(self._by_address)

    def __contains__(self, address: object) -> bool:
        return address in self._by_address

    def get(self, address: str) -> Candidate | None:
        return self._by_address.get(address)

    def pairs(self) -> list[tuple[str, str]]:
        """(node_id, address) of every candidate, for ``NodeCore.discovered``."""
        return [(c.node_id, c.address) for c in self._by_address.values()]

    def offer(self, instance: str, advert: Advert, address: str, now: float) -> bool:
        """An advert arrived (or was refreshed): True when the candidates changed. Our
        own (by node_id or address) and one refused lately are ignored."""
        instance = instance.lower()
        if advert.node_id == self.node_id or address in self.own_addresses:
            return False
        until = self._refused.get((address, advert.node_id, advert.fingerprint))
        if until is not None:
            if until > now:
                return False
            del self._refused[(address, advert.node_id, advert.fingerprint)]
        # One service name has one address: an instance that moved leaves its old one.
        moved = [a for a, c in self._by_address.items() if c.instance == instance and a != address]
        for old in moved:
            del self._by_address[old]
        held = self._by_address.get(address)
        if held is not None and (held.node_id, held.fingerprint) == (
            advert.node_id,
            advert.fingerprint,
        ):
            held.seen, held.instance = now, instance
            return bool(moved)
        self._by_address.pop(address, None)  # another advert for the address: the newer wins
        while len(self._by_address) >= self.capacity:
            self._evict()
        self._by_address[address] = Candidate(
            address, advert.node_id, advert.fingerprint, instance, now
        )
        return True

    def _evict(self) -> None:
        """The least recently seen unverified candidate goes, else the least recently
        seen of all."""
        pool = [c for c in self._by_address.values() if not c.verified] or list(
            self._by_address.values()
        )
        oldest = min(pool, key=lambda c: c.seen)
        del self._by_address[oldest.address]
        self.evicted += 1

    def withdraw(self, instance: str) -> bool:
        """The service ``instance`` said goodbye (or its records expired)."""
        instance = instance.lower()
        gone = [a for a, c in self._by_address.items() if c.instance == instance]
        for address in gone:
            del self._by_address[address]
        return bool(gone)

    def check_for(self, address: str) -> AdvertCheck | None:
        """What a link to ``address`` must prove, if it is a candidate."""
        held = self._by_address.get(address)
        if held is None:
            return None
        return AdvertCheck(address, held.node_id, held.fingerprint)

    def dial_delay(self, now: float) -> float:
        """Reserve a dial: the seconds to wait before it goes (0.0: at once). Up to
        ``dial_burst`` go at once, then one every 1 / ``dial_rate`` seconds."""
        slot = max(self._next_slot, now)
        self._next_slot = slot + self._interval
        return max(0.0, slot - self._tolerance - now)

    def verified(self, check: AdvertCheck) -> None:
        """A link proved the advert: it is kept before unverified ones."""
        held = self._by_address.get(check.address)
        if held is not None and (held.node_id, held.fingerprint) == (
            check.node_id,
            check.fingerprint,
        ):
            held.verified = True

    def refuse(self, check: AdvertCheck, now: float) -> bool:
        """A link refused the advert: drop it, and ignore it for ``refuse_hold`` s. True
        when a candidate was dropped."""
        key = (check.address, check.node_id, check.fingerprint)
        self._refused.pop(key, None)
        self._refused[key] = now + self.refuse_hold
        while len(self._refused) > self.refused_capacity:
            del self._refused[next(iter(self._refused))]
        self.refusals += 1
        held = self._by_address.get(check.address)
        if held is not None and (held.node_id, held.fingerprint) == key[1:]:
            del self._by_address[check.address]
            return True
        return False

    def refused(self, address: str, node_id: str, fingerprint: str, now: float) -> bool:
        """Whether that advert is being ignored now."""
        until = self._refused.get((address, node_id, fingerprint))
        return until is not None and until > now
