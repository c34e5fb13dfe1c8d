"""Wire codecs: varints, frames, multihash and libp2p peer IDs."""

from trustmesh.wire.frames import DEFAULT_MAX_FRAME, FrameDecoder, decode_frame, encode_frame
from trustmesh.wire.multihash import Multihash, MultihashCode
from trustmesh.wire.peerid import KeyType, PeerId, decode_public_key, encode_public_key
from trustmesh.wire.varint import (
    MAX_VARINT_BYTES,
    MAX_VARINT_VALUE,
    decode_uvarint,
    decode_uvarint_exact,
    encode_uvarint,
)

__all__ = [
    "DEFAULT_MAX_FRAME",
    "MAX_VARINT_BYTES",
    "MAX_VARINT_VALUE",
    "FrameDecoder",
    "KeyType",
    "Multihash",
    "MultihashCode",
    "PeerId",
    "decode_frame",
    "decode_public_key",
    "decode_uvarint",
    "decode_uvarint_exact",
    "encode_frame",
    "encode_public_key",
    "encode_uvarint",
]
