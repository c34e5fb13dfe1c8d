"""BPv7 bundles (RFC 9171): byte-exact vectors, strict decoding, endpoint and bundle IDs,
and a typed error for every bad input."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from crc32c import crc32c

from trustmesh.bundle.codec import (
    KNOWN_BLOCK_TYPES,
    BlockFlag,
    BlockType,
    Bundle,
    BundleFlag,
    CanonicalBlock,
    CrcType,
    CreationTimestamp,
    HopCount,
    PrimaryBlock,
    bundle_age_block,
    decode_bundle,
    hop_count_block,
    payload_block,
    previous_node_block,
    read_bundle_age,
    read_hop_count,
    read_previous_node,
)
from trustmesh.bundle.eid import (
    BROADCAST,
    MAX_EID_TEXT,
    NODE_ID,
    NULL_EID,
    Eid,
    Scheme,
    inbox,
    is_broadcast,
    node_eid,
)
from trustmesh.bundle.errors import (
    BadBundleIdError,
    BadEidError,
    BundleError,
    BundleTooLargeError,
    CrcMismatchError,
    FragmentError,
    InvalidBundleError,
    MalformedBundleError,
    UnknownCriticalBlockError,
)
from trustmesh.bundle.ids import (
    DTN_EPOCH_UNIX_MS,
    BundleId,
    dtn_ms_to_unix_ms,
    unix_ms_to_dtn_ms,
)
from trustmesh.errors import DecodeError, OversizeError, ProtocolError
from trustmesh.pki.ca import NODE_ID as PKI_NODE_ID

MAX = 1 << 20
A, B = Eid.parse("dtn://a/"), Eid.parse("dtn://b/inbox")

# The bundle of test_a_minimal_bundle_is_laid_out_as_rfc_9171_says, byte by byte.
PRIMARY_ZEROED = bytes.fromhex(
    "89"  # array of 9: not a fragment, with a CRC
    "07"  # version 7
    "00"  # bundle processing control flags
    "02"  # CRC type 2, CRC-32C
    "8201" "69" "2f2f622f696e626f78"  # destination [1, "//b/inbox"]
    "8201" "64" "2f2f612f"  # source [1, "//a/"]
    "820100"  # report-to [1, 0]: dtn:none
    "82" "192710" "01"  # creation timestamp [10000, 1]
    "1a0036ee80"  # lifetime 3,600,000 ms
    "44" "00000000"  # the CRC, zeroed while it is computed
)  # fmt: skip
PAYLOAD_ZEROED = bytes.fromhex(
    "86"  # array of 6: with a CRC
    "01" "01" "00" "02"  # type 1 (payload), number 1, flags 0, CRC type 2
    "45" "68656c6c6f"  # data: the byte string "hello"
    "44" "00000000"  # the CRC, zeroed
)  # fmt: skip
PRIMARY_CRC, PAYLOAD_CRC = "0f288130", "21c13f2f"
MINIMAL = bytes.fromhex(
    "9f"
    + PRIMARY_ZEROED.hex()[:-8] + PRIMARY_CRC
    + PAYLOAD_ZEROED.hex()[:-8] + PAYLOAD_CRC
    + "ff"
)  # fmt: skip


def minimal(**changes: object) -> Bundle:
    fields: dict[str, object] = {
        "source": A,
        "destination": B,
        "payload": b"hello",
        "creation": CreationTimestamp(10000, 1),
        "lifetime_ms": 3_600_000,
    }
    fields.update(changes)
    return Bundle.build(**fields)  # type: ignore[arg-type]


# --- byte-exact vectors ---------------------------------------------------------------


def test_the_hand_made_crcs_are_crc32c_of_the_zeroed_blocks() -> None:
    assert f"{crc32c(PRIMARY_ZEROED):08x}" == PRIMARY_CRC
    assert f"{crc32c(PAYLOAD_ZEROED):08x}" == PAYLOAD_CRC
    assert f"{crc32c(b'123456789'):08x}" == "e3069283"  # the CRC-32C check value


def test_a_minimal_bundle_is_laid_out_as_rfc_9171_says() -> None:
    bundle = minimal()
    assert bundle.encode() == MINIMAL
    assert bundle.encoded_size() == len(MINIMAL)
    decoded = decode_bundle(MINIMAL, max_size=MAX)
    assert decoded == bundle
    assert decoded.primary.crc_type is CrcType.CRC32C
    assert decoded.payload == b"hello"
    assert decoded.primary.report_to == NULL_EID


def _x25(data: bytes) -> int:
    """CRC-16/X.25 bit by bit, as the ITU-T defines it: independent of the codec's."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x8408 if crc & 1 else crc >> 1
    return crc ^ 0xFFFF


