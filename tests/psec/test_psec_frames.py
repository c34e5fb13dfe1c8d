"""PSEC frames: byte-exact per the draft, strict, and every bad input a typed error."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trustmesh.errors import DecodeError, OversizeError
from trustmesh.psec.frames import (
    MAX_SCHEMES,
    Accept,
    Propose,
    PsecFrameError,
    Reject,
    decode_frame,
    is_psec,
)
from trustmesh.wire.multihash import Multihash
from trustmesh.wire.peerid import PeerId

PEER = PeerId(Multihash.sha2_256(b"peer a").encode())


def test_a_proposal_is_laid_out_as_the_draft_says() -> None:
    frame = Propose(PEER, ("/dtls/1.2", "/quic-datagram/1"), b"\x16hello").encode()
    peer = PEER.to_bytes()
    expected = (
        b"\x00"
        + bytes([len(peer)])
        + peer
        + b"\x02"
        + b"\x09/dtls/1.2"
        + b"\x10/quic-datagram/1"
        + b"\x06\x16hello"
    )
    assert frame == expected
    assert decode_frame(frame) == Propose(PEER, ("/dtls/1.2", "/quic-datagram/1"), b"\x16hello")


def test_accept_and_reject_round_trip() -> None:
    assert Accept("/dtls/1.2").encode() == b"\x01\x09/dtls/1.2"
    assert decode_frame(b"\x01\x09/dtls/1.2") == Accept("/dtls/1.2")
    assert Reject().encode() == b"\xff"
    assert decode_frame(b"\xff") == Reject()


@pytest.mark.parametrize(
    "data",
    [
        b"",  # nothing
        b"\x02",  # a reserved type
        b"\x07abc",  # an unknown type
        b"\xff\x00",  # a Reject with a body
        b"\x01\x09/dtls/1.2\x00",  # an Accept with trailing bytes
        b"\x01\x05/dtls/1.2",  # a name cut short ... or too long for its length
        b"\x01\x04dtls",  # a name that does not start with /
        b"\x01\x00",  # an empty name
        b"\x00\x05abc",  # a peer ID cut short
    ],
)
def test_bad_frames_are_refused_with_a_typed_error(data: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_frame(data)


def test_a_proposal_with_no_scheme_too_many_or_one_twice_is_refused() -> None:
    peer = PEER.to_bytes()
    head = b"\x00" + bytes([len(peer)]) + peer
    with pytest.raises(PsecFrameError):
        decode_frame(head + b"\x00")
    many = bytes([MAX_SCHEMES + 1]) + b"".join(b"\x03/s" + bytes([97 + i]) for i in range(17))
    with pytest.raises(PsecFrameError):
        decode_frame(head + many)
    with pytest.raises(PsecFrameError):
        decode_frame(head + b"\x02\x02/a\x02/a")
    with pytest.raises(PsecFrameError):
        decode_frame(head + b"\x01\x02/a\x00")  # an empty initiation packet


def test_a_frame_over_the_path_limit_is_refused() -> None:
    frame = Propose(PEER, ("/dtls/1.2",), b"x" * 1300).encode()
    with pytest.raises(OversizeError):
        decode_frame(frame)
    assert decode_frame(frame, max_size=2000).initiation == b"x" * 1300  # type: ignore[union-attr]


def test_psec_frames_are_told_apart_from_dtls_and_quic_by_their_first_byte() -> None:
    assert all(is_psec(bytes([b])) for b in (0, 1, 2, 3, 255))
    assert not any(is_psec(bytes([b])) for b in (*range(20, 64), *range(64, 128), 192))
    assert not is_psec(b"\xff" + bytes(40))  # a QUIC long header (Retry), not a Reject


@given(st.binary(max_size=300))
def test_any_bytes_give_a_frame_or_a_typed_error(data: bytes) -> None:
    try:
        frame = decode_frame(data)
    except DecodeError:
        return
    assert frame.encode() == data  # one encoding per frame


@given(
    st.lists(
        st.from_regex(r"/[a-z0-9._-]{1,20}", fullmatch=True), min_size=1, max_size=16, unique=True
    ),
    st.one_of(st.none(), st.binary(min_size=1, max_size=200)),
)
def test_every_valid_proposal_round_trips(schemes: list[str], initiation: bytes | None) -> None:
    frame = Propose(PEER, tuple(schemes), initiation)
    encoded = frame.encode()
    assert decode_frame(encoded) == frame
    for cut in range(len(encoded)):  # every truncation is a typed error or a shorter frame
        try:
            decode_frame(encoded[:cut])
        except DecodeError:
            continue
