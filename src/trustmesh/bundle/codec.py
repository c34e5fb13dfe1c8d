"""Bundles of RFC 9171 §4, encoded byte-exactly and decoded strictly (bundles.md §1-5).

    bundle    0x9f  primary-block  canonical-block ... payload-block  0xff
    primary   [7, flags, crc type, destination, source, report-to,
               [creation DTN ms, sequence], lifetime ms,
               (fragment offset, total ADU length)?, (crc)?]
    canonical [block type, block number, block flags, crc type, data (bstr), (crc)?]

We emit CRC-32C on every block by default and accept CRC type 0 (none), 1 (X.25
CRC-16) and 2 (CRC-32C). The decoder accepts only the deterministic encoding RFC 9171
§4.1 requires (and definite arrays inside blocks), so ``decode_bundle(x).encode() == x``
for every ``x`` it accepts, and ``decode_bundle(b.encode(), ...) == b``.
"""

from __future__ import annotations

import binascii
import enum
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field

from crc32c import crc32c

from trustmesh.bundle import _cbor
from trustmesh.bundle.eid import NULL_EID, Eid, read_eid
from trustmesh.bundle.errors import (
    BundleTooLargeError,
    CrcMismatchError,
    InvalidBundleError,
    MalformedBundleError,
    UnknownCriticalBlockError,
)
from trustmesh.bundle.ids import BundleId

VERSION = 7
MAX_BLOCKS = 256  # canonical blocks in one bundle; real bundles carry a handful


class CrcType(enum.IntEnum):
    """RFC 9171 §4.2.1."""

    NONE = 0
    CRC16 = 1  # X.25 CRC-16
    CRC32C = 2  # Castagnoli CRC-32


class BundleFlag(enum.IntFlag):
    """Bundle processing control flags (RFC 9171 §4.2.3); unknown bits are kept."""

    IS_FRAGMENT = 0x01
    ADMIN_RECORD = 0x02
    MUST_NOT_FRAGMENT = 0x04
    ACK_REQUESTED = 0x20
    STATUS_TIME = 0x40
    REPORT_RECEPTION = 0x4000
    REPORT_FORWARDING = 0x10000
    REPORT_DELIVERY = 0x20000
    REPORT_DELETION = 0x40000


REPORT_FLAGS = 0x4000 | 0x10000 | 0x20000 | 0x40000
# Plain ints for the hot paths: IntFlag's operators are slow.
_IS_FRAGMENT, _ADMIN_RECORD, _MUST_NOT_FRAGMENT = 0x01, 0x02, 0x04


class BlockFlag(enum.IntFlag):
    """Block processing control flags (RFC 9171 §4.2.4); unknown bits are kept."""

    REPLICATE = 0x01
    REPORT_IF_UNPROCESSED = 0x02
    DELETE_BUNDLE_IF_UNPROCESSED = 0x04
    DISCARD_BLOCK_IF_UNPROCESSED = 0x10


class BlockType(enum.IntEnum):
    """Block type codes: RFC 9171 §9.1 and BPSec (RFC 9172)."""

    PAYLOAD = 1
    PREVIOUS_NODE = 6
    BUNDLE_AGE = 7
    HOP_COUNT = 10
    BIB = 11
    BCB = 12


KNOWN_BLOCK_TYPES: frozenset[int] = frozenset(BlockType)
_CRC_TYPES = (CrcType.NONE, CrcType.CRC16, CrcType.CRC32C)
_CRC_SIZE = (0, 2, 4)
_CRC_HEAD = (b"", b"\x42", b"\x44")
_REVERSED = bytes(int(f"{i:08b}"[::-1], 2) for i in range(256))  # bit order of each byte


def _crc(crc_type: int, *chunks: bytes | memoryview) -> bytes:
    """The CRC (big-endian) of ``chunks`` followed by the zeroed CRC value: RFC 9171
    §4.2.1 computes it over the whole block with the CRC's bytes set to zero."""
    if crc_type == CrcType.CRC32C:
        value = 0
        for chunk in chunks:
            value = crc32c(chunk, value)
        return crc32c(b"\0\0\0\0", value).to_bytes(4, "big")
    # X.25 is the reflected CCITT CRC: run binascii's unreflected one over bit-reversed
    # bytes, then reverse the result, instead of a slow byte loop in Python.
    crc = 0xFFFF
    for chunk in chunks:
        crc = binascii.crc_hqx(bytes(chunk).translate(_REVERSED), crc)
    crc = binascii.crc_hqx(b"\0\0", crc)
    return (int(f"{crc:016b}"[::-1], 2) ^ 0xFFFF).to_bytes(2, "big")


