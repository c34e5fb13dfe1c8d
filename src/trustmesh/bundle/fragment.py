"""Fragmentation (RFC 9171 §5.8) and ADU reassembly (§5.9); bundles.md §6.

A fragment carries the original bundle's primary block with IS_FRAGMENT set, its
payload's offset in the original ADU and the ADU's total length. Extension blocks go
into the first fragment; those flagged REPLICATE go into every fragment. Fragmenting a
fragment keeps offsets relative to the original ADU. Reassembly takes fragments in any
order, accepts overlaps whose bytes agree, and keeps only the bytes not held yet.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import replace

from trustmesh.bundle._cbor import head_size
from trustmesh.bundle.codec import (
    BlockFlag,
    Bundle,
    BundleFlag,
    CanonicalBlock,
    PrimaryBlock,
    payload_block,
)
from trustmesh.bundle.eid import Eid
from trustmesh.bundle.errors import BundleTooLargeError, FragmentError


def fragment(bundle: Bundle, max_bundle_size: int) -> list[Bundle]:
    """Split ``bundle`` into fragments whose encodings are each at most
    ``max_bundle_size`` bytes, in payload order. A bundle that fits is returned alone,
    unchanged. Raises FragmentError if it must not be fragmented or if no payload byte
    fits beside its blocks."""
    primary = bundle.primary
    if primary.flags & BundleFlag.MUST_NOT_FRAGMENT:
        raise FragmentError("the bundle's flags say it must not be fragmented")
    if bundle.encoded_size() <= max_bundle_size:
        return [bundle]
    payload = bundle.payload
    base = primary.fragment_offset or 0
    total = bundle.adu_length
    extensions = bundle.extensions
    replicated = tuple(b for b in extensions if b.flags & BlockFlag.REPLICATE)
    template = bundle.payload_block
    # The payload block's bytes besides its data and the data's length head.
    overhead = payload_block(b"", flags=template.flags, crc_type=template.crc_type)
    payload_overhead = overhead.encoded_size() - 1
    sizes = {id(b): b.encoded_size() for b in extensions}
    fragments = []
    pos = 0
    while pos < len(payload):
        blocks = extensions if pos == 0 else replicated
        head = replace(
            primary,
            flags=primary.flags | BundleFlag.IS_FRAGMENT,
            fragment_offset=base + pos,
            total_adu_length=total,
        )
        fixed = 2 + len(head.encode()) + sum(sizes[id(b)] for b in blocks) + payload_overhead
        room = max_bundle_size - fixed
        size = room - 1
        while size > 0 and size + head_size(size) > room:
            size -= 1
        if size < 1:
            raise FragmentError(
                f"a fragment of at most {max_bundle_size} bytes has no room for payload "
                f"beside its {fixed} bytes of blocks"
            )
        size = min(size, len(payload) - pos)
        chunk = payload[pos : pos + size]
        fragments.append(Bundle(head, (*blocks, replace(template, data=chunk))))
        pos += size
    return fragments


def adu_key(bundle: Bundle) -> tuple[Eid, int, int]:
    """What the fragments of one ADU share: source, creation time, sequence number."""
    creation = bundle.primary.creation
    return bundle.primary.source, creation.time, creation.sequence


def _signature(primary: PrimaryBlock) -> PrimaryBlock:
    """The primary block without its fragment offset: equal for every fragment of an ADU."""
    return replace(primary, fragment_offset=0)


class Reassembly:
    """The fragments received so far of one ADU. ``add`` returns the whole bundle once
    its payload is complete; after that the reassembly is done and takes no more.

    Only payload bytes not held yet are kept (``held_bytes``); an ADU longer than
    ``max_bytes`` is refused with BundleTooLargeError at its first fragment."""

    def __init__(self, *, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._signature: PrimaryBlock | None = None
        self._starts: list[int] = []  # sorted starts of the disjoint extents held
        self._pieces: dict[int, bytes] = {}
        self._held = 0
        self._first: Bundle | None = None  # the fragment at offset 0: its blocks lead
        self.done = False

    @property
    def held_bytes(self) -> int:
        return self._held

    @property
    def total_adu_length(self) -> int | None:
        return None if self._signature is None else self._signature.total_adu_length

    @property
    def complete(self) -> bool:
        return self._signature is not None and self._held == self._signature.total_adu_length

    def add(self, fragment: Bundle) -> Bundle | None:
        """Take one fragment; the reassembled bundle if it completes the ADU, else None.

        Raises FragmentError if the fragment is not one, disagrees with those before it
        (primary block fields, total ADU length, overlapping bytes), or comes after the
        ADU was reassembled."""
        self._take(fragment)
        return self._result() if self.complete else None

    def _take(self, fragment: Bundle) -> None:
        if self.done:
            raise FragmentError("this ADU is already reassembled")
        primary = fragment.primary
        if primary.fragment_offset is None or primary.total_adu_length is None:
            raise FragmentError("not a fragment (its IS_FRAGMENT flag is clear)")
        signature = _signature(primary)
        if self._signature is None:
            if primary.total_adu_length > self.max_bytes:
                raise BundleTooLargeError(
                    f"an ADU of {primary.total_adu_length} bytes is over {self.max_bytes}"
                )
            self._signature = signature
        elif signature != self._signature:
            if signature.total_adu_length != self._signature.total_adu_length:
                raise FragmentError(
                    f"fragments disagree on the ADU's length: {signature.total_adu_length} "
                    f"and {self._signature.total_adu_length}"
                )
            raise FragmentError("fragments of one ADU disagree on their primary block")
        offset = primary.fragment_offset
        if offset == 0 and self._first is None:
            self._first = fragment
        self._store(offset, fragment.payload)

    def _store(self, offset: int, data: bytes) -> None:
        """Keep the bytes of ``data`` (at ``offset``) not held yet; bytes held already
        must be equal."""
        end = offset + len(data)
        starts, pieces = self._starts, self._pieces
        index = max(bisect.bisect_right(starts, offset) - 1, 0)
        new: list[tuple[int, int]] = []  # gaps of [offset, end) to keep
        cursor = offset
        while index < len(starts) and starts[index] < end:
            start = starts[index]
            piece = pieces[start]
            stop = start + len(piece)
            if stop > cursor:
                if start > cursor:
                    new.append((cursor, start))
                low, high = max(start, offset), min(stop, end)
                if piece[low - start : high - start] != data[low - offset : high - offset]:
                    raise FragmentError(
                        f"fragments disagree on the ADU's bytes {low} to {high - 1}"
                    )
                cursor = max(cursor, high)
            index += 1
        if cursor < end:
            new.append((cursor, end))
        for start, stop in new:
            bisect.insort(starts, start)
            pieces[start] = data[start - offset : stop - offset]
            self._held += stop - start

    def _result(self) -> Bundle:
        assert self._signature is not None  # complete, so a fragment came
        assert self._first is not None  # complete, so byte 0 came
        self.done = True
        adu = b"".join(self._pieces[start] for start in self._starts)
        self._starts, self._pieces = [], {}
        primary = replace(
            self._signature,
            flags=self._signature.flags & ~int(BundleFlag.IS_FRAGMENT),
            fragment_offset=None,
            total_adu_length=None,
        )
        first = self._first
        blocks: tuple[CanonicalBlock, ...] = (
            *first.extensions,
            replace(first.payload_block, data=adu),
        )
        return Bundle(primary, blocks)


def reassemble(fragments: Iterable[Bundle], *, max_bytes: int | None = None) -> Bundle | None:
    """The bundle the ``fragments`` (of one ADU, in any order) make up, or None while a
    gap remains. Raises FragmentError on fragments that disagree."""
    reassembly = Reassembly(max_bytes=max_bytes if max_bytes is not None else 1 << 64)
    for each in fragments:
        reassembly._take(each)
    return reassembly._result() if reassembly.complete else None
