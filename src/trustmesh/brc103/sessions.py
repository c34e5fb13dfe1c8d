"""Session records and their index: by our session nonce, and by peer identity key.

A peer may hold several sessions with one identity (two tabs, a re-handshake); sending
by identity prefers the most recently used session whose peer has proven itself. The table
is bounded three ways: in sessions, in sessions whose peer has not yet signed anything
(an initialRequest is unsigned, so anyone can make those), and in message nonces
remembered for replay checks across all sessions.

Unproven sessions are counted per source as well: the address an initialRequest came
from, as the transport names it (``None`` for our own handshakes, which are not bounded
per source). Room for a new unproven session from source S is made this way:

1. S already holds ``max_unproven_per_source``: S's own oldest goes.
2. ``max_unproven`` are unproven: one of them goes (see below; never a proven one).
3. ``max_sessions`` are held: one unproven session goes if one qualifies (below), else the
   least recently used proven session. Since at most ``max_unproven`` sessions are ever
   unproven, a flood of initialRequests never brings the proven sessions below
   ``max_sessions - max_unproven``; a flood from one source displaces at most one.

The unproven session that goes is the oldest of the source holding the most of them, if
it holds more than S will once the newcomer is in; else S's own oldest. So a flood from
one source pushes out its own half-made sessions, never those of a client elsewhere, and
handshakes in progress from different clients do not push each other out while the
table is full of proven sessions (only at the cap on unproven ones, step 2, does the
oldest go when every source holds one).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

from trustmesh.brc103.certificates import VerifiableCertificate
from trustmesh.brc103.messages import AuthMessage, RequestedCertificates


@dataclass(slots=True, eq=False)
class Session:
    session_nonce: str  # ours: the key incoming messages name in yourNonce
    peer_identity_key: str | None
    initiator: bool
    last_update_ms: int
    source: str | None = None  # where the initialRequest came from (None: we initiated)
    peer_nonce: str | None = None
    is_authenticated: bool = False  # the handshake is done (for a responder: at once)
    peer_proven: bool = False  # a signature from the peer has verified in this session
    handshake_deadline_ms: int | None = None
    certificates_required: bool = False  # we asked this peer for certificates
    certificates_validated: bool = False
    requested: RequestedCertificates | None = None  # what we asked this peer for
    certificates: list[VerifiableCertificate] = field(default_factory=list)
    seen_nonces: set[str] = field(default_factory=set)
    held: list[AuthMessage] = field(default_factory=list)  # general messages awaiting certs
    held_bytes: int = 0
    held_deadline_ms: int | None = None
    # When the session was made (the grace for a silent peer's certificates scales with it).
    started_ms: int = 0
    # A certificateResponse from the peer has been accepted in this session.
    certificates_answered: bool = False
    # The peer has none of the certificates we require (it said so, or stayed silent past
    # the grace): its general messages are refused at once, not held, until some validate.
    certificates_missing: bool = False
    # The held deadline is the grace for a silent peer, not the certificate timeout.
    held_is_grace: bool = False


class SessionTable:
    def __init__(
        self,
        max_sessions: int,
        *,
        max_unproven: int,
        max_seen: int,
        max_unproven_per_source: int | None = None,
    ) -> None:
        per_source = max_unproven if max_unproven_per_source is None else max_unproven_per_source
        if min(max_sessions, max_unproven, max_seen, per_source) < 1:
            raise ValueError("session limits must be at least 1")
        self._max = max_sessions
        self._max_unproven = max_unproven
        self._max_unproven_per_source = per_source
        self._max_seen = max_seen
        self._by_nonce: OrderedDict[str, Session] = OrderedDict()
        self._unproven: OrderedDict[str, Session] = OrderedDict()
        # The unproven sessions again, oldest first, per source.
        self._unproven_by_source: dict[str | None, OrderedDict[str, Session]] = {}
        self._by_identity: dict[str, list[Session]] = {}
        self.seen_total = 0  # message nonces remembered, all sessions together
        self.held_total = 0  # bytes of general messages held, all sessions together

    def __len__(self) -> int:
        return len(self._by_nonce)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._by_nonce.values()))

    @property
    def unproven(self) -> int:
        """Sessions whose peer has not signed anything yet."""
        return len(self._unproven)

    def unproven_of(self, source: str | None) -> int:
        """Unproven sessions that ``source`` holds."""
        return len(self._unproven_by_source.get(source, ()))

    def add(self, session: Session) -> list[Session]:
        """Store ``session``; return the sessions evicted to make room (see the module's
        docstring for who goes)."""
        evicted: list[Session] = []
        if session.peer_proven:
            while len(self._by_nonce) >= self._max:
                evicted.append(self._evict(self._largest_holders_oldest() or self._lru()))
        else:
            source = session.source
            own = self._unproven_by_source.get(source)
            if source is not None and own and len(own) >= self._max_unproven_per_source:
                evicted.append(self._evict(next(iter(own.values()))))
            while len(self._unproven) >= self._max_unproven:
                victim = self._unproven_victim(source) or next(iter(self._unproven.values()))
                evicted.append(self._evict(victim))
            while len(self._by_nonce) >= self._max:
                # No source holds more than this one will, and this one holds none: a
                # proven session makes room (unproven ones stay under max_unproven, so
                # at most that many proven sessions can be displaced), not another
                # client's handshake in progress.
                victim = self._unproven_victim(source) or self._lru()
                evicted.append(self._evict(victim))
        self._by_nonce[session.session_nonce] = session
        if not session.peer_proven:
            self._unproven[session.session_nonce] = session
            self._unproven_by_source.setdefault(session.source, OrderedDict())[
                session.session_nonce
            ] = session
        if session.peer_identity_key is not None:
            self._by_identity.setdefault(session.peer_identity_key, []).append(session)
        return evicted

    def _unproven_victim(self, source: str | None) -> Session | None:
        """The unproven session to evict for a newcomer from ``source``: the oldest of
        the source holding the most, if it holds more than ``source`` will with the
        newcomer; else ``source``'s own oldest; None if ``source`` holds none."""
        own = self._unproven_by_source.get(source)
        mine = len(own) if own else 0
        largest = self._largest_holder()
        if largest is not None and len(largest) > mine + 1:
            return next(iter(largest.values()))
        if own:
            return next(iter(own.values()))
        return None

    def _largest_holder(self) -> OrderedDict[str, Session] | None:
        """The unproven sessions of the source holding the most (of those holding equally
        many, the one that has held some longest)."""
        most: OrderedDict[str, Session] | None = None
        for held in self._unproven_by_source.values():
            if most is None or len(held) > len(most):
                most = held
        return most

    def _largest_holders_oldest(self) -> Session | None:
        most = self._largest_holder()
        return next(iter(most.values())) if most else None

    def _lru(self) -> Session:
        """The least recently used session (proven, when called: no unproven is left to
        go, or the newcomer must not push out another client's handshake)."""
        for session in self._by_nonce.values():
            if session.peer_proven:
                return session
        return next(iter(self._by_nonce.values()))

    def mark_proven(self, session: Session) -> None:
        session.peer_proven = True
        self._drop_unproven(session)

    def _drop_unproven(self, session: Session) -> None:
        if self._unproven.pop(session.session_nonce, None) is None:
            return
        own = self._unproven_by_source.get(session.source)
        if own is not None:
            own.pop(session.session_nonce, None)
            if not own:
                del self._unproven_by_source[session.source]

    def remember_nonce(self, session: Session, nonce: str) -> list[Session]:
        """Record a message nonce; return the (other) sessions evicted to stay in budget."""
        session.seen_nonces.add(nonce)
        self.seen_total += 1
        evicted: list[Session] = []
        while self.seen_total > self._max_seen and len(self._by_nonce) > 1:
            oldest = next(iter(self._by_nonce.values()))
            if oldest is session:
                self._by_nonce.move_to_end(session.session_nonce)
                continue
            evicted.append(self._evict(oldest))
        return evicted

    def set_identity(self, session: Session, identity_key: str) -> None:
        self._unindex(session)
        session.peer_identity_key = identity_key
        self._by_identity.setdefault(identity_key, []).append(session)

    def get(self, nonce: str) -> Session | None:
        """Look up without counting as a use."""
        return self._by_nonce.get(nonce)

    def touch(self, session: Session) -> None:
        if session.session_nonce in self._by_nonce:
            self._by_nonce.move_to_end(session.session_nonce)

    def by_identity(self, identity_key: str) -> Session | None:
        """The session to send on: the most recently updated one with this peer in which it
        has signed, else (a responder before the peer's first signed message) the latest
        with a completed handshake. An unsigned initialRequest naming someone else's key
        thus never displaces a session that key has proven."""
        best: Session | None = None
        for session in self._by_identity.get(identity_key, ()):
            if session.is_authenticated and (
                best is None
                or (session.peer_proven, session.last_update_ms)
                >= (best.peer_proven, best.last_update_ms)
            ):
                best = session
        return best

    def sessions_of(self, identity_key: str) -> list[Session]:
        return list(self._by_identity.get(identity_key, ()))

    def remove(self, session: Session) -> None:
        if self._by_nonce.pop(session.session_nonce, None) is not None:
            self._forget(session)

    def _evict(self, session: Session) -> Session:
        del self._by_nonce[session.session_nonce]
        self._forget(session)
        return session

    def _forget(self, session: Session) -> None:
        self._drop_unproven(session)
        self.seen_total -= len(session.seen_nonces)
        self.held_total -= session.held_bytes
        session.held_bytes = 0  # the held messages themselves stay, for the report
        self._unindex(session)

    def _unindex(self, session: Session) -> None:
        if session.peer_identity_key is None:
            return
        sessions = self._by_identity.get(session.peer_identity_key)
        if sessions and session in sessions:
            sessions.remove(session)
            if not sessions:
                del self._by_identity[session.peer_identity_key]
