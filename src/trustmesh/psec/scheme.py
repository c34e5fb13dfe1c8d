"""What every PSEC scheme adapter is and says (docs/protocols/psec.md §6, §7): the
interface the channel drives, and the events and errors the adapters share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from cryptography import x509

from trustmesh.errors import ProtocolError
from trustmesh.sansio import Event

# The RFC 5705 / RFC 8446 exporter label of the PSEC confirm, in every scheme.
EXPORTER_LABEL = b"EXPORTER-trustmesh-psec-confirm"


class PayloadTooLarge(ProtocolError):
    """A datagram over the channel's payload limit: refused, never split."""


@dataclass(frozen=True, slots=True)
class SchemeUp(Event):
    """The handshake is done and the peer proved its certificate chain."""

    peer_chain: tuple[x509.Certificate, ...]


@dataclass(frozen=True, slots=True)
class SchemeData(Event):
    data: bytes

    def payload_size(self) -> int:
        return len(self.data)


@dataclass(frozen=True, slots=True)
class SchemeClosed(Event):
    reason: str
    error: bool = True


class Scheme(Protocol):
    """What a scheme adapter offers the channel (``DtlsScheme``, ``QuicScheme``)."""

    @property
    def up(self) -> bool: ...

    @property
    def payload_limit(self) -> int: ...

    @property
    def address_validated(self) -> bool:
        """The peer proved it receives at its address (a DTLS cookie, a QUIC Retry
        token came back), or we chose the address: no amplification limit applies."""
        ...

    def start(self, now: float) -> list[Event]: ...
    def first_flight(self) -> bytes | None: ...
    def receive(self, datagram: bytes, now: float) -> list[Event]: ...
    def send(self, payload: bytes) -> None: ...
    def datagrams_to_send(self) -> list[bytes]: ...
    def get_timer(self) -> float | None: ...
    def handle_timer(self, now: float) -> list[Event]: ...
    def export(self) -> bytes: ...
    def close(self) -> list[Event]: ...


SchemeFactory = Callable[[bool], Scheme]  # initiator -> a new adapter