def test_crc16_and_no_crc_are_laid_out_too() -> None:
    assert _x25(b"123456789") == 0x906E  # the CRC-16/X.25 check value
    primary = PRIMARY_ZEROED[:3] + b"\x01" + PRIMARY_ZEROED[4:-5] + b"\x42\x00\x00"
    payload = PAYLOAD_ZEROED[:4] + b"\x01" + PAYLOAD_ZEROED[5:-5] + b"\x42\x00\x00"
    expected = b"".join(
        (
            b"\x9f",
            primary[:-2] + _x25(primary).to_bytes(2, "big"),
            payload[:-2] + _x25(payload).to_bytes(2, "big"),
            b"\xff",
        )
    )
    assert expected.hex().endswith("94f886010100014568656c6c6f424bf3ff")
    bundle = minimal(crc_type=CrcType.CRC16)
    assert bundle.encode() == expected
    assert decode_bundle(expected, max_size=MAX) == bundle

    bare = minimal(crc_type=CrcType.NONE)
    no_crc = b"\x9f\x88" + PRIMARY_ZEROED[1:3] + b"\x00" + PRIMARY_ZEROED[4:-5]
    no_crc += b"\x85\x01\x01\x00\x00\x45hello\xff"
    assert bare.encode() == no_crc
    assert decode_bundle(no_crc, max_size=MAX) == bare


# RFC 9173 (BPSec default security contexts) Appendix A: bundles with ipn EIDs, no CRCs,
# creation time 0, and BIB (11), BCB (12) and bundle age (7) blocks.
RFC9173 = {
    "A.1.1.3 original": (
        "9f88070000820282010282028202018202820201820018281a000f424085010100"
        "005823526561647920746f2067656e657261746520612033322d6279746520706179"
        "6c6f6164ff"
    ),
    "A.1.4 with a BIB": (
        "9f88070000820282010282028202018202820201820018281a000f4240850b0200"
        "005856810101018202820201828201078203008181820158403bdc69b3a34a2b5d3a"
        "8554368bd1e808f606219d2a10a846eae3886ae4ecc83c4ee550fdfb1cc636b904e2"
        "f1a73e303dcd4b6ccece003e95e8164dcc89a156e185010100005823526561647920"
        "746f2067656e657261746520612033322d62797465207061796c6f6164ff"
    ),
    "A.3.1 with a bundle age": (
        "9f88070000820282010282028202018202820201820018281a000f424085070200"
        "004319012c85010100005823526561647920746f2067656e65726174652061203332"
        "2d62797465207061796c6f6164ff"
    ),
    "A.3.4 BIB, BCB and bundle age": (
        "9f88070000820282010282028202018202820201820018281a000f4240850b0300"
        "00585c8200020101820282030082820105820300828182015820cac6ce8e4c5dae57"
        "988b757e49a6dd1431dc04763541b2845098265bc817241b81820158203ed614c0d9"
        "7f49b3633627779aa18a338d212bf3c92b97759d9739cd50725596850c0401005834"
        "8101020182028202018382014c5477656c7665313231323132820201820400818182"
        "0150efa4b5ac0108e3816c5606479801bc0485070200004319012c85010100005823"
        "3a09c1e63fe23a7f66a59c7303837241e070b02619fc59c5214a22f08cd70795e73e"
        "9aff"
    ),
    "A.4.5 BCB over a BIB": (
        "9f88070000820282010282028202018202820201820018281a000f4240850b0300"
        "005846438ed6208eb1c1ffb94d952175167df0902902064a2983910c4fb2340790bf"
        "420a7d1921d5bf7c4721e02ab87a93ab1e0b75cf62e4948727c8b5dae46ed2af0543"
        "9b88029191850c0201005849820301020182028202018382014c5477656c76653132"
        "313231328202038204078281820150220ffc45c8a901999ecc60991dd78b29818201"
        "50d2c51cb2481792dae8b21d848cede99b8501010000582390eab6457593379298a8"
        "724e16e61f837488e127212b59ac91f8a86287b7d07630a122ff"
    ),
}


