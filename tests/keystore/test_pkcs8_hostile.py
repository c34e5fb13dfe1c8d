"""Hostile key-file content: anything that is not a good key raises a typed error."""

from __future__ import annotations

import base64

from hypothesis import given, settings
from hypothesis import strategies as st

from trustmesh.crypto.keys import KeyKind, PrivateKey
from trustmesh.errors import ProtocolError
from trustmesh.keystore.pkcs8 import decode_private_key, encode_private_key

GOOD = encode_private_key(PrivateKey.generate(KeyKind.SECP256K1), None)
GOOD_DER = base64.b64decode(b"".join(GOOD.splitlines()[1:-1]))


def _pem(der: bytes, label: bytes = b"PRIVATE KEY") -> bytes:
    body = base64.encodebytes(der)
    return b"-----BEGIN " + label + b"-----\n" + body + b"-----END " + label + b"-----\n"


def _loads_or_typed_error(pem: bytes, passphrase: bytes | None) -> None:
    try:
        key = decode_private_key(pem, passphrase)
    except ProtocolError:
        return
    assert key.public_key().to_bytes()  # whatever loads is a usable key


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400), st.one_of(st.none(), st.binary(min_size=1, max_size=8)))
def test_arbitrary_bytes(data: bytes, passphrase: bytes | None) -> None:
    _loads_or_typed_error(data, passphrase)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(min_value=0, max_value=len(GOOD_DER) - 1),
    st.integers(min_value=0, max_value=255),
    st.sampled_from([b"PRIVATE KEY", b"ENCRYPTED PRIVATE KEY", b"EC PRIVATE KEY"]),
)
def test_corrupted_der_inside_valid_pem(index: int, value: int, label: bytes) -> None:
    der = bytearray(GOOD_DER)
    der[index] = value
    _loads_or_typed_error(_pem(bytes(der), label), b"pw")


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=0, max_value=len(GOOD_DER)))
def test_truncated_der(cut: int) -> None:
    _loads_or_typed_error(_pem(GOOD_DER[:cut]), None)
