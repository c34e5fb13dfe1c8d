"""A running node's bundles: its store, its codec and the agent in its core, as the API
and the CLI use them (docs/protocols/bundles.md section 9)."""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trustmesh.bundle.codec import Bundle
from trustmesh.bundle.eid import BROADCAST, Eid
from trustmesh.bundle.store import ROLES, BundleStore, Role, StoredBundle, StoreError
from trustmesh.clock import Clock
from trustmesh.mesh.bundle_codec import MAX_PAYLOAD, MeshBundleCodec
from trustmesh.mesh.dtn import BundleAgent
from trustmesh.mesh.errors import MeshError
from trustmesh.node.runfile import running_pid

BUNDLE_STORE_FILE = "bundles.db"
BUNDLE_LOCK_FILE = "bundles.lock"  # held by the one process that writes bundles.db
CONTACT_SERVICE = "contact"  # dtn://~mesh/contact: "I am back, here is my record"
CONTACT_TTL_S = 300
GOSSIP_SERVICE = "gossip"  # dtn://~mesh/gossip: our anomalies, for nodes that are down
SEEK_SERVICE = "seek"  # dtn://~mesh/seek/<node_id>: "I hold bundles for you, here I am"
SEEK_TTL_S = 300
SEEK_INTERVAL_MS = 300_000  # a destination is sought at most this often
MAX_SOUGHT = 1024  # destinations remembered as sought


class StoreBusyError(MeshError):
    """Another process (the running node) holds the node's bundle store."""


class NodeRunningError(StoreBusyError):
    """The node in this directory is running already (its pid is in run.json)."""


class StoreLock:
    """An exclusive lock on a node's bundle store, for the life of the process that
    writes it: the store keeps its quota totals in memory, so it has one writer. The
    kernel drops the lock when the process dies (kill -9 included).

    It is also what keeps a second ``node run`` off a running node's directory: the lock,
    not run.json, decides (a run.json left by a crash blocks nothing); run.json only
    names the pid that holds it."""

    def __init__(self, directory: Path) -> None:
        self._file = open(directory / BUNDLE_LOCK_FILE, "a+b")  # noqa: SIM115 (held)
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            pid = running_pid(directory)
            if pid is not None:
                raise NodeRunningError(f"node already running (pid {pid}) in {directory}") from None
            raise StoreBusyError(
                f"{directory / BUNDLE_STORE_FILE} is in use by another process"
            ) from None

    @classmethod
    def check_free(cls, directory: Path) -> None:
        """Fail now, before a slow start (keys, stores), if the node runs already."""
        if (directory / BUNDLE_LOCK_FILE).exists():  # else no one holds it: make none
            cls(directory).release()

    def release(self) -> None:
        if not self._file.closed:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()