@pytest.mark.parametrize("name", sorted(RFC9173))
def test_the_rfc_9173_example_bundles_decode_and_re_encode_byte_for_byte(name: str) -> None:
    raw = bytes.fromhex(RFC9173[name])
    bundle = decode_bundle(raw, max_size=MAX)
    assert bundle.encode() == raw
    primary = bundle.primary
    assert primary.destination == Eid.ipn(1, 2)
    assert primary.source == primary.report_to == Eid.parse("ipn:2.1")
    assert primary.creation == CreationTimestamp(0, 40)
    assert primary.lifetime == 1_000_000
    assert primary.crc_type is CrcType.NONE
    assert bundle.payload_block.number == 1


def test_the_rfc_9173_blocks_are_read() -> None:
    bundle = decode_bundle(bytes.fromhex(RFC9173["A.3.4 BIB, BCB and bundle age"]), max_size=MAX)
    layout = [(b.block_type, b.number, b.flags) for b in bundle.blocks]
    assert layout == [(11, 3, 0), (12, 4, BlockFlag.REPLICATE), (7, 2, 0), (1, 1, 0)]
    assert bundle.bundle_age == 300
    original = decode_bundle(bytes.fromhex(RFC9173["A.1.1.3 original"]), max_size=MAX)
    assert original.payload == b"Ready to generate a 32-byte payload"
    assert original.primary.expiry_ms is None  # creation time 0: unknown


# --- endpoint IDs ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "cbor"),
    [
        ("dtn:none", "820100"),
        ("dtn://node-a/inbox", "8201" "6e" + b"//node-a/inbox".hex()),  # 14 chars
        ("dtn://n/", "8201" "64" + b"//n/".hex()),
        ("dtn://~mesh/inbox", "8201" "6d" + b"//~mesh/inbox".hex()),  # 13 chars
        ("ipn:1.2", "8202" "82" "01" "02"),
        ("ipn:977000.1", "8202" "82" "1a000ee868" "01"),
        ("ipn:18446744073709551615.0", "8202" "82" "1bffffffffffffffff" "00"),
    ],
)  # fmt: skip
def test_eids_have_one_text_and_one_cbor_form(text: str, cbor: str) -> None:
    eid = Eid.parse(text)
    assert str(eid) == eid.text == text
    assert eid.to_cbor().hex() == cbor
    assert Eid.from_cbor(bytes.fromhex(cbor)) == eid


def test_eid_parts() -> None:
    eid = Eid.parse("dtn://node-a.example/app/sub")
    assert (eid.scheme, eid.node, eid.service) == (Scheme.DTN, "node-a.example", "app/sub")
    assert eid.is_singleton
    assert eid.node_id == Eid.parse("dtn://node-a.example/")
    assert Eid.parse("dtn://group/~all").is_singleton is False  # RFC 9171's '~' demux
    assert NULL_EID.is_null and not NULL_EID.is_singleton
    assert (NULL_EID.node, NULL_EID.service) == ("", "")
    ipn = Eid.parse("ipn:7.3")
    assert (ipn.node, ipn.service, ipn.is_singleton) == ("7", "3", True)
    assert ipn.node_id == Eid.ipn(7, 0)
    with pytest.raises(BadEidError):
        _ = NULL_EID.node_id


