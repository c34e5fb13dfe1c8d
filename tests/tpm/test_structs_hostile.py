"""Hostile bytes into the TPM structure parsers: every input parses (and then marshals
back to itself) or fails with a typed DecodeError; nothing else escapes, nothing hangs.

The vectors are real: an swtpm made them with tpm2-tools 5.4 (tpm2_createek -G rsa/ecc,
tpm2_createak -G ecc -g sha256 -s ecdsa, tpm2_quote -l sha256:0..7 -q 0102030405 over
PCRs that were all zero).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trustmesh.errors import (
    DecodeError,
    InvalidKeyError,
    OversizeError,
    TrailingDataError,
    TruncatedError,
    UnsupportedError,
)
from trustmesh.tpm import structs
from trustmesh.tpm.evidence import QuoteEvidence
from trustmesh.tpm.verify import QuoteRejected, verify_quote

AK_PUBLIC = bytes.fromhex(
    "00580023000b00050072000000100018000b000300100020b65377a2a24983278f1f192ad4a954311fd1"
    "87e3a3de48eb4712ffd4435aecce00209ea579332ff1486d3d64ae0c7429f2062e56dfa5cba5aecde239"
    "a0fe457dd490"
)
AK_NAME = bytes.fromhex("000b5c3846816a1f0a13f87516d15e14a2448ed7430d8ff08aeb84efcccb628340f5")
QUOTE = bytes.fromhex(
    "ff54434780180022000b2a63628e3d6fdd2822330b5dc88e72f766233e6087cf695cdf7823c359912598"
    "0005010203040500000000000018bf000000020000000001201910230016363600000001000b03ff0000"
    "00205341e6b2646979a70e57653007a1f310169421ec9bdd9f1a5648f75ade005af1"
)
QUALIFYING = bytes.fromhex("0102030405")
SIGNATURE = bytes.fromhex(
    "0018000b0020b1691c1dbdbc39f896ab7042b53840d75662b0851b6f290e6ad54e48c9a5e535002094a1"
    "1ea9ef0a4b9e377ad40847cdba38ce8b3ca3a039f24fc228ba95427f2ffa"
)
EK_RSA_PUBLIC = bytes.fromhex(
    "013a0001000b000300b20020837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b3314"
    "69aa000600800043001008000000000001009a3d343d360427b0c6c9968c66eaf1aac6f06a6f8d17eb72"
    "2e4bffab6d1b61383d1cc0f7883f025dac77053060f81fdbf5a620dffac0e5589aa002c3d8e1daf73b11"
    "586186256735e1a4d2e424b002094a10b236cae0838c176daed3e330c1ade357efae182567f02463022e"
    "68aa8ef50e50f5998b22769a30f165571c2243bd1805e07a4a9ccf2cd8c737f667358df796eb42386bb7"
    "494bef64faebff26986af0b3a80c9e3dd97e8d8474f75c770c812d24aa499480580935ab4faf0eb99f89"
    "451c75ce5af8579247f35f15056596f800f2864c37c8e8406b9a26fdec8bf1e778bb94ed3e56a0b2ec7e"
    "9800982d2a1a73f7bfc343114161d201220fd1c19081"
)
EK_ECC_PUBLIC = bytes.fromhex(
    "007a0023000b000300b20020837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b3314"
    "69aa000600800043001000030010002089b93a13e5a3597c3a4e00bbd43d0afb3d4dd0e0c7e09a997451"
    "b5d1683086db002052bc9e410961c6a5aab517660a782828001e6fb49ad070f505f6e68e3052b743"
)
ZERO_PCRS = {i: bytes(32) for i in range(8)}

Parser = Callable[[bytes], object]

# (parser, marshaller, a real input)
PARSERS: dict[str, tuple[Parser, Callable[..., bytes], bytes]] = {
    "TPM2B_PUBLIC ak": (structs.parse_public, structs.marshal_public, AK_PUBLIC),
    "TPM2B_PUBLIC ek rsa": (structs.parse_public, structs.marshal_public, EK_RSA_PUBLIC),
    "TPM2B_PUBLIC ek ecc": (structs.parse_public, structs.marshal_public, EK_ECC_PUBLIC),
    "TPMT_PUBLIC": (structs.parse_tpmt_public, structs.marshal_tpmt_public, AK_PUBLIC[2:]),
    "TPMS_ATTEST": (structs.parse_attest, structs.marshal_attest, QUOTE),
    "TPMT_SIGNATURE": (structs.parse_signature, structs.marshal_signature, SIGNATURE),
    "TPML_PCR_SELECTION": (
        structs.parse_pcr_selection,
        structs.marshal_pcr_selection,
        bytes.fromhex("00000001000b03ff0000"),
    ),
}


def _parse_or_typed_error(name: str, data: bytes) -> None:
    parse, marshal, _ = PARSERS[name]
    try:
        value = parse(data)
    except DecodeError:
        return
    # Strict means exact: what parsed marshals back to the very same bytes.
    assert marshal(value) == data


def test_the_real_structures_parse_and_marshal_back() -> None:
    for name, (parse, marshal, data) in PARSERS.items():
        assert marshal(parse(data)) == data, name
    ak = structs.parse_public(AK_PUBLIC)
    assert ak.name == AK_NAME == structs.name_of(AK_PUBLIC[2:])
    assert ak.has(structs.TPMA_OBJECT_RESTRICTED | structs.TPMA_OBJECT_SIGN)
    attest = structs.parse_attest(QUOTE)
    assert attest.magic == structs.TPM_GENERATED_VALUE
    assert attest.type == structs.TPM_ST_ATTEST_QUOTE
    assert attest.extra_data == QUALIFYING
    assert attest.quote.pcr_select[0].indices == tuple(range(8))
    assert attest.quote.pcr_digest == hashlib.sha256(bytes(32 * 8)).digest()
    ek = structs.parse_public(EK_RSA_PUBLIC)
    assert isinstance(ek.parameters, structs.RsaParms)
    assert ek.parameters.symmetric == structs.SymDef(structs.TPM_ALG_AES, 128, structs.TPM_ALG_CFB)
    assert structs.public_key_of(EK_RSA_PUBLIC).key_size == 2048
    assert structs.public_key_of(EK_ECC_PUBLIC).key_size == 256


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_every_truncation_of_a_real_structure_is_a_truncated_error(name: str) -> None:
    parse, _, data = PARSERS[name]
    for end in range(len(data)):
        with pytest.raises(TruncatedError) as caught:
            parse(data[:end])
        assert caught.value.offset is not None and caught.value.offset <= end


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_trailing_bytes_after_a_real_structure_are_refused(name: str) -> None:
    parse, _, data = PARSERS[name]
    with pytest.raises(TrailingDataError) as caught:
        parse(data + b"\x00")
    assert caught.value.offset == len(data)


def test_trailing_bytes_inside_the_public_area_are_refused() -> None:
    # The TPM2B size covers one byte more than the TPMT_PUBLIC needs.
    grown = (len(AK_PUBLIC) - 1).to_bytes(2, "big") + AK_PUBLIC[2:] + b"\x00"
    with pytest.raises(TrailingDataError, match="publicArea"):
        structs.parse_public(grown)


def test_refusals_name_what_was_wrong() -> None:
    with pytest.raises(UnsupportedError, match="0x8017"):
        structs.parse_attest(QUOTE[:4] + b"\x80\x17" + QUOTE[6:])
    with pytest.raises(structs.TpmFormatError, match="magic"):
        structs.parse_attest(b"\xff\x54\x43\x48" + QUOTE[4:])
    with pytest.raises(UnsupportedError, match="signature algorithm 0x0010"):
        structs.parse_signature(b"\x00\x10" + SIGNATURE[2:])
    with pytest.raises(OversizeError, match="qualifiedSigner"):
        structs.parse_attest(QUOTE[:6] + b"\xff\xff" + QUOTE[8:])
    with pytest.raises(structs.TpmFormatError, match="empty"):
        structs.parse_public(b"\x00\x00")
    with pytest.raises(UnsupportedError, match="key type 0x0008"):
        structs.parse_tpmt_public(b"\x00\x08" + AK_PUBLIC[4:])
    # magic, type, qualifiedSigner (34), extraData (5), clock, resetCount, restartCount
    safe_at = 4 + 2 + (2 + 34) + (2 + 5) + 8 + 4 + 4
    with pytest.raises(structs.TpmFormatError, match="safe"):
        structs.parse_attest(QUOTE[:safe_at] + b"\x02" + QUOTE[safe_at + 1 :])


def test_a_point_off_the_curve_is_an_invalid_key() -> None:
    ak = structs.parse_public(AK_PUBLIC)
    assert isinstance(ak.unique, structs.EccPoint)
    bent = dataclasses.replace(ak, unique=structs.EccPoint(ak.unique.x, bytes(32)))
    with pytest.raises(InvalidKeyError):
        structs.public_key_of(bent)


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(sorted(PARSERS)), data=st.binary(max_size=700))
def test_any_bytes_parse_exactly_or_raise_a_decode_error(name: str, data: bytes) -> None:
    _parse_or_typed_error(name, data)


@settings(max_examples=400, deadline=None)
@given(
    name=st.sampled_from(sorted(PARSERS)),
    edits=st.lists(st.tuples(st.integers(0, 1000), st.integers(0, 255)), min_size=1, max_size=4),
    cut=st.integers(0, 1000),
)
def test_mutated_real_structures_parse_exactly_or_raise_a_decode_error(
    name: str, edits: list[tuple[int, int]], cut: int
) -> None:
    data = bytearray(PARSERS[name][2])
    for at, value in edits:
        data[at % len(data)] = value
    _parse_or_typed_error(name, bytes(data))
    _parse_or_typed_error(name, bytes(data) + bytes(data)[: cut % 8])


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=300), edits=st.lists(st.integers(0, 2000), max_size=3))
def test_names_and_keys_of_hostile_public_areas_are_typed(data: bytes, edits: list[int]) -> None:
    # Start from a real key now and then, so keys that nearly parse are tried too.
    if edits:
        raw = bytearray(EK_ECC_PUBLIC if edits[0] % 2 else AK_PUBLIC)
        for at in edits:
            raw[at % len(raw)] ^= 1 << (at % 8)
        data = bytes(raw)
    with contextlib.suppress(DecodeError):
        structs.name_of(data[2:])
    with contextlib.suppress(DecodeError, InvalidKeyError):
        structs.public_key_of(data)


@settings(max_examples=300, deadline=None)
@given(
    part=st.sampled_from(["quote", "signature", "ak_public"]),
    edits=st.lists(st.tuples(st.integers(0, 1000), st.integers(0, 255)), min_size=1, max_size=3),
)
def test_a_mutated_quote_is_rejected_with_a_reason_never_a_crash(
    part: str, edits: list[tuple[int, int]]
) -> None:
    fields = {"quote": QUOTE, "signature": SIGNATURE, "ak_public": AK_PUBLIC}
    raw = bytearray(fields[part])
    for at, value in edits:
        raw[at % len(raw)] = value
    fields[part] = bytes(raw)
    evidence = QuoteEvidence(fields["quote"], fields["signature"], fields["ak_public"], ZERO_PCRS)
    try:
        claims = verify_quote(evidence, QUALIFYING)
    except QuoteRejected:
        return
    # Only the AK's unsigned parts (e.g. stClear or noDA) can change and still verify;
    # its name, which MakeCredential binds, then changes with them.
    assert evidence.quote == QUOTE and evidence.signature == SIGNATURE
    assert (claims.ak_name == AK_NAME) == (evidence.ak_public == AK_PUBLIC)


def test_the_real_vector_verifies() -> None:
    evidence = QuoteEvidence(QUOTE, SIGNATURE, AK_PUBLIC, ZERO_PCRS)
    claims = verify_quote(evidence, QUALIFYING)
    assert claims.ak_name == AK_NAME
    assert claims.pcr_selection == tuple(range(8))
