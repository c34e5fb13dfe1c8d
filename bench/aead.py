"""Record-layer seal+open throughput against bare ``AESGCM`` calls.

Goal: ratio >= 0.8 at 64 KiB.
"""

from __future__ import annotations

import os

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bench.harness import Result, compare
from trustmesh.crypto.aead import RecordOpener, RecordSealer

SIZES = {"1KiB": 1024, "64KiB": 64 * 1024}
MIB = 1024 * 1024


def run() -> list[Result]:
    key = os.urandom(32)
    results = []
    for label, size in SIZES.items():
        payload = os.urandom(size)
        sealer, opener = RecordSealer(key), RecordOpener(key)
        bare = AESGCM(key)
        nonce = bytes(12)

        def records(p: bytes = payload, s: RecordSealer = sealer, o: RecordOpener = opener) -> None:
            o.open(s.seal(p))

        def anchor(p: bytes = payload, a: AESGCM = bare, n: bytes = nonce) -> None:
            a.decrypt(n, a.encrypt(n, p, None), None)

        comparison = compare(records, anchor, work=size / MIB)
        results.append(
            Result.of(f"seal+open {label}", comparison, "MiB/s", "bare AESGCM encrypt+decrypt")
        )
    return results