def test_inbox_broadcast_and_node_ids() -> None:
    assert inbox("node-a.example") == Eid.parse("dtn://node-a.example/inbox")
    assert node_eid("node-a") == Eid.dtn("node-a")
    assert str(BROADCAST) == "dtn://~mesh/inbox"
    assert is_broadcast(Eid.parse("dtn://~mesh/inbox"))
    assert not is_broadcast(inbox("mesh"))
    for bad in ("Node-A", "-a", "a_b", "", "~mesh", "a" * 254, "a..b"):
        with pytest.raises(BadEidError):
            inbox(bad)


def test_the_node_id_rule_is_the_pkis() -> None:
    assert PKI_NODE_ID.pattern == NODE_ID.pattern


@pytest.mark.parametrize(
    "text",
    [
        "",
        "dtn:",
        "dtn:None",
        "DTN://a/b",
        "dtn://a",  # no name delimiter
        "dtn:///b",  # empty node name
        "dtn://a b/c",
        "dtn://a/b c",  # a space is not VCHAR
        "dtn://a/\u00e9",
        "dtn://a~/b",
        "ipn:1",
        "ipn:01.2",  # a leading zero
        "ipn:1.2.3",
        "ipn:18446744073709551616.0",  # 2**64
        "ipn:-1.0",
        "http://a/b",
        "dtn://a/" + "x" * (MAX_EID_TEXT - 7),  # one character too long
    ],
)
def test_bad_eid_texts_are_refused(text: str) -> None:
    with pytest.raises(BadEidError):
        Eid.parse(text)


def test_the_longest_eid_is_accepted() -> None:
    text = "dtn://a/" + "x" * (MAX_EID_TEXT - 8)
    assert len(Eid.parse(text).text) == MAX_EID_TEXT


@pytest.mark.parametrize(
    "cbor",
    [
        "",
        "8101",  # one item
        "830100",  # three items
        "820101",  # dtn SSP 1 (only 0 means none)
        "8201" "4461626364",  # a byte string SSP
        "8201" "62" "2f2f",  # "//"
        "8201" "6a" "2f2f61" "2f" "c3a9" "6263" "64",  # non-ASCII in the demux
        "8203" "00",  # scheme 3
        "8202" "8101",  # an ipn SSP of one number
        "8202" "820120",  # a negative service number
        "8202" "82" "1801" "02",  # 1 not in its shortest form
        "9f0100ff",  # indefinite array
        "c2820100",  # a tag
        "820100" "00",  # a trailing byte
    ],
)  # fmt: skip
def test_bad_eid_cbor_is_refused(cbor: str) -> None:
    with pytest.raises(BadEidError):
        Eid.from_cbor(bytes.fromhex(cbor))


# --- bundle IDs and DTN time ----------------------------------------------------------


def test_bundle_ids_have_a_strict_text_form() -> None:
    bid = minimal().bundle_id
    assert bid == BundleId("a", 10000, 1)
    assert str(bid) == "a:10000:1"
    assert BundleId.parse("a:10000:1") == bid
    assert bid.source == Eid.parse("dtn://a/")
    fragment_id = BundleId.parse("node-a.example:799999999123:0:4096")
    assert fragment_id.fragment_offset == 4096 and fragment_id.is_fragment
    assert str(fragment_id) == "node-a.example:799999999123:0:4096"
    assert fragment_id.whole == BundleId("node-a.example", 799999999123, 0)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "a",
        "a:1",
        "a:1:2:3:4",
        ":1:2",
        "a:01:2",
        "a:1:-2",
        "a:1:2:",
        "a b:1:2",
        "a:18446744073709551616:0",
        "dtn://a/:1:2",
        "a:1:2\n",
    ],
)
def test_bad_bundle_id_texts_are_refused(text: str) -> None:
    with pytest.raises(BadBundleIdError):
        BundleId.parse(text)