def _uint(value: object, name: str) -> int:
    """``value`` as a plain int if it is an unsigned 64-bit integer (an IntFlag becomes
    its int: IntFlag's ``~`` would drop unknown bits)."""
    if type(value) is int and 0 <= value <= _cbor.MAX_UINT:
        return value
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _cbor.MAX_UINT:
        return int(value)
    raise InvalidBundleError(f"{name} is an unsigned 64-bit integer, not {value!r:.30}")


def _crc_type(value: object) -> CrcType:
    if type(value) is CrcType:
        return value
    if type(value) is int and 0 <= value <= 2:
        return _CRC_TYPES[value]
    raise InvalidBundleError(f"CRC type is 0, 1 or 2, not {value!r:.30}")


# --- blocks -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CreationTimestamp:
    """``time`` is DTN time in ms since 2000-01-01 UTC (0: unknown); ``sequence``
    tells apart bundles a node creates in the same millisecond."""

    time: int
    sequence: int = 0

    def __post_init__(self) -> None:
        _uint(self.time, "creation time")
        _uint(self.sequence, "sequence number")


@dataclass(frozen=True, slots=True)
class PrimaryBlock:
    """The primary block (RFC 9171 §4.3.1). Its version is always 7. The fragment
    offset and total ADU length are set exactly when ``flags`` has IS_FRAGMENT."""

    destination: Eid
    source: Eid
    report_to: Eid
    creation: CreationTimestamp
    lifetime: int  # ms after the creation time
    flags: int = 0
    crc_type: CrcType = CrcType.CRC32C
    fragment_offset: int | None = None
    total_adu_length: int | None = None

    def __post_init__(self) -> None:
        for name in ("destination", "source", "report_to"):
            if not isinstance(getattr(self, name), Eid):
                raise InvalidBundleError(f"{name} is an Eid")
        if not isinstance(self.creation, CreationTimestamp):
            raise InvalidBundleError("creation is a CreationTimestamp")
        _uint(self.lifetime, "lifetime")
        flags = _uint(self.flags, "bundle flags")
        if type(self.flags) is not int:
            object.__setattr__(self, "flags", flags)
        if type(self.crc_type) is not CrcType:
            object.__setattr__(self, "crc_type", _crc_type(self.crc_type))
        if flags & _IS_FRAGMENT:
            offset, total = self.fragment_offset, self.total_adu_length
            if offset is None or total is None:
                raise InvalidBundleError("a fragment has a fragment offset and ADU length")
            _uint(offset, "fragment offset")
            _uint(total, "total ADU length")
            if offset >= total:
                raise InvalidBundleError(f"fragment offset {offset} is not below ADU {total}")
        elif self.fragment_offset is not None or self.total_adu_length is not None:
            raise InvalidBundleError("only a fragment has a fragment offset and ADU length")
        if flags & _ADMIN_RECORD and flags & REPORT_FLAGS:
            raise InvalidBundleError("an administrative record requests no status report")
        if self.source.is_null and (flags & REPORT_FLAGS or not flags & _MUST_NOT_FRAGMENT):
            raise InvalidBundleError(
                "an anonymous bundle (from dtn:none) must not be fragmented and requests "
                "no status report (RFC 9171 §4.2.3)"
            )

    @property
    def is_fragment(self) -> bool:
        return self.fragment_offset is not None

    @property
    def expiry_ms(self) -> int | None:
        """DTN time at which the bundle expires; None when the creation time is unknown
        (then the bundle age block tells its age)."""
        return None if self.creation.time == 0 else self.creation.time + self.lifetime

    def encode(self) -> bytes:
        uint = _cbor.uint
        offset, total = self.fragment_offset, self.total_adu_length
        crc_type = self.crc_type
        parts = [
            _cbor.head(_cbor.ARRAY, 8 + 2 * (offset is not None) + (crc_type != 0)),
            b"\x07",
            uint(self.flags),
            uint(crc_type),
            self.destination.to_cbor(),
            self.source.to_cbor(),
            self.report_to.to_cbor(),
            b"\x82",
            uint(self.creation.time),
            uint(self.creation.sequence),
            uint(self.lifetime),
        ]
        if offset is not None and total is not None:
            parts += (uint(offset), uint(total))
        if crc_type:
            parts.append(_CRC_HEAD[crc_type])
            body = b"".join(parts)
            return body + _crc(crc_type, body)
        return b"".join(parts)


