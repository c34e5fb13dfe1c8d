"""Connection collision resolution (RFC 4271 section 6.8), one registry per node.

When two nodes dial each other at once, each ends up with two sessions to the same
peer. Every session that has accepted its peer's OPEN claims the peer's BGP identifier
here; when another live session already holds it, exactly one of the two survives:

- dialled in opposite directions: the connection that the node with the higher BGP
  identifier initiated survives. Two IPv4 identifiers compare as 32-bit unsigned
  integers, as RFC 4271 compares them (10.0.0.10 is above 10.0.0.9); any other pair
  compares as UTF-8 bytes. Both nodes reach
  the same verdict, whatever state each connection is in on either side, because the
  rule depends on nothing but the two identifiers. That is RFC 4271's rule with its
  optional "CollisionDetectEstablishedState" on: without it, a connection that one side
  already counts as Established and the other does not can be refused on both sides.
- dialled in the same direction (the peer redialled): the newer connection survives, as
  the peer evidently gave up on the older one.

The loser is closed with NOTIFICATION 6/7 (Cease, connection collision resolution).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar


class _Identified(Protocol):
    @property
    def bgp_identifier(self) -> str: ...


class Contender(Protocol):
    """What a collision compares of a session (a ``CatalystSession``)."""

    @property
    def initiator(self) -> bool: ...

    @property
    def config(self) -> _Identified: ...


S = TypeVar("S", bound=Contender)


class CollisionRegistry(Generic[S]):
    """The live sessions of one node, by peer BGP identifier.

    ``evict(session)`` is called when a session that already held the identifier loses
    to a newer claim; whoever runs that session closes it with ``session.evict(now)``.
    """

    def __init__(self, evict: Callable[[S], None] | None = None) -> None:
        self._evict = evict
        self._holders: dict[str, S] = {}

    def __len__(self) -> int:
        return len(self._holders)

    def holder(self, peer_identifier: str) -> S | None:
        return self._holders.get(peer_identifier)

    def claim(self, session: S, peer_identifier: str) -> bool:
        """Register ``session`` as the one to ``peer_identifier``. False: it lost the
        collision and must close; True: it holds the identifier (an older holder that
        lost has been handed to ``evict``)."""
        holder = self._holders.get(peer_identifier)
        if holder is not None and holder is not session:
            if not survives(session, holder, peer_identifier):
                return False
            del self._holders[peer_identifier]
            if self._evict is not None:
                self._evict(holder)
        self._holders[peer_identifier] = session
        return True

    def release(self, session: S) -> None:
        """Forget ``session`` (it closed); a no-op if it holds nothing."""
        for ident, holder in list(self._holders.items()):
            if holder is session:
                del self._holders[ident]


def survives(new: Contender, old: Contender, peer_identifier: str) -> bool:
    """Whether ``new`` wins over ``old``, both sessions of one node to the same peer."""
    if new.initiator == old.initiator:
        return True  # a redial in the same direction replaces the older connection
    higher_is_local = is_higher(new.config.bgp_identifier, peer_identifier)
    # The survivor is the connection the higher identifier initiated.
    return new.initiator == higher_is_local


def is_higher(ours: str, theirs: str) -> bool:
    """Whether BGP identifier ``ours`` is above ``theirs``: as unsigned 32-bit integers
    when both are IPv4 addresses (RFC 4271 section 6.8), else as UTF-8 bytes."""
    a, b = _ipv4(ours), _ipv4(theirs)
    if a is not None and b is not None:
        return a > b
    return ours.encode() > theirs.encode()


def _ipv4(identifier: str) -> int | None:
    try:
        return int(ipaddress.IPv4Address(identifier))
    except ValueError:
        return None