def test_anonymous_and_ipn_bundles_have_no_bundle_id() -> None:
    anonymous = minimal(source=NULL_EID, flags=BundleFlag.MUST_NOT_FRAGMENT)
    with pytest.raises(BadBundleIdError):
        _ = anonymous.bundle_id
    with pytest.raises(BadBundleIdError):
        _ = minimal(source=Eid.ipn(2, 1)).bundle_id


def test_dtn_time_converts_to_and_from_unix_time() -> None:
    assert DTN_EPOCH_UNIX_MS == 946_684_800_000
    assert unix_ms_to_dtn_ms(1_700_000_000_000) == 753_315_200_000
    assert dtn_ms_to_unix_ms(753_315_200_000) == 1_700_000_000_000
    with pytest.raises(InvalidBundleError):
        dtn_ms_to_unix_ms(0)  # unknown
    with pytest.raises(InvalidBundleError):
        unix_ms_to_dtn_ms(DTN_EPOCH_UNIX_MS)


# --- extension blocks -----------------------------------------------------------------


def test_hop_count_previous_node_and_bundle_age_blocks() -> None:
    hop = hop_count_block(HopCount(30, 2), number=2)
    assert hop.data == bytes.fromhex("82181e02")
    assert read_hop_count(hop) == HopCount(30, 2)
    previous = previous_node_block(node_eid("relay"), number=3, flags=BlockFlag.REPLICATE)
    assert read_previous_node(previous) == Eid.parse("dtn://relay/")
    age = bundle_age_block(300, number=4)
    assert age.data == bytes.fromhex("19012c")
    assert read_bundle_age(age) == 300
    bundle = minimal(extensions=(hop, previous, age))
    assert decode_bundle(bundle.encode(), max_size=MAX) == bundle
    assert bundle.hop_count == HopCount(30, 2)
    assert bundle.previous_node == Eid.dtn("relay")
    assert bundle.bundle_age == 300
    with pytest.raises(InvalidBundleError):
        read_hop_count(age)
    with pytest.raises(InvalidBundleError):
        HopCount(0)
    with pytest.raises(InvalidBundleError):
        HopCount(256)
    assert HopCount(3, 4).exceeded and not HopCount(3, 3).exceeded


def test_a_relay_updates_its_blocks() -> None:
    bundle = minimal(extensions=(hop_count_block(HopCount(8), number=5, flags=0x01),))
    assert minimal().hop_count is None and minimal().previous_node is None
    forwarded = bundle.with_hop_count(HopCount(8, 1)).with_previous_node(node_eid("me"))
    forwarded = forwarded.with_bundle_age(12)
    assert forwarded.hop_count == HopCount(8, 1)
    hop = forwarded.find(BlockType.HOP_COUNT)
    assert hop is not None and (hop.number, hop.flags) == (5, 0x01)  # kept
    assert forwarded.previous_node == Eid.dtn("me")
    assert [b.number for b in forwarded.blocks] == [5, 6, 7, 1]  # added before the payload
    again = forwarded.with_previous_node(node_eid("next"))
    assert again.previous_node == Eid.dtn("next") and len(again.blocks) == 4
    assert forwarded.without_block(6).previous_node is None
    assert forwarded.block(7) is not None and forwarded.block(9) is None
    assert decode_bundle(forwarded.encode(), max_size=MAX) == forwarded
    with pytest.raises(InvalidBundleError):
        forwarded.without_block(1)


# --- unknown blocks -------------------------------------------------------------------


def _with_block(block_type: int, flags: int) -> bytes:
    block = CanonicalBlock(block_type, 2, b"\x01\x02", flags)
    return minimal(extensions=(block,)).encode()


def test_an_unknown_block_is_kept_by_default() -> None:
    bundle = decode_bundle(_with_block(200, 0), max_size=MAX)
    assert [b.block_type for b in bundle.blocks] == [200, 1]
    assert bundle.discarded == ()


def test_an_unknown_block_flagged_discard_is_dropped_and_said_so() -> None:
    bundle = decode_bundle(_with_block(200, BlockFlag.DISCARD_BLOCK_IF_UNPROCESSED), max_size=MAX)
    assert [b.block_type for b in bundle.blocks] == [1]
    assert [b.block_type for b in bundle.discarded] == [200]
    assert bundle == minimal()  # what is left is the bundle without it


