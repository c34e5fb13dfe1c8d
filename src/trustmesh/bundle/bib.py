"""The source's signature on a bundle: a Block Integrity Block (RFC 9172) in a security
context of our own (docs/protocols/bundles.md section 7).

The BIB (block type 11) targets the payload block. Its block-type-specific data is the
Abstract Security Block of RFC 9172 section 3.6, a CBOR sequence:

    [1]                         security targets: the payload block
    -1                          security context id (negative: local use, RFC 9172 9.4)
    1                           context flags: parameters present
    dtn://<source node_id>/     security source
    [[1, [cert DER, ...]]]      parameter 1: the source's certificate chain, leaf first
    [[[1, signature]]]          for the one target, result 1: the signature

The signature (ECDSA P-256 with SHA-256, DER; or Ed25519) covers, as RFC 9173's
integrity-protected plaintext does with every scope flag set: a label, the primary
block's encoding (destination, source, creation, lifetime, fragment fields, CRC), the
payload block's [type, number, flags], the BIB's own [type, number, flags], and the
payload as a CBOR byte string. The mutable blocks (hop count, previous node, bundle
age) are outside it, so relays may update them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from trustmesh.bundle import _cbor
from trustmesh.bundle.codec import BlockType, Bundle, CanonicalBlock
from trustmesh.bundle.eid import Eid, node_eid, read_eid
from trustmesh.bundle.errors import BundleError, MalformedBundleError

SIGNING_LABEL = b"trustmesh-bundle-bib/1\n"
CONTEXT_ID = -1
PARAM_CHAIN = 1
RESULT_SIGNATURE = 1
MAX_CHAIN = 4
MAX_CERT = 8 * 1024
MAX_SIGNATURE = 256


class SignatureBlockError(BundleError):
    """A bundle without our source signature block, or with one that is malformed."""


@dataclass(frozen=True, slots=True)
class SourceSignature:
    source: Eid  # the security source
    chain: tuple[bytes, ...]  # DER, leaf first
    signature: bytes
    block: CanonicalBlock


def signing_input(bundle: Bundle, bib_number: int, bib_flags: int) -> bytes:
    payload = bundle.payload_block
    uint = _cbor.uint
    return b"".join(
        (
            SIGNING_LABEL,
            bundle.primary.encode(),
            b"\x83" + uint(payload.block_type) + uint(payload.number) + uint(payload.flags),
            b"\x83" + uint(BlockType.BIB) + uint(bib_number) + uint(bib_flags),
            _cbor.head(_cbor.BYTES, len(payload.data)),
            payload.data,
        )
    )


def sign_bundle(
    bundle: Bundle, node_id: str, chain: Sequence[bytes], sign: Callable[[bytes], bytes]
) -> Bundle:
    """``bundle`` with a BIB signed by ``sign`` (any old BIB of ours replaced)."""
    old = find_signature_block(bundle)
    if old is not None:
        bundle = bundle.without_block(old.number)
    number = bundle.next_block_number()
    signature = sign(signing_input(bundle, number, 0))
    return bundle.with_block(CanonicalBlock(BlockType.BIB, number, _asb(node_id, chain, signature)))


def find_signature_block(bundle: Bundle) -> CanonicalBlock | None:
    """Our BIB: type 11 with our context id (other BIBs are left alone)."""
    for block in bundle.extensions:
        if block.block_type == BlockType.BIB and _context_of(block.data) == CONTEXT_ID:
            return block
    return None


def read_signature(bundle: Bundle) -> SourceSignature:
    """The source signature of ``bundle`` (raises :class:`SignatureBlockError`)."""
    block = find_signature_block(bundle)
    if block is None:
        raise SignatureBlockError("the bundle carries no source signature block")
    try:
        return _parse(block)
    except MalformedBundleError as exc:
        raise SignatureBlockError(f"the source signature block is malformed: {exc}") from None


def _asb(node_id: str, chain: Sequence[bytes], signature: bytes) -> bytes:
    head, uint = _cbor.head, _cbor.uint
    certs = b"".join(head(_cbor.BYTES, len(der)) + der for der in chain)
    return b"".join(
        (
            b"\x81\x01",  # targets: [1]
            head(1, -1 - CONTEXT_ID),  # a negative integer
            b"\x01",  # flags: parameters present
            node_eid(node_id).to_cbor(),
            b"\x81\x82" + uint(PARAM_CHAIN) + head(_cbor.ARRAY, len(chain)) + certs,
            b"\x81\x81\x82" + uint(RESULT_SIGNATURE),
            head(_cbor.BYTES, len(signature)),
            signature,
        )
    )


def _context_of(data: bytes) -> int | None:
    """The context id of an ASB, or None if it does not start as one."""
    try:
        count, pos = _cbor.read_array(data, 0)
        for _ in range(min(count, 16)):
            _, pos = _cbor.read_uint(data, pos)
        if pos < len(data) and data[pos] >> 5 == 1:
            value, _ = _cbor.read_head(data, pos, 1)
            return -1 - value
        value, _ = _cbor.read_uint(data, pos)
        return value
    except MalformedBundleError:
        return None


def _parse(block: CanonicalBlock) -> SourceSignature:
    data = block.data

    def expect(pos: int, want: bytes, what: str) -> int:
        if data[pos : pos + len(want)] != want:
            raise MalformedBundleError(f"expected {what}", offset=pos)
        return pos + len(want)

    pos = expect(0, b"\x81\x01", "the payload block as the only target")
    pos = expect(pos, _cbor.head(1, -1 - CONTEXT_ID) + b"\x01", "our context, with parameters")
    source, pos = read_eid(data, pos)
    pos = expect(pos, b"\x81\x82" + _cbor.uint(PARAM_CHAIN), "one parameter: the chain")
    count, pos = _cbor.read_array(data, pos)
    if not 1 <= count <= MAX_CHAIN:
        raise MalformedBundleError(f"a chain of 1..{MAX_CHAIN} certificates", offset=pos)
    chain = []
    for _ in range(count):
        start, pos = _cbor.read_string(data, pos, _cbor.BYTES)
        if pos - start > MAX_CERT:
            raise MalformedBundleError(f"a certificate over {MAX_CERT} bytes", offset=start)
        chain.append(data[start:pos])
    pos = expect(pos, b"\x81\x81\x82" + _cbor.uint(RESULT_SIGNATURE), "one result: the signature")
    start, pos = _cbor.read_string(data, pos, _cbor.BYTES)
    if pos != len(data):
        raise MalformedBundleError("bytes after the security results", offset=pos)
    if not 0 < pos - start <= MAX_SIGNATURE:
        raise MalformedBundleError(f"a signature of 1..{MAX_SIGNATURE} bytes", offset=start)
    return SourceSignature(source, tuple(chain), data[start:pos], block)