@dataclass(frozen=True, slots=True)
class CanonicalBlock:
    """A block after the primary (RFC 9171 §4.3.2). The payload block is type 1,
    number 1; every other block has a number of 2 or more."""

    block_type: int
    number: int
    data: bytes
    flags: int = 0
    crc_type: CrcType = CrcType.CRC32C

    def __post_init__(self) -> None:
        _uint(self.block_type, "block type")
        _uint(self.number, "block number")
        flags = _uint(self.flags, "block flags")
        if type(self.flags) is not int:
            object.__setattr__(self, "flags", flags)
        if type(self.crc_type) is not CrcType:
            object.__setattr__(self, "crc_type", _crc_type(self.crc_type))
        if not isinstance(self.data, bytes):
            raise InvalidBundleError(f"block data is bytes, not {type(self.data).__name__}")
        if (self.block_type == BlockType.PAYLOAD) != (self.number == 1):
            raise InvalidBundleError(
                f"block {self.number} of type {self.block_type}: block number 1 is the "
                "payload block's, and only its"
            )
        if self.number == 0:
            raise InvalidBundleError("block number 0 is the primary block's")

    def _prefix(self) -> bytes:
        """The block's bytes before its data."""
        uint = _cbor.uint
        return b"".join(
            (
                b"\x86" if self.crc_type else b"\x85",
                uint(self.block_type),
                uint(self.number),
                uint(self.flags),
                uint(self.crc_type),
                _cbor.head(_cbor.BYTES, len(self.data)),
            )
        )

    def _parts(self) -> tuple[bytes, ...]:
        prefix = self._prefix()
        crc_type = self.crc_type
        if not crc_type:
            return prefix, self.data
        head = _CRC_HEAD[crc_type]
        return prefix, self.data, head + _crc(crc_type, prefix, self.data, head)

    def encode(self) -> bytes:
        return b"".join(self._parts())

    def encoded_size(self) -> int:
        return (
            len(self._prefix())
            + len(self.data)
            + (1 + _CRC_SIZE[self.crc_type]) * (self.crc_type != 0)
        )


def payload_block(
    data: bytes, *, flags: int = 0, crc_type: CrcType = CrcType.CRC32C
) -> CanonicalBlock:
    return CanonicalBlock(BlockType.PAYLOAD, 1, data, flags, crc_type)


# --- the extension blocks of RFC 9171 §4.4 --------------------------------------------


@dataclass(frozen=True, slots=True)
class HopCount:
    """Hop count block data (RFC 9171 §4.4.3): ``limit`` 1..255, ``count`` hops so far."""

    limit: int
    count: int = 0

    def __post_init__(self) -> None:
        _uint(self.count, "hop count")
        if type(self.limit) is not int or not 1 <= self.limit <= 255:
            raise InvalidBundleError(f"a hop limit is 1 to 255, not {self.limit!r:.30}")

    @property
    def exceeded(self) -> bool:
        return self.count > self.limit

    def encode(self) -> bytes:
        return b"\x82" + _cbor.uint(self.limit) + _cbor.uint(self.count)


def hop_count_block(
    hop: HopCount, *, number: int, flags: int = 0, crc_type: CrcType = CrcType.CRC32C
) -> CanonicalBlock:
    return CanonicalBlock(BlockType.HOP_COUNT, number, hop.encode(), flags, crc_type)


def previous_node_block(
    node: Eid, *, number: int, flags: int = 0, crc_type: CrcType = CrcType.CRC32C
) -> CanonicalBlock:
    """A previous node block naming ``node`` (use the node ID, e.g. ``node_eid(id)``)."""
    return CanonicalBlock(BlockType.PREVIOUS_NODE, number, node.to_cbor(), flags, crc_type)


def bundle_age_block(
    age_ms: int, *, number: int, flags: int = 0, crc_type: CrcType = CrcType.CRC32C
) -> CanonicalBlock:
    _uint(age_ms, "bundle age")
    return CanonicalBlock(BlockType.BUNDLE_AGE, number, _cbor.uint(age_ms), flags, crc_type)


