"""The quote evidence's JSON parser under hostile input: every document is evidence or
an EvidenceError (a DecodeError), never ValueError, KeyError or TypeError."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trustmesh.tpm.evidence import EvidenceError, QuoteEvidence

GOOD = QuoteEvidence(b"q", b"s", b"a", {0: bytes(32), 7: b"\x01" * 32}, b"ek", b"c")

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=8,
)


def test_evidence_round_trips() -> None:
    assert QuoteEvidence.from_bytes(GOOD.to_bytes()) == GOOD


@pytest.mark.parametrize("index", ["²", "٣", "07x", "-1", "24", "", " 1", "1.0"])
def test_pcr_indices_other_than_ascii_0_to_23_are_refused(index: str) -> None:
    document = GOOD.to_json()
    document["pcrs"] = {"sha256": {index: "00" * 32}}
    with pytest.raises(EvidenceError):
        QuoteEvidence.from_json(document)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_are_evidence_or_an_evidence_error(raw: bytes) -> None:
    with contextlib.suppress(EvidenceError):
        QuoteEvidence.from_bytes(raw)


@settings(max_examples=400, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["quote", "signature", "ak_public", "pcrs", "ek_certificate", "x"]),
        _json_values,
    ),
    st.dictionaries(st.text(max_size=3), _json_values, max_size=4),
)
def test_any_document_is_evidence_or_an_evidence_error(
    document: dict[str, object], bank: dict[str, object]
) -> None:
    for candidate in (document, {**GOOD.to_json(), "pcrs": {"sha256": bank}}):
        with contextlib.suppress(EvidenceError):
            QuoteEvidence.from_bytes(json.dumps(candidate).encode())
