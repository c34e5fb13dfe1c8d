"""Bundle Protocol errors (docs/protocols/bundles.md §5).

    ProtocolError
    └── BundleError
        ├── InvalidBundleError      (also ValueError) we were asked to build a bundle,
        │                           block or ID that RFC 9171 forbids: a local bug
        ├── MalformedBundleError    (also DecodeError) received bytes are not a bundle:
        │   │                       bad CBOR, wrong shape or type, trailing bytes, a
        │   │                       definite outer array, a rule of RFC 9171 broken
        │   ├── BadEidError         an endpoint ID, as text or inside a bundle
        │   └── CrcMismatchError    a block's CRC does not match its bytes
        ├── BundleTooLargeError     (also OversizeError) over the size limit in force,
        │                           checked before any parsing
        ├── UnknownCriticalBlockError  a block we cannot process asks for the bundle's
        │                           deletion ("delete bundle if block can't be processed")
        ├── BadBundleIdError        (also DecodeError) a bundle ID's text form is malformed,
        │                           or a bundle has no bundle ID (anonymous, ipn source)
        └── FragmentError           fragmentation refused, or fragments that disagree

Every error a peer can cause is a :class:`BundleError`; a decoder or parser never lets
IndexError, KeyError, ValueError, UnicodeDecodeError or RecursionError escape.
"""

from __future__ import annotations

from trustmesh.errors import DecodeError, OversizeError, ProtocolError


class BundleError(ProtocolError):
    """Root of the Bundle Protocol errors."""


class InvalidBundleError(BundleError, ValueError):
    """A bundle, block or value we were asked to build breaks RFC 9171 (local misuse).

    The decoder turns it into a :class:`MalformedBundleError` when the value came from
    the wire."""


class MalformedBundleError(BundleError, DecodeError):
    """Received bytes are not a well-formed RFC 9171 bundle; ``offset`` says where."""


class BadEidError(MalformedBundleError):
    """An endpoint ID is malformed, in its text form or in its CBOR form."""


class CrcMismatchError(MalformedBundleError):
    """A block's CRC does not match its bytes: the bundle was corrupted on its way."""


class BundleTooLargeError(BundleError, OversizeError):
    """A bundle (or an ADU under reassembly) is over the size limit in force."""


class UnknownCriticalBlockError(BundleError):
    """A block of a type we cannot process carries "delete bundle if block can't be
    processed" (RFC 9171 §5.6 step 4): the bundle must be deleted.

    ``report_requested`` is the block's "transmit status report" flag."""

    def __init__(self, block_type: int, block_number: int, *, report_requested: bool) -> None:
        self.block_type = block_type
        self.block_number = block_number
        self.report_requested = report_requested
        super().__init__(
            f"block {block_number} of unknown type {block_type} requires the bundle's deletion"
        )


class BadBundleIdError(BundleError, DecodeError):
    """A bundle ID's text form is malformed, or a bundle has no bundle ID."""


class FragmentError(BundleError):
    """A bundle cannot be fragmented, or fragments of one ADU disagree."""