def test_an_unknown_block_flagged_delete_deletes_the_bundle() -> None:
    flags = BlockFlag.DELETE_BUNDLE_IF_UNPROCESSED | BlockFlag.DISCARD_BLOCK_IF_UNPROCESSED
    with pytest.raises(UnknownCriticalBlockError) as caught:
        decode_bundle(_with_block(200, flags | BlockFlag.REPORT_IF_UNPROCESSED), max_size=MAX)
    assert (caught.value.block_type, caught.value.block_number) == (200, 2)
    assert caught.value.report_requested


def test_the_caller_says_which_blocks_it_processes() -> None:
    raw = _with_block(BlockType.BIB, BlockFlag.DELETE_BUNDLE_IF_UNPROCESSED)
    assert decode_bundle(raw, max_size=MAX).blocks[0].block_type == BlockType.BIB
    with pytest.raises(UnknownCriticalBlockError):
        decode_bundle(raw, max_size=MAX, known_types=KNOWN_BLOCK_TYPES - {BlockType.BIB})
    # The payload is always processed, even if the caller forgets it.
    assert decode_bundle(MINIMAL, max_size=MAX, known_types=()) == minimal()


def test_a_known_block_with_bad_data_is_malformed() -> None:
    for block_type, data in [(10, b"\x82\x00\x00"), (10, b"\x81\x05"), (7, b"\x20"), (6, b"\x00")]:
        raw = minimal(extensions=(CanonicalBlock(block_type, 2, data),)).encode()
        with pytest.raises(MalformedBundleError):
            decode_bundle(raw, max_size=MAX)
        # Unknown to a caller that does not process that type, it is opaque.
        known = KNOWN_BLOCK_TYPES - {block_type}
        assert decode_bundle(raw, max_size=MAX, known_types=known).blocks[0].data == data


def test_the_decoder_validates_the_whole_bundle_before_judging_unknown_blocks() -> None:
    raw = _with_block(200, BlockFlag.DELETE_BUNDLE_IF_UNPROCESSED)
    corrupt = raw[:-3] + bytes([raw[-3] ^ 1]) + raw[-2:]  # the payload's CRC
    with pytest.raises(CrcMismatchError):
        decode_bundle(corrupt, max_size=MAX)


# --- errors ---------------------------------------------------------------------------


def test_the_error_tree() -> None:
    assert issubclass(BundleError, ProtocolError)
    for error in (
        InvalidBundleError,
        MalformedBundleError,
        BadEidError,
        CrcMismatchError,
        BundleTooLargeError,
        UnknownCriticalBlockError,
        BadBundleIdError,
        FragmentError,
    ):
        assert issubclass(error, BundleError)
    assert issubclass(MalformedBundleError, DecodeError)
    assert issubclass(BadEidError, MalformedBundleError)
    assert issubclass(CrcMismatchError, MalformedBundleError)
    assert issubclass(BundleTooLargeError, OversizeError)
    assert issubclass(InvalidBundleError, ValueError)
    assert not issubclass(MalformedBundleError, InvalidBundleError)


def test_size_is_checked_before_any_parsing() -> None:
    with pytest.raises(BundleTooLargeError):
        decode_bundle(b"\x00" * 101, max_size=100)
    with pytest.raises(BundleTooLargeError):
        decode_bundle(MINIMAL, max_size=len(MINIMAL) - 1)
    assert decode_bundle(MINIMAL, max_size=len(MINIMAL)) == minimal()


def _swap(old: str, new: str, data: bytes = MINIMAL) -> bytes:
    text = data.hex()
    assert text.count(old) == 1, old
    return bytes.fromhex(text.replace(old, new))


def _recrc(block_zeroed: bytes) -> bytes:
    return block_zeroed[:-4] + crc32c(block_zeroed).to_bytes(4, "big")


