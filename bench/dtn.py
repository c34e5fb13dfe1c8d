"""DTN bundles: the durable bundle store, the BPv7 codec, and admitting a peer's bundle.

- bundles_persisted_per_s: bundles kept durably per second by
  :class:`trustmesh.bundle.store.BundleStore` (``durable=True``: WAL, ``synchronous=FULL``),
  one ``add`` per bundle, each its own transaction (as a node keeps a bundle before it
  acknowledges custody). The rows are real: 1 KiB payloads from one origin, made and
  signed by :class:`trustmesh.mesh.bundle_codec.MeshBundleCodec` and admitted by another
  node's codec (so each row holds the bytes the node stores, hop count counted), each
  bundle distinct. Anchor: raw SQLite inserts of the same bytes with the same durability:
  a plain table ``(bundle_id TEXT PRIMARY KEY, data BLOB)``, WAL, ``synchronous=FULL``,
  one autocommitted ``INSERT`` per row, the same ids and data. Goal: >= 0.7.
- bundle_encode_decode_per_s: ``Bundle.encode()`` then ``decode_bundle`` (strict, every
  CRC checked) of one bundle: a primary block, a hop count block and a 1 KiB payload
  block, CRC-32C on every block. Anchor: pyd3tn (the µD3TN project's independent BPv7
  implementation): ``bytes(bundle)`` then ``Bundle.parse`` of the same bundle (the two
  encodings are checked to be the same bytes). pyd3tn's parse reads the CRCs but does not
  check them, so the anchor does less than ours. Report only.
- bundle_admit_per_s: ``MeshBundleCodec.admit`` of the same signed 1 KiB bundles (strict
  decode, destination and lifetime, the source signature block, the signer's chain against
  the trust view (whose chain cache was warmed before the timing, as a running node's is),
  the P-256 ECDSA signature, the hop counted and the bundle re-encoded). Anchor:
  ``EllipticCurvePublicKey.verify`` (cryptography, ECDSA with SHA-256) of the same
  signatures over the same signing inputs. Report only.

Subject and anchor run in alternating rounds, anchor first; the ratio is the median of
per-round ratios.
Each store round writes a fresh database file (the store's and the anchor's in the same
temporary directory, so on the same filesystem) and removes it after, so both always
write the same number of rows into an empty table; one untimed round of each comes first.
"""

from __future__ import annotations

import itertools
import os
import sqlite3
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pyd3tn import bundle7  # type: ignore[import-untyped]

from bench.harness import Result, compare, compare_rates
from trustmesh.api.ca_client import make_csr
from trustmesh.bundle.bib import read_signature, signing_input
from trustmesh.bundle.codec import (
    BlockFlag,
    Bundle,
    CreationTimestamp,
    HopCount,
    decode_bundle,
    hop_count_block,
)
from trustmesh.bundle.eid import inbox, node_eid
from trustmesh.bundle.ids import unix_ms_to_dtn_ms
from trustmesh.bundle.store import BundleStore, StoredBundle
from trustmesh.crypto.keys import KeyKind, PrivateKey
from trustmesh.mesh.bundle_codec import MAX_WIRE_BUNDLE, MeshBundleCodec
from trustmesh.mesh.trust import TrustView
from trustmesh.pki.ca import CertificateAuthority

DER = serialization.Encoding.DER
ORIGIN = "node-a"
RECEIVER = "node-b"
PAYLOAD_SIZE = 1024
LIFETIME_MS = 3_600_000
HOP_LIMIT = 32

ROWS = 1000  # bundles per store round
ROUNDS = 7
QUICK_ROWS = 200
QUICK_ROUNDS = 3
MIN_TIME = 0.2  # seconds per codec or admit round
QUICK_MIN_TIME = 0.05
ADMIT_BUNDLES = 100  # bundles per admit call of the subject and anchor

ANCHOR_TABLE = "CREATE TABLE bundles (bundle_id TEXT PRIMARY KEY, data BLOB NOT NULL)"


class BenchFailure(RuntimeError):
    """A measurement that did not do the work the benchmark asked for."""


# --- the load ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DtnLoad:
    """Bundles from ``ORIGIN`` to ``RECEIVER``, made and signed before the timing."""

    receiver: MeshBundleCodec  # admits with a trust view that knows the origin's chain
    now_ms: int
    signed: list[bytes]  # as the origin sends them: signed, hop count 0
    rows: list[StoredBundle]  # as the receiver keeps them for forwarding: admitted
    public_key: ec.EllipticCurvePublicKey
    signatures: list[tuple[bytes, bytes]]  # each bundle's signature and signing input