def _of_type(block: CanonicalBlock, block_type: BlockType) -> bytes:
    if block.block_type != block_type:
        raise InvalidBundleError(f"block {block.number} is not a {block_type.name} block")
    return block.data


def read_hop_count(block: CanonicalBlock) -> HopCount:
    data = _of_type(block, BlockType.HOP_COUNT)
    return _hop_count_in(data, 0, len(data))


def read_previous_node(block: CanonicalBlock) -> Eid:
    data = _of_type(block, BlockType.PREVIOUS_NODE)
    return _previous_node_in(data, 0, len(data))


def read_bundle_age(block: CanonicalBlock) -> int:
    data = _of_type(block, BlockType.BUNDLE_AGE)
    return _bundle_age_in(data, 0, len(data))


# Each reads a block's data in place, data[start:stop], with offsets into ``data``.


def _hop_count_in(data: bytes, start: int, stop: int) -> HopCount:
    count, pos = _cbor.read_array(data, start)
    if count != 2:
        raise MalformedBundleError("hop count data is [limit, count]", offset=start)
    limit, pos = _cbor.read_uint(data, pos)
    hops, pos = _cbor.read_uint(data, pos)
    _end_of_data(pos, stop, "hop count")
    if not 1 <= limit <= 255:
        raise MalformedBundleError(f"a hop limit is 1 to 255, not {limit}", offset=start)
    return HopCount(limit, hops)


def _previous_node_in(data: bytes, start: int, stop: int) -> Eid:
    eid, pos = read_eid(data, start)
    _end_of_data(pos, stop, "previous node")
    return eid


def _bundle_age_in(data: bytes, start: int, stop: int) -> int:
    age, pos = _cbor.read_uint(data, start)
    _end_of_data(pos, stop, "bundle age")
    return age


def _end_of_data(pos: int, stop: int, what: str) -> None:
    if pos != stop:
        raise MalformedBundleError(f"{what} block data does not fill its byte string", offset=pos)


_CHECK_DATA: dict[int, Callable[[bytes, int, int], object]] = {
    BlockType.HOP_COUNT: _hop_count_in,
    BlockType.PREVIOUS_NODE: _previous_node_in,
    BlockType.BUNDLE_AGE: _bundle_age_in,
}
_ONCE = frozenset(_CHECK_DATA)  # RFC 9171 §4.4: at most one block of each of these