def _bundle(primary_zeroed: bytes, *blocks_zeroed: bytes, crc: bool = True) -> bytes:
    parts = [primary_zeroed, *blocks_zeroed]
    return b"\x9f" + b"".join(_recrc(p) if crc else p for p in parts) + b"\xff"


P, PAY = PRIMARY_ZEROED, PAYLOAD_ZEROED

MALFORMED = {
    "empty": b"",
    "not an array": b"\x00",
    "a definite outer array": b"\x82" + MINIMAL[1:-1],
    "no break": MINIMAL[:-1],
    "a byte after the break": MINIMAL + b"\x00",
    "no canonical block": _bundle(P),
    "no payload block": _bundle(P, _swap("86010100", "86170200", PAY)),
    "the payload not last": _bundle(P, PAY, _swap("86010100", "86170200", PAY)),
    "two payload blocks": _bundle(P, PAY, PAY),
    "two blocks numbered 2": _bundle(
        P, _swap("86010100", "86170200", PAY), _swap("86010100", "86160200", PAY), PAY
    ),
    "block number 0": _bundle(P, _swap("86010100", "86170000", PAY), PAY),
    "an extension numbered 1": _bundle(P, _swap("86010100", "86170100", PAY), PAY),
    "version 6": _bundle(_swap("89070002", "89060002", P), PAY),
    "CRC type 3": _bundle(P, _swap("86010100024568", "86010100034568", PAY)),
    "a primary block of 10 items": _bundle(_swap("8907", "8a07", P), PAY),
    "a payload block of 5 items with a CRC": _bundle(P, _swap("8601", "8501", PAY)),
    "a non-shortest integer": _bundle(_swap("82192710", "821a00002710", P), PAY),
    "a non-shortest length": _bundle(P, _swap("4568656c", "580568656c", PAY)),
    "an indefinite byte string": _bundle(P, _swap("4568656c6c6f", "5f4568656c6c6fff", PAY)),
    "an indefinite inner array": _bundle(_swap("8219271001", "9f19271001ff", P), PAY),
    "a tagged payload": _bundle(P, _swap("4568656c", "d8184568656c", PAY)),
    "a float lifetime": _bundle(_swap("1a0036ee80", "fa4a5bba00", P), PAY),
    "a negative flags": _bundle(_swap("89070002", "89072002", P), PAY),
    "a text payload": _bundle(P, _swap("4568656c6c6f", "6568656c6c6f", PAY)),
    "a reserved additional info": _bundle(_swap("1a0036ee80", "1c", P), PAY),
    "a 3-byte CRC": b"\x9f" + _recrc(P) + PAY[:-5] + b"\x43\x00\x00\x00\xff",
    "a string past the end": b"\x9f" + _recrc(P) + PAY[:5] + b"\x5b" + b"\xff" * 9,
    "deep nesting": b"\x9f" + b"\x81" * 5000 + b"\x00",
    "an admin record asking for reports": _bundle(_swap("89070002", "89071a0004000202", P), PAY),
    "an anonymous bundle that may be fragmented": _bundle(
        _swap("8201642f2f612f", "820100", P), PAY
    ),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_bundles_are_refused_with_a_typed_error(name: str) -> None:
    with pytest.raises(MalformedBundleError) as caught:
        decode_bundle(MALFORMED[name], max_size=MAX)
    assert not isinstance(caught.value, CrcMismatchError), "the shape is checked, not the CRC"


def test_every_crc_byte_is_checked() -> None:
    for block, crc in ((PRIMARY_ZEROED, PRIMARY_CRC), (PAYLOAD_ZEROED, PAYLOAD_CRC)):
        start = MINIMAL.index(block[:-4])
        for at in range(start, start + len(block)):
            corrupt = bytearray(MINIMAL)
            corrupt[at] ^= 0x40
            with pytest.raises(MalformedBundleError):
                decode_bundle(bytes(corrupt), max_size=MAX)
        assert crc in MINIMAL.hex()
    wrong = bytes.fromhex(MINIMAL.hex().replace(PAYLOAD_CRC, "21c13f2e"))
    with pytest.raises(CrcMismatchError):
        decode_bundle(wrong, max_size=MAX)


def test_a_bad_eid_inside_a_bundle_is_a_bad_eid_error() -> None:
    raw = _bundle(_swap("8201642f2f612f", "8201642f2f612a", P), PAY)  # "//a*"
    with pytest.raises(BadEidError):
        decode_bundle(raw, max_size=MAX)


def test_a_non_shortest_eid_is_refused_even_once_its_canonical_form_was_seen() -> None:
    assert decode_bundle(MINIMAL, max_size=MAX) == minimal()  # dtn://b/inbox seen
    raw = _bundle(_swap("8201692f2f62", "820178092f2f62", P), PAY)  # its length head padded
    with pytest.raises(BadEidError):
        decode_bundle(raw, max_size=MAX)


def test_decode_takes_any_bytes_like_object() -> None:
    assert decode_bundle(bytearray(MINIMAL), max_size=MAX) == minimal()
    assert decode_bundle(memoryview(MINIMAL), max_size=MAX) == minimal()


# --- building -------------------------------------------------------------------------


def test_building_what_rfc_9171_forbids_is_refused() -> None:
    primary = minimal().primary
    C32 = CrcType.CRC32C
    cases: list[Callable[[], object]] = [
        lambda: minimal(flags=BundleFlag.ADMIN_RECORD | BundleFlag.REPORT_DELIVERY),
        lambda: minimal(source=NULL_EID),  # anonymous, yet may be fragmented
        lambda: minimal(source=NULL_EID, flags=0x04 | BundleFlag.REPORT_RECEPTION),
        lambda: minimal(lifetime_ms=-1),
        lambda: minimal(lifetime_ms=1 << 64),
        lambda: minimal(flags=BundleFlag.IS_FRAGMENT),  # no offset
        lambda: minimal(crc_type=3),
        lambda: minimal(creation=CreationTimestamp(-1)),
        lambda: minimal(destination="dtn://b/inbox"),
        lambda: PrimaryBlock(A, B, A, CreationTimestamp(1), 1, 0, C32, 5, None),
        lambda: PrimaryBlock(A, B, A, CreationTimestamp(1), 1, 1, C32, 10, 10),  # offset = total
        lambda: Bundle(primary, ()),
        lambda: Bundle(primary, (payload_block(b"x"), payload_block(b"y"))),
        lambda: Bundle(primary, (payload_block(b"x"), hop_count_block(HopCount(1), number=2))),
        lambda: Bundle(
            primary,
            (
                hop_count_block(HopCount(1), number=2),
                hop_count_block(HopCount(1), number=3),
                payload_block(b"x"),
            ),
        ),
        lambda: Bundle(
            PrimaryBlock(A, B, A, CreationTimestamp(1), 1, 2, C32),
            (CanonicalBlock(1, 1, b"x", BlockFlag.REPORT_IF_UNPROCESSED),),
        ),
        lambda: Bundle(
            PrimaryBlock(A, B, A, CreationTimestamp(1), 1, 1, C32, 8, 10),
            (payload_block(b"xyz"),),  # past the ADU's end
        ),
        lambda: CanonicalBlock(1, 2, b""),
        lambda: CanonicalBlock(6, 1, b""),
        lambda: CanonicalBlock(6, 2, bytearray(b"")),  # type: ignore[arg-type]
        lambda: CanonicalBlock(True, 2, b""),
    ]
    for case in cases:
        with pytest.raises(BundleError):
            case()


def test_flags_keep_unknown_bits_and_are_plain_ints() -> None:
    bundle = minimal(flags=BundleFlag.ACK_REQUESTED | 0x800000)
    assert type(bundle.primary.flags) is int and bundle.primary.flags == 0x800020
    assert decode_bundle(bundle.encode(), max_size=MAX).primary.flags == 0x800020
    assert bundle.primary.expiry_ms == 10000 + 3_600_000
