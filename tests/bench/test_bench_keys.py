"""The keys benchmark does real work: a quick ``python -m bench keys --json --quick`` (in a
process of its own, as SoftHSM2 reads its configuration once a process) makes its own
token and swtpm and reports every figure with its anchor; its quotes are distinct, pass
``verify_quote`` under the policy built from them, and a forged one fails both the
subject and the anchor."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature

from bench import keys as keys_bench
from trustmesh.tpm.device import TpmDevice
from trustmesh.tpm.swtpm import Swtpm
from trustmesh.tpm.verify import QuoteRejected

ROOT = Path(__file__).resolve().parents[2]


def test_quick_run_reports_every_figure_with_its_anchor() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench", "keys", "--json", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    report = json.loads(out)
    assert report["bench"] == "keys"
    results = report["results"]
    assert [r["metric"] for r in results] == [
        "pkcs11_sign_per_s",
        "pkcs11_secp256k1_sign_per_s",
        "tpm_sign_per_s",
        "quote_verify_per_s",
        "tpm_quote_per_s",
    ]
    for result in results:
        assert set(result) == {"metric", "value", "unit", "anchor", "anchor_value", "ratio"}
        assert result["value"] > 0
        assert result["anchor_value"] > 0
        assert result["anchor"]
        assert math.isfinite(result["ratio"]) and result["ratio"] > 0


def test_quotes_verify_under_their_policy_and_a_forged_one_fails_both_sides(
    make_swtpm: Callable[[], Swtpm],
) -> None:
    with TpmDevice.open(make_swtpm().tcti) as device:
        quotes = keys_bench.make_quotes(device, 3)
    assert len({e.quote for e in quotes.evidence}) == 3
    assert quotes.policy.pcrs == keys_bench.PCRS
    keys_bench.verifying(quotes)()  # every quote checked once, then one timed call
    keys_bench.raw_verifying(quotes)()

    first = quotes.evidence[0]
    flipped = first.quote[:-1] + bytes([first.quote[-1] ^ 1])
    forged = dataclasses.replace(
        quotes,
        evidence=(dataclasses.replace(first, quote=flipped), *quotes.evidence[1:]),
        raw=((quotes.raw[0][0], quotes.raw[0][1], flipped), *quotes.raw[1:]),
    )
    with pytest.raises(QuoteRejected):
        keys_bench.verifying(forged)
    with pytest.raises(InvalidSignature):
        keys_bench.raw_verifying(forged)