def dtn_load(workdir: Path, count: int) -> DtnLoad:
    """A real CA, an origin with a P-256 key and a CA-issued certificate, and ``count``
    distinct bundles it made (1 KiB payloads, each signed with its chain), admitted by
    the receiver's codec."""
    with CertificateAuthority.init(workdir / "ca", None, name="bench dtn") as ca:
        key = PrivateKey.generate(KeyKind.P256)
        leaf = ca.issue(x509.load_pem_x509_csr(make_csr(key, ORIGIN).encode()), ORIGIN)
        chain = (leaf.public_bytes(DER), ca.issuing_cert.public_bytes(DER))
        trust = TrustView(roots=[ca.root_cert], issuers=[ca.issuing_cert])
    public_key = leaf.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise BenchFailure("the origin's certificate does not hold its P-256 key")
    now = int(time.time() * 1000)
    trust.identity(chain, now_ms=now)  # a running node has verified a known origin's chain
    origin = MeshBundleCodec(ORIGIN, trust, key.sign, lambda: chain)

    def no_signing(data: bytes) -> bytes:
        raise BenchFailure("the receiver signs nothing here")

    receiver = MeshBundleCodec(RECEIVER, trust, no_signing, tuple)  # admit: trust only
    signed, rows, signatures = [], [], []
    for i in range(count):
        (bundle,) = origin.make(inbox(RECEIVER), os.urandom(PAYLOAD_SIZE), LIFETIME_MS, now)
        raw = bundle.encode()
        signature = read_signature(bundle)
        signatures.append(
            (
                signature.signature,
                signing_input(bundle, signature.block.number, signature.block.flags),
            )
        )
        admitted = receiver.admit(raw, now)
        signed.append(raw)
        rows.append(
            StoredBundle(
                admitted.bundle_id,
                "forwarding",
                admitted.source,
                admitted.signer,
                admitted.destination,
                admitted.created_ms,
                admitted.expires_ms,
                1,
                now + i,
                admitted.data,
            )
        )
    if len({row.bundle_id for row in rows}) != count:
        raise BenchFailure("two bundles share an id")
    return DtnLoad(receiver, now, signed, rows, public_key, signatures)


# --- bundles_persisted_per_s ---------------------------------------------------------------

_files = itertools.count()


