"""What one simulation run does (docs/sim.md): the mesh, the network, the scenario."""

from __future__ import annotations

from dataclasses import dataclass

ADMISSIONS = ("managed", "legacy")
CRYPTO_MODES = ("shared", "full")
CHURN_WINDOW_MS = 20_000  # churned nodes go down in the 20 s after formation


def parse_range(text: str) -> tuple[int, int]:
    """``A..B`` (or a single ``A``) in whole milliseconds, 0 <= A <= B."""
    low, sep, high = text.partition("..")
    try:
        a = int(low)
        b = int(high) if sep else a
    except ValueError:
        raise ValueError(f"{text!r} is not A..B (whole milliseconds)") from None
    if not 0 <= a <= b:
        raise ValueError(f"{text!r}: need 0 <= A <= B")
    return a, b


@dataclass(frozen=True)
class SimConfig:
    """One run. Times are virtual milliseconds from the start of the run; ``None``
    picks the default timeline (docs/sim.md)."""

    nodes: int = 100
    seed: int = 1
    loss: float = 0.0  # GOSSIP, IHAVE and IWANT frames dropped with this probability
    latency_ms: tuple[int, int] = (5, 50)  # one way, uniform, per write
    partition_at: int | None = None
    heal_at: int | None = None
    churn: float = 0.0  # the fraction of non-bootstrap nodes that go down once and return
    churn_down_ms: tuple[int, int] = (2_000, 10_000)
    revoke: int = 1
    bootstrap: int = 3
    max_links: int = 12
    dial_target: int | None = None  # default: the core's (managed) or max_links // 2 (legacy)
    admission: str = "managed"
    anomalies: int = 1
    anomaly_at: int | None = None
    revoke_at: int | None = None
    join_ms: int = 5_000  # the non-bootstrap nodes start at random times in [0, join_ms]
    formed_at: int = 20_000  # formation is judged here; anomalies follow by default
    duration_ms: int | None = None  # the latest the run may go on
    settle_ms: int = 120_000  # after the last scenario event, at most this long
    dial_timeout_ms: int = 10_000  # a dial to a node that is down or cut off fails then
    crypto: str = "shared"
    fanout: int = 3
    hold_time: int = 30  # seconds (mesh-link.md)
    crl_interval_ms: int = 60_000
    digest_interval_ms: int = 1_000
    workers: int = 2  # processes that issue certificates for big meshes
    # Bundles (docs/sim.md): with either count above 0, every node runs a BundleAgent.
    bundles: int = 0  # unicast bundles, each from a random up node to a random other node
    bundle_broadcasts: int | None = None  # to dtn://~mesh/inbox; None: 2 with --bundles
    bundles_at: tuple[int, int] | None = None  # sent at random times in A..B (ms)
    bundle_ttl_ms: int = 600_000
    bundle_copies: int = 8  # spray-and-wait copies a bundle starts with
    bundle_size: int = 256  # payload bytes of each bundle
    bundle_to_down: float = 0.0  # the share of unicasts sent to a node that is down (if any)

    def __post_init__(self) -> None:
        if self.nodes < 2:
            raise ValueError("a mesh needs at least 2 nodes")
        if not 0.0 <= self.loss < 1.0:
            raise ValueError("loss is a probability in [0, 1)")
        if not 0.0 <= self.churn <= 1.0:
            raise ValueError("churn is a fraction in [0, 1]")
        if not 1 <= self.bootstrap <= self.nodes:
            raise ValueError("bootstrap must be 1..nodes")
        if self.admission not in ADMISSIONS:
            raise ValueError(f"admission is one of {ADMISSIONS}")
        if self.crypto not in CRYPTO_MODES:
            raise ValueError(f"crypto is one of {CRYPTO_MODES}")
        if self.max_links < 1 or self.anomalies < 0 or self.revoke < 0:
            raise ValueError("max_links >= 1, anomalies >= 0, revoke >= 0")
        if self.revoke > self.nodes - self.bootstrap - 1:
            raise ValueError("revoke at most nodes - bootstrap - 1 nodes")
        if (self.partition_at is None) != (self.heal_at is None):
            raise ValueError("--partition-at and --heal-at go together")
        if (
            self.partition_at is not None
            and self.heal_at is not None
            and not 0 <= self.partition_at < self.heal_at
        ):
            raise ValueError("need 0 <= partition-at < heal-at")
        low, high = self.latency_ms
        if not 0 <= low <= high:
            raise ValueError("latency: need 0 <= A <= B")
        if self.bundles < 0 or (self.bundle_broadcasts or 0) < 0:
            raise ValueError("bundles and bundle broadcasts are counts (>= 0)")
        if self.bundle_ttl_ms < 1 or not 1 <= self.bundle_copies <= 255:
            raise ValueError("bundle-ttl >= 1 ms, bundle-copies 1..255")
        if not 0.0 <= self.bundle_to_down <= 1.0:
            raise ValueError("bundle-to-down is a fraction in [0, 1]")
        if not 0 <= self.bundle_size <= 60_000:
            raise ValueError("bundle-size is 0..60000 bytes (one link frame)")
        if self.bundles_at is not None and not 0 <= self.bundles_at[0] <= self.bundles_at[1]:
            raise ValueError("bundles-at: need 0 <= A <= B")

    @property
    def broadcasts(self) -> int:
        """Broadcast bundles the run sends."""
        if self.bundle_broadcasts is not None:
            return self.bundle_broadcasts
        return 2 if self.bundles else 0

    @property
    def with_bundles(self) -> bool:
        """Whether the nodes run bundle agents."""
        return self.bundles > 0 or self.broadcasts > 0

    @property
    def bundle_window(self) -> tuple[int, int]:
        """When bundles are sent (ms): by default from formation over the churn window
        and the longest downtime after it, so that some go to nodes that are down."""
        if self.bundles_at is not None:
            return self.bundles_at
        return self.formed_at, self.formed_at + CHURN_WINDOW_MS + self.churn_down_ms[1]

    @property
    def low_mark(self) -> int | None:
        """The dial target given to every node's core (None: the core's default)."""
        if self.dial_target is not None:
            return self.dial_target
        if self.admission == "legacy":
            return max(1, self.max_links // 2)
        return None