class NodeBundles:
    """The node's side of ``/v1/bundles``. ``run`` carries out the agent's actions (the
    driver's: frames to send, deliveries to tell)."""

    max_payload = MAX_PAYLOAD

    def __init__(
        self,
        node_id: str,
        store: BundleStore,
        codec: MeshBundleCodec,
        agent: BundleAgent[Any],
        clock: Clock,
        run: Callable[[list[Any]], None],
        signer: Callable[[], str],
        *,
        linked: Callable[[str], bool] = lambda node_id: False,
        own_record: Callable[[], bytes | None] = lambda: None,
    ) -> None:
        """``signer()``: the serial (hex) of the node's current certificate;
        ``linked(node_id)``: whether a link to it is up; ``own_record()``: our signed
        peer record, for seeks (None: no seeks, as when the node is not running)."""
        self.node_id = node_id
        self.store = store
        self.codec = codec
        self.agent = agent
        self.clock = clock
        self._run = run
        self._signer = signer
        self._linked = linked
        self._own_record = own_record
        self._sought: dict[str, int] = {}  # node_id -> when we last sought it

    @staticmethod
    def open_store(directory: Path, *, quota: int, source_quota: int) -> BundleStore:
        return BundleStore(
            directory / BUNDLE_STORE_FILE, max_bytes=quota, max_source_bytes=source_quota
        )

    def send(self, destination: str, ttl_s: int, payload: bytes) -> tuple[str, int]:
        """A bundle from this node: (its id, when it expires in Unix ms), once stored."""
        now = self.clock.time_ms()
        eid = self.codec.destination(destination)
        answer = self._submit(self.codec.make(eid, payload, ttl_s * 1000, now), now)
        self._seek(eid, now)
        return answer

    def submit_raw(self, data: bytes) -> tuple[str, int]:
        """An RFC 9171 bundle made by this node's application, signed here."""
        now = self.clock.time_ms()
        pieces = self.codec.adopt(data, now)
        answer = self._submit(pieces, now)
        self._seek(pieces[0].primary.destination, now)
        return answer

    def _seek(self, destination: Eid, now: int) -> None:
        """A bundle for a node we are not linked to: broadcast our record to the seek
        service of that node (at most every SEEK_INTERVAL_MS), so that it dials us
        wherever it is in the mesh. Spray-and-wait alone seldom meets a node that
        stays up in a mesh of thousands."""
        node = destination.node
        if node.startswith("~") or node == self.node_id or self._linked(node):
            return
        record = self._own_record()
        if record is None or now - self._sought.get(node, -SEEK_INTERVAL_MS) < SEEK_INTERVAL_MS:
            return
        self._sought[node] = now
        if len(self._sought) > MAX_SOUGHT:
            del self._sought[next(iter(self._sought))]
        eid = Eid.dtn(BROADCAST.node, f"{SEEK_SERVICE}/{node}")
        with contextlib.suppress(StoreError):  # the bundle waits for contact without
            self._submit(self.codec.make(eid, record, SEEK_TTL_S * 1000, now), now)

    def _submit(self, pieces: list[Bundle], now: int) -> tuple[str, int]:
        signer = self._signer()
        admitted = [self.codec.admitted(p, signer, p.encode()) for p in pieces]
        self._run(self.agent.submit(admitted, now))
        first = admitted[0]
        return first.whole_id, first.expires_ms

    def announce(self, record: bytes) -> str:
        """Tell the mesh we are (back) up: our signed peer record in a broadcast to the
        contact service. Nodes holding bundles for us then dial us (store until
        contact), wherever in the mesh they are."""
        now = self.clock.time_ms()
        eid = Eid.dtn(BROADCAST.node, CONTACT_SERVICE)
        return self._submit(self.codec.make(eid, record, CONTACT_TTL_S * 1000, now), now)[0]

    def carry_gossip(self, raw: bytes, expiry_ms: int) -> str | None:
        """Our signed gossip message, also as a broadcast bundle that every node holds
        until the message expires: a node that was down gets it when it comes back,
        even if every node restarted meanwhile (gossip remembers only so much, and only
        in memory). None if the message has expired."""
        now = self.clock.time_ms()
        if expiry_ms <= now:
            return None
        eid = Eid.dtn(BROADCAST.node, GOSSIP_SERVICE)
        return self._submit(self.codec.make(eid, raw, expiry_ms - now, now), now)[0]

    def items(self, role: str, limit: int) -> list[StoredBundle]:
        return self.store.items(_role(role), limit=limit)

    def find(self, bundle_id: str) -> StoredBundle | None:
        for role in ("inbox", "forwarding", "fragment"):
            found = self.store.get(bundle_id, _role(role))
            if found is not None:
                return found
        return None

    def payload_of(self, bundle: StoredBundle) -> bytes:
        return self.codec.payload_of(bundle.data)

    def acknowledge(self, bundle_id: str) -> bool:
        return self.agent.acknowledge(bundle_id)


def _role(text: str) -> Role:
    for role in ROLES:
        if text == role:
            return role
    raise ValueError(f"no role {text!r}")
