"""Bundle IDs and DTN time (docs/protocols/bundles.md §3).

A bundle is identified by its source node, its creation timestamp (DTN time in ms,
sequence number) and, for a fragment, its fragment offset (RFC 9171 §4.3.1). The text
form is ``<source node>:<creation ms>:<sequence>[:<offset>]``, every number decimal
without leading zeros, e.g. ``node-a.example:799999999123:0`` or ``node-a:5:1:4096``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from trustmesh.bundle.eid import Eid, Scheme
from trustmesh.bundle.errors import BadBundleIdError, InvalidBundleError

DTN_EPOCH_UNIX_MS = 946_684_800_000  # 2000-01-01T00:00:00Z in Unix milliseconds
_MAX_UINT = (1 << 64) - 1
_NUMBER = r"(0|[1-9][0-9]{0,19})"
_TEXT = re.compile(rf"(~?[A-Za-z0-9._-]{{1,253}}):{_NUMBER}:{_NUMBER}(?::{_NUMBER})?")
_NODE = re.compile(r"~?[A-Za-z0-9._-]{1,253}")


def unix_ms_to_dtn_ms(unix_ms: int) -> int:
    """DTN time (ms since 2000-01-01 UTC) of a Unix time in ms; 0 means "unknown" in a
    bundle, so a time at or before the DTN epoch has none (InvalidBundleError)."""
    if unix_ms <= DTN_EPOCH_UNIX_MS:
        raise InvalidBundleError(f"Unix time {unix_ms} ms is not after the DTN epoch")
    return unix_ms - DTN_EPOCH_UNIX_MS


def dtn_ms_to_unix_ms(dtn_ms: int) -> int:
    """Unix time in ms of a DTN time (which must not be 0, "unknown")."""
    if dtn_ms <= 0:
        raise InvalidBundleError("DTN time 0 means the creation time is unknown")
    return dtn_ms + DTN_EPOCH_UNIX_MS


@dataclass(frozen=True, slots=True)
class BundleId:
    """The identity of a bundle: source node name, creation time (DTN ms), sequence
    number, and fragment offset (None for a whole bundle)."""

    node: str
    creation_ms: int
    sequence: int
    fragment_offset: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.node, str) or not _NODE.fullmatch(self.node):
            raise BadBundleIdError(f"{self.node!r:.60} is not a dtn node name")
        for value in (self.creation_ms, self.sequence, self.fragment_offset):
            if value is not None and (type(value) is not int or not 0 <= value <= _MAX_UINT):
                raise BadBundleIdError(f"{value!r:.30} is not an unsigned 64-bit integer")

    @classmethod
    def of(
        cls, source: Eid, creation_ms: int, sequence: int, fragment_offset: int | None = None
    ) -> BundleId:
        """The ID of a bundle from ``source``; only a dtn source has one (an anonymous
        bundle, from dtn:none, is not identifiable; we do not name ipn nodes)."""
        if source.scheme != Scheme.DTN or source.is_null:
            raise BadBundleIdError(f"a bundle from {source} has no bundle ID")
        return cls(source.node, creation_ms, sequence, fragment_offset)

    @classmethod
    def parse(cls, text: str) -> BundleId:
        if not isinstance(text, str):
            raise BadBundleIdError(f"a bundle ID is text, not {type(text).__name__}")
        match = _TEXT.fullmatch(text)
        if match is None:
            shown = repr(text[:60]) + ("\u2026" if len(text) > 60 else "")
            raise BadBundleIdError(f"{shown} is not <node>:<creation ms>:<sequence>[:<offset>]")
        node, creation, sequence, offset = match.groups()
        return cls(node, int(creation), int(sequence), None if offset is None else int(offset))

    @property
    def source(self) -> Eid:
        """The source's node ID, ``dtn://<node>/``."""
        return Eid.dtn(self.node)

    @property
    def is_fragment(self) -> bool:
        return self.fragment_offset is not None

    @property
    def whole(self) -> BundleId:
        """The ID of the bundle (ADU) this fragment belongs to."""
        return BundleId(self.node, self.creation_ms, self.sequence)

    def __str__(self) -> str:
        text = f"{self.node}:{self.creation_ms}:{self.sequence}"
        return text if self.fragment_offset is None else f"{text}:{self.fragment_offset}"