def _remove_database(path: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def store_round(directory: Path, rows: list[StoredBundle]) -> float:
    """Every row into a fresh durable BundleStore, one ``add`` (one transaction) each;
    bundles per second."""
    path = directory / f"store-{next(_files)}.db"
    store = BundleStore(path)
    try:
        add = store.add
        start = time.perf_counter()
        for row in rows:
            if not add(row):
                raise BenchFailure(f"the store refused {row.bundle_id} as a duplicate")
        elapsed = time.perf_counter() - start
        held = store.count("forwarding")
    finally:
        store.close()
        _remove_database(path)
    if held != len(rows):
        raise BenchFailure(f"the store holds {held} of {len(rows)} bundles")
    return len(rows) / elapsed


def sqlite_round(directory: Path, rows: list[StoredBundle]) -> float:
    """The anchor: the same ids and bytes into a fresh plain table, WAL,
    ``synchronous=FULL``, one autocommitted INSERT (one transaction) each; rows per
    second."""
    path = directory / f"sqlite-{next(_files)}.db"
    pairs = [(row.bundle_id, row.data) for row in rows]
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute(ANCHOR_TABLE)
        execute = db.execute
        start = time.perf_counter()
        for pair in pairs:
            execute("INSERT INTO bundles VALUES (?, ?)", pair)
        elapsed = time.perf_counter() - start
        (held,) = db.execute("SELECT count(*) FROM bundles").fetchone()
    finally:
        db.close()
        _remove_database(path)
    if held != len(rows):
        raise BenchFailure(f"the anchor table holds {held} of {len(rows)} rows")
    return len(rows) / elapsed


def _persisted(load: DtnLoad, rows: int, rounds: int) -> Result:
    batch = load.rows[:rows]
    with tempfile.TemporaryDirectory(prefix="bench-dtn-") as tmp:
        directory = Path(tmp)
        warm = batch[: max(1, rows // 10)]
        sqlite_round(directory, warm)
        store_round(directory, warm)
        comparison = compare_rates(
            lambda: store_round(directory, batch),
            lambda: sqlite_round(directory, batch),
            rounds=rounds,
        )
    return Result.of(
        "bundles_persisted_per_s",
        comparison,
        "bundle/s",
        "raw SQLite inserts, same bytes, WAL + synchronous=FULL, 1 row per transaction",
    )


# --- bundle_encode_decode_per_s -------------------------------------------------------------


def codec_pair(payload: bytes) -> tuple[Bundle, Any]:
    """The same bundle built by us and by pyd3tn: a primary block, a hop count block and
    the payload block, CRC-32C on each; their encodings are checked to be equal."""
    unix_s = int(time.time())
    ours = Bundle.build(
        source=node_eid(ORIGIN),
        destination=inbox(RECEIVER),
        payload=payload,
        creation=CreationTimestamp(unix_ms_to_dtn_ms(unix_s * 1000), 7),
        lifetime_ms=LIFETIME_MS,
        extensions=(hop_count_block(HopCount(HOP_LIMIT), number=2, flags=BlockFlag.REPLICATE),),
    )
    crc = bundle7.CRCType.CRC32  # CRC-32C (Castagnoli), as its crc32_c says
    theirs = bundle7.Bundle(
        [
            bundle7.PrimaryBlock(
                crc_type=crc,
                destination=str(inbox(RECEIVER)),
                source=str(node_eid(ORIGIN)),
                report_to=None,
                creation_time=bundle7.CreationTimestamp(unix_s, 7),
                lifetime=LIFETIME_MS,
            ),
            bundle7.HopCountBlock(
                HOP_LIMIT,
                0,
                block_number=2,
                block_proc_flags=bundle7.BlockProcFlag.MUST_BE_REPLICATED,
                crc_type=crc,
            ),
            bundle7.PayloadBlock(payload, crc_type=crc),
        ]
    )
    if bytes(theirs) != ours.encode():
        raise BenchFailure("pyd3tn's encoding of the bundle differs from ours")
    return ours, theirs


def _encode_decode(rounds: int, min_time: float) -> Result:
    ours, theirs = codec_pair(os.urandom(PAYLOAD_SIZE))
    if decode_bundle(ours.encode(), max_size=MAX_WIRE_BUNDLE) != ours:
        raise BenchFailure("our bundle does not decode to itself")
    parsed = bundle7.Bundle.parse(bytes(theirs))
    if parsed.payload_block.data != ours.payload or bytes(parsed) != ours.encode():
        raise BenchFailure("pyd3tn does not parse its bundle back")
    parse = bundle7.Bundle.parse

    def subject() -> None:
        decode_bundle(ours.encode(), max_size=MAX_WIRE_BUNDLE)

    def anchor() -> None:
        parse(bytes(theirs))

    comparison = compare(subject, anchor, work=1, rounds=rounds, min_time=min_time)
    return Result.of(
        "bundle_encode_decode_per_s",
        comparison,
        "bundle/s",
        "pyd3tn bytes(Bundle) + Bundle.parse, same bundle",
    )


# --- bundle_admit_per_s ----------------------------------------------------------------------


def admit_all(load: DtnLoad, signed: list[bytes]) -> None:
    admit, now = load.receiver.admit, load.now_ms
    for raw in signed:
        admit(raw, now)  # raises on a bundle it refuses


def verify_all(load: DtnLoad, signatures: list[tuple[bytes, bytes]]) -> None:
    verify, algorithm = load.public_key.verify, ec.ECDSA(hashes.SHA256())
    for signature, data in signatures:
        verify(signature, data, algorithm)  # raises InvalidSignature on a bad one


def _admit(load: DtnLoad, rounds: int, min_time: float) -> Result:
    signed, signatures = load.signed[:ADMIT_BUNDLES], load.signatures[:ADMIT_BUNDLES]
    comparison = compare(
        lambda: admit_all(load, signed),
        lambda: verify_all(load, signatures),
        work=len(signed),
        rounds=rounds,
        min_time=min_time,
    )
    return Result.of(
        "bundle_admit_per_s",
        comparison,
        "bundle/s",
        "P-256 ECDSA verify alone (cryptography), same signatures and inputs",
    )


def run(*, quick: bool = False) -> list[Result]:
    rows = QUICK_ROWS if quick else ROWS
    rounds = QUICK_ROUNDS if quick else ROUNDS
    min_time = QUICK_MIN_TIME if quick else MIN_TIME
    with tempfile.TemporaryDirectory(prefix="bench-dtn-ca-") as tmp:
        load = dtn_load(Path(tmp), max(rows, ADMIT_BUNDLES))
    return [
        _persisted(load, rows, rounds),
        _encode_decode(rounds, min_time),
        _admit(load, rounds, min_time),
    ]