# --- bundles --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Bundle:
    """A primary block and canonical blocks in wire order, the payload block last.

    ``discarded`` lists the blocks the decoder dropped (unknown type, "discard block
    if it can't be processed"); it is not encoded and not compared."""

    primary: PrimaryBlock
    blocks: tuple[CanonicalBlock, ...]
    discarded: tuple[CanonicalBlock, ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        blocks = self.blocks
        if type(blocks) is not tuple:
            blocks = tuple(blocks)
            object.__setattr__(self, "blocks", blocks)
        if not isinstance(self.primary, PrimaryBlock):
            raise InvalidBundleError("a bundle's first block is a PrimaryBlock")
        if not blocks or len(blocks) > MAX_BLOCKS:
            raise InvalidBundleError(f"a bundle has 1 to {MAX_BLOCKS} canonical blocks")
        numbers = set()
        once = set()
        for block in blocks:
            if not isinstance(block, CanonicalBlock):
                raise InvalidBundleError("a bundle's blocks are CanonicalBlocks")
            if block.number in numbers:
                raise InvalidBundleError(f"two blocks are numbered {block.number}")
            numbers.add(block.number)
            if block.block_type in _ONCE:
                if block.block_type in once:
                    raise InvalidBundleError(f"two blocks of type {block.block_type}")
                once.add(block.block_type)
        payload = blocks[-1]
        if payload.block_type != BlockType.PAYLOAD:
            raise InvalidBundleError("the payload block is the last block")
        primary = self.primary
        if primary.total_adu_length is not None:
            offset, size = primary.fragment_offset or 0, len(payload.data)
            if not size or offset + size > primary.total_adu_length:
                raise InvalidBundleError(
                    f"a fragment's payload of {size} bytes at offset {offset} is empty or "
                    f"past the ADU's {primary.total_adu_length} bytes"
                )
        if primary.flags & _ADMIN_RECORD or primary.source.is_null:
            for block in blocks:
                if block.flags & 0x02:  # REPORT_IF_UNPROCESSED
                    raise InvalidBundleError(
                        "an administrative record or anonymous bundle requests no status "
                        f"report, but block {block.number} does"
                    )

    @classmethod
    def build(
        cls,
        *,
        source: Eid,
        destination: Eid,
        payload: bytes,
        creation: CreationTimestamp,
        lifetime_ms: int,
        report_to: Eid = NULL_EID,
        flags: int = 0,
        extensions: Iterable[CanonicalBlock] = (),
        crc_type: CrcType = CrcType.CRC32C,
    ) -> Bundle:
        """A new bundle, CRC-32C on every block, payload block last."""
        primary = PrimaryBlock(
            destination, source, report_to, creation, lifetime_ms, flags, crc_type
        )
        blocks = (*extensions, payload_block(payload, crc_type=crc_type))
        return cls(primary, blocks)

    # --- reading --------------------------------------------------------------------

    @property
    def payload_block(self) -> CanonicalBlock:
        return self.blocks[-1]

    @property
    def payload(self) -> bytes:
        return self.blocks[-1].data

    @property
    def extensions(self) -> tuple[CanonicalBlock, ...]:
        return self.blocks[:-1]

    @property
    def is_fragment(self) -> bool:
        return self.primary.fragment_offset is not None

    @property
    def adu_length(self) -> int:
        """Length of the whole ADU (of the original bundle, for a fragment)."""
        total = self.primary.total_adu_length
        return len(self.payload) if total is None else total

    @property
    def bundle_id(self) -> BundleId:
        """Raises BadBundleIdError for an anonymous bundle or an ipn source."""
        primary = self.primary
        return BundleId.of(
            primary.source,
            primary.creation.time,
            primary.creation.sequence,
            primary.fragment_offset,
        )

    def block(self, number: int) -> CanonicalBlock | None:
        for block in self.blocks:
            if block.number == number:
                return block
        return None

    def find(self, block_type: int) -> CanonicalBlock | None:
        """The first block of ``block_type``, if any."""
        for block in self.blocks:
            if block.block_type == block_type:
                return block
        return None

    @property
    def hop_count(self) -> HopCount | None:
        block = self.find(BlockType.HOP_COUNT)
        return None if block is None else read_hop_count(block)

    @property
    def previous_node(self) -> Eid | None:
        block = self.find(BlockType.PREVIOUS_NODE)
        return None if block is None else read_previous_node(block)

    @property
    def bundle_age(self) -> int | None:
        block = self.find(BlockType.BUNDLE_AGE)
        return None if block is None else read_bundle_age(block)

    # --- changing (a new bundle each time) ------------------------------------------

    def next_block_number(self) -> int:
        return max(2, *(block.number + 1 for block in self.blocks))

    def with_block(self, block: CanonicalBlock) -> Bundle:
        """This bundle with ``block`` in place of the block of the same number, or added
        just before the payload block."""
        blocks = list(self.blocks)
        for index, old in enumerate(blocks):
            if old.number == block.number:
                blocks[index] = block
                break
        else:
            blocks.insert(len(blocks) - 1, block)
        return Bundle(self.primary, tuple(blocks))

    def without_block(self, number: int) -> Bundle:
        if number == 1:
            raise InvalidBundleError("the payload block cannot be removed")
        return Bundle(self.primary, tuple(b for b in self.blocks if b.number != number))

    def _with_data(self, block_type: BlockType, data: bytes) -> Bundle:
        old = self.find(block_type)
        if old is None:
            new = CanonicalBlock(block_type, self.next_block_number(), data)
        else:
            new = CanonicalBlock(block_type, old.number, data, old.flags, old.crc_type)
        return self.with_block(new)

    def with_hop_count(self, hop: HopCount) -> Bundle:
        """Replace the hop count block's data (keeping its number and flags), or add one."""
        return self._with_data(BlockType.HOP_COUNT, hop.encode())

    def with_previous_node(self, node: Eid) -> Bundle:
        """Replace the previous node block's data, or add one."""
        return self._with_data(BlockType.PREVIOUS_NODE, node.to_cbor())

    def with_bundle_age(self, age_ms: int) -> Bundle:
        """Replace the bundle age block's data, or add one."""
        _uint(age_ms, "bundle age")
        return self._with_data(BlockType.BUNDLE_AGE, _cbor.uint(age_ms))

    # --- encoding -------------------------------------------------------------------

    def encode(self) -> bytes:
        parts = [b"\x9f", self.primary.encode()]
        for block in self.blocks:
            parts += block._parts()
        parts.append(b"\xff")
        return b"".join(parts)

    def encoded_size(self) -> int:
        return 2 + len(self.primary.encode()) + sum(b.encoded_size() for b in self.blocks)


# --- decoding -------------------------------------------------------------------------


def decode_bundle(
    data: bytes | bytearray | memoryview,
    *,
    max_size: int,
    known_types: Collection[int] = KNOWN_BLOCK_TYPES,
) -> Bundle:
    """Decode one whole bundle, strictly.

    ``known_types`` are the block types the caller can process (the payload always is).
    A block of another type is kept as it is, unless its flags say otherwise: "delete
    bundle if block can't be processed" raises :class:`UnknownCriticalBlockError`, and
    "discard block" drops it (listed in ``Bundle.discarded``). The whole bundle is
    checked (shape, CRCs) before that decision."""
    size = len(data)
    if size > max_size:
        raise BundleTooLargeError(f"a bundle of {size} bytes is over {max_size}")
    raw = data if type(data) is bytes else bytes(data)
    if not raw:
        raise MalformedBundleError("an empty bundle", offset=0)
    if raw[0] != 0x9F:
        what = "a definite-length array" if raw[0] >> 5 == _cbor.ARRAY else f"0x{raw[0]:02x}"
        raise MalformedBundleError(
            f"a bundle is an indefinite-length array (0x9f), not {what}", offset=0
        )
    primary, pos = _read_primary(raw, 1)
    blocks: list[CanonicalBlock] = []
    unknown: list[CanonicalBlock] = []
    while True:
        if pos >= size:
            raise MalformedBundleError("the bundle ends before its break (0xff)", offset=size)
        if raw[pos] == 0xFF:
            break
        if len(blocks) >= MAX_BLOCKS:
            raise MalformedBundleError(f"more than {MAX_BLOCKS} blocks", offset=pos)
        if blocks and blocks[-1].block_type == BlockType.PAYLOAD:
            raise MalformedBundleError("a block after the payload block", offset=pos)
        block, data_start, data_end, pos = _read_block(raw, pos)
        block_type = block.block_type
        if block_type in known_types:
            check = _CHECK_DATA.get(block_type)
            if check is not None:
                check(raw, data_start, data_end)
        elif block_type != BlockType.PAYLOAD:
            unknown.append(block)
        blocks.append(block)
    if pos + 1 != size:
        raise MalformedBundleError(f"{size - pos - 1} bytes after the bundle", offset=pos + 1)
    try:
        bundle = Bundle(primary, tuple(blocks))
    except InvalidBundleError as exc:
        raise MalformedBundleError(str(exc)) from None
    return _drop_unknown(bundle, unknown) if unknown else bundle


def _drop_unknown(bundle: Bundle, unknown: list[CanonicalBlock]) -> Bundle:
    """Apply the flags of the blocks we cannot process (RFC 9171 §5.6 step 4)."""
    discarded = []
    for block in unknown:
        if block.flags & BlockFlag.DELETE_BUNDLE_IF_UNPROCESSED:
            raise UnknownCriticalBlockError(
                block.block_type,
                block.number,
                report_requested=bool(block.flags & BlockFlag.REPORT_IF_UNPROCESSED),
            )
        if block.flags & BlockFlag.DISCARD_BLOCK_IF_UNPROCESSED:
            discarded.append(block.number)
    if not discarded:
        return bundle
    blocks = tuple(b for b in bundle.blocks if b.number not in discarded)
    dropped = tuple(b for b in bundle.blocks if b.number in discarded)
    return Bundle(bundle.primary, blocks, dropped)


def _read_primary(raw: bytes, start: int) -> tuple[PrimaryBlock, int]:
    read_uint = _cbor.read_uint
    count, pos = _cbor.read_array(raw, start)
    if not 8 <= count <= 11:
        raise MalformedBundleError(f"a primary block has 8 to 11 items, not {count}", offset=start)
    version, pos = read_uint(raw, pos)
    if version != VERSION:
        raise MalformedBundleError(f"Bundle Protocol version {version}, not 7", offset=pos - 1)
    flags, pos = read_uint(raw, pos)
    crc_type, pos = read_uint(raw, pos)
    if crc_type > 2:
        raise MalformedBundleError(f"unknown CRC type {crc_type}", offset=pos - 1)
    destination, pos = read_eid(raw, pos)
    source, pos = read_eid(raw, pos)
    report_to, pos = read_eid(raw, pos)
    items, at = _cbor.read_array(raw, pos)
    if items != 2:
        raise MalformedBundleError("a creation timestamp is [time, sequence]", offset=pos)
    time, pos = read_uint(raw, at)
    sequence, pos = read_uint(raw, pos)
    lifetime, pos = read_uint(raw, pos)
    is_fragment = flags & _IS_FRAGMENT
    expected = 8 + (2 if is_fragment else 0) + (crc_type != 0)
    if count != expected:
        raise MalformedBundleError(
            f"this primary block (fragment: {bool(is_fragment)}, CRC type {crc_type}) has "
            f"{expected} items, not {count}",
            offset=start,
        )
    offset = total = None
    if is_fragment:
        offset, pos = read_uint(raw, pos)
        total, pos = read_uint(raw, pos)
    if crc_type:
        pos = _check_crc(raw, start, pos, crc_type)
    try:
        primary = PrimaryBlock(
            destination,
            source,
            report_to,
            CreationTimestamp(time, sequence),
            lifetime,
            flags,
            _CRC_TYPES[crc_type],
            offset,
            total,
        )
    except InvalidBundleError as exc:
        raise MalformedBundleError(f"primary block: {exc}", offset=start) from None
    return primary, pos


def _read_block(raw: bytes, start: int) -> tuple[CanonicalBlock, int, int, int]:
    """Read the block at ``start``: (block, start and end of its data, end of block)."""
    first, fields = raw[start], raw[start + 1 : start + 5]
    if (first == 0x85 or first == 0x86) and len(fields) == 4 and max(fields) < 24:
        # The common header: type, number, flags and CRC type each one byte.
        block_type, number, flags, crc_type = fields
        count, pos = first - 0x80, start + 5
    else:
        read_uint = _cbor.read_uint
        count, pos = _cbor.read_array(raw, start)
        if count not in (5, 6):
            raise MalformedBundleError(
                f"a canonical block has 5 or 6 items, not {count}", offset=start
            )
        block_type, pos = read_uint(raw, pos)
        number, pos = read_uint(raw, pos)
        flags, pos = read_uint(raw, pos)
        crc_type, pos = read_uint(raw, pos)
    if crc_type > 2:
        raise MalformedBundleError(f"unknown CRC type {crc_type}", offset=pos - 1)
    if count != (6 if crc_type else 5):
        raise MalformedBundleError(
            f"a block with CRC type {crc_type} has {5 + (crc_type != 0)} items, not {count}",
            offset=start,
        )
    data_start, data_end = _cbor.read_string(raw, pos, _cbor.BYTES)
    data = raw[data_start:data_end]
    pos = data_end
    if crc_type:
        pos = _check_crc(raw, start, pos, crc_type)
    try:
        block = CanonicalBlock(block_type, number, data, flags, _CRC_TYPES[crc_type])
    except InvalidBundleError as exc:
        raise MalformedBundleError(str(exc), offset=start) from None
    return block, data_start, data_end, pos


def _check_crc(raw: bytes, start: int, pos: int, crc_type: int) -> int:
    """Check the CRC at ``pos`` of the block starting at ``start``; return its end."""
    value_start, end = _cbor.read_string(raw, pos, _cbor.BYTES)
    if end - value_start != _CRC_SIZE[crc_type]:
        raise MalformedBundleError(
            f"a CRC of type {crc_type} is {_CRC_SIZE[crc_type]} bytes, not {end - value_start}",
            offset=pos,
        )
    if crc_type == CrcType.CRC32C:  # inline: the CRC we emit, on every block
        computed = crc32c(b"\0\0\0\0", crc32c(memoryview(raw)[start:value_start]))
        matches = computed == int.from_bytes(raw[value_start:end], "big")
    else:
        matches = _crc(crc_type, memoryview(raw)[start:value_start]) == raw[value_start:end]
    if not matches:
        raise CrcMismatchError("the block's CRC does not match its bytes", offset=start)
    return end
