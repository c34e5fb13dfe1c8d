"""Endpoint IDs (RFC 9171 §4.2.5.1), in text and in CBOR (docs/protocols/bundles.md §2).

    dtn:none            [1, 0]                 the null endpoint
    dtn://node/demux    [1, "//node/demux"]    dtn scheme, code 1
    ipn:N.S             [2, [N, S]]            ipn scheme, code 2 (accepted, not emitted)

We accept a strict subset of the dtn grammar: a node name of 1 to 253 letters, digits,
``-``, ``.`` and ``_`` with an optional leading ``~``, then ``/`` and a demux of
printable US-ASCII (VCHAR, possibly empty), the whole text at most ``MAX_EID_TEXT``
characters. ipn numbers are decimal without leading zeros, each below 2**64.

A trustmesh node's inbox is ``dtn://<node_id>/inbox``; its node ID (RFC 9171 §4.2.5.2,
an empty demux) is ``dtn://<node_id>/``; the mesh-wide broadcast is
``dtn://~mesh/inbox``. RFC 9171 marks a non-singleton dtn endpoint by a ``~`` as the
first character of the *demux*; our broadcast puts it on the node name, which no node_id
can start with, so :func:`is_broadcast` (not :attr:`Eid.is_singleton`) is what tells it.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

from trustmesh.bundle import _cbor
from trustmesh.bundle.errors import BadEidError, MalformedBundleError

MAX_EID_TEXT = 1024  # characters of an EID's text form, "dtn:" or "ipn:" included
_DTN_SSP = re.compile(r"//(~?[A-Za-z0-9._-]{1,253})/([\x21-\x7e]*)")
_IPN_SSP = re.compile(r"(0|[1-9][0-9]{0,19})\.(0|[1-9][0-9]{0,19})")
# The node_id rule of trustmesh.pki.ca.NODE_ID (a DNS name), kept here so that this
# codec does not import the PKI; tests/bundle checks that the two agree.
NODE_ID = re.compile(
    r"(?=.{1,253}\Z)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*\Z"
)


class Scheme(enum.IntEnum):
    """Bundle Protocol URI scheme codes (RFC 9171 §9.6)."""

    DTN = 1
    IPN = 2


@dataclass(frozen=True, slots=True)
class Eid:
    """An endpoint ID. ``ssp`` is the dtn scheme-specific part as text (``"none"`` or
    ``"//node/demux"``) or the ipn pair (node number, service number).

    Build one with :meth:`parse`, :meth:`dtn` or :meth:`ipn`; construction validates,
    raising :class:`BadEidError`, and prepares the CBOR form once."""

    scheme: Scheme
    ssp: str | tuple[int, int]
    _cbor: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_cbor", _encode(self.scheme, self.ssp))

    @classmethod
    def parse(cls, text: str) -> Eid:
        """An EID from its text form, e.g. ``dtn://node-a/inbox`` or ``ipn:1.2``."""
        if not isinstance(text, str):
            raise BadEidError(f"an EID is text, not {type(text).__name__}")
        if len(text) > MAX_EID_TEXT:
            raise BadEidError(f"an EID of {len(text)} characters is over {MAX_EID_TEXT}")
        if text.startswith("dtn:"):
            return cls(Scheme.DTN, text[4:])
        if text.startswith("ipn:"):
            match = _IPN_SSP.fullmatch(text, 4)
            if match is None:
                raise BadEidError(f"{_quoted(text)} is not ipn:<node>.<service>")
            return cls(Scheme.IPN, (int(match[1]), int(match[2])))
        raise BadEidError(f"{_quoted(text)} is not a dtn: or ipn: endpoint ID")

    @classmethod
    def dtn(cls, node: str, demux: str = "") -> Eid:
        """``dtn://<node>/<demux>``."""
        return cls(Scheme.DTN, f"//{node}/{demux}")

    @classmethod
    def ipn(cls, node: int, service: int) -> Eid:
        """``ipn:<node>.<service>``."""
        return cls(Scheme.IPN, (node, service))

    @classmethod
    def from_cbor(cls, data: bytes) -> Eid:
        """An EID from exactly its CBOR encoding (nothing may follow it)."""
        data = bytes(data)
        eid, end = read_eid(data, 0)
        if end != len(data):
            raise BadEidError(f"{len(data) - end} bytes after the endpoint ID", offset=end)
        return eid

    def to_cbor(self) -> bytes:
        return self._cbor

    def __str__(self) -> str:
        if isinstance(self.ssp, tuple):
            return f"ipn:{self.ssp[0]}.{self.ssp[1]}"
        return f"dtn:{self.ssp}"

    @property
    def text(self) -> str:
        return str(self)

    @property
    def is_null(self) -> bool:
        """Whether this is ``dtn:none``, the endpoint that never has members."""
        return self.ssp == "none"

    @property
    def node(self) -> str:
        """The dtn node name, or the ipn node number in decimal ("" for dtn:none)."""
        if isinstance(self.ssp, tuple):
            return str(self.ssp[0])
        return "" if self.ssp == "none" else self.ssp[2 : self.ssp.index("/", 2)]

    @property
    def service(self) -> str:
        """The dtn demux, or the ipn service number in decimal ("" for dtn:none)."""
        if isinstance(self.ssp, tuple):
            return str(self.ssp[1])
        return "" if self.ssp == "none" else self.ssp[self.ssp.index("/", 2) + 1 :]

    @property
    def is_singleton(self) -> bool:
        """RFC 9171 §4.2.5.1: every ipn EID is; a dtn EID is unless its demux starts
        with ``~``; the null endpoint is not (it has no member)."""
        if isinstance(self.ssp, tuple):
            return True
        return not self.is_null and not self.service.startswith("~")

    @property
    def node_id(self) -> Eid:
        """The ID of the node this endpoint names (RFC 9171 §4.2.5.2): ``dtn://node/``
        or ``ipn:N.0``."""
        if isinstance(self.ssp, tuple):
            return Eid.ipn(self.ssp[0], 0)
        if self.is_null:
            raise BadEidError("dtn:none names no node")
        return Eid.dtn(self.node)


def _encode(scheme: int, ssp: object) -> bytes:
    """Validate an EID's parts and return its CBOR encoding."""
    if scheme == Scheme.DTN and isinstance(ssp, str):
        if ssp == "none":
            return b"\x82\x01\x00"
        if len(ssp) + 4 > MAX_EID_TEXT:
            raise BadEidError(f"an EID of {len(ssp) + 4} characters is over {MAX_EID_TEXT}")
        if _DTN_SSP.fullmatch(ssp) is None:
            raise BadEidError(
                f"{_quoted('dtn:' + ssp)} is not dtn:none or dtn://<node-name>/<demux>"
            )
        raw = ssp.encode("ascii")  # the pattern admits ASCII only
        return b"\x82\x01" + _cbor.head(_cbor.TEXT, len(raw)) + raw
    if scheme == Scheme.IPN and isinstance(ssp, tuple) and len(ssp) == 2:
        node, service = ssp
        if not (_is_uint(node) and _is_uint(service)):
            raise BadEidError(f"ipn numbers are integers from 0 to 2**64-1, not {ssp!r}")
        return b"\x82\x02\x82" + _cbor.uint(node) + _cbor.uint(service)
    raise BadEidError(f"not an endpoint ID: scheme {scheme!r}, SSP {ssp!r:.60}")


def _is_uint(value: object) -> bool:
    return type(value) is int and 0 <= value <= _cbor.MAX_UINT


_SEEN: dict[bytes, Eid] = {}  # CBOR form -> EID: peers repeat a few EIDs
_MAX_SEEN = 4096


def read_eid(data: bytes, pos: int) -> tuple[Eid, int]:
    """Read an EID's CBOR form at ``pos``: (the EID, the position after it)."""
    if data[pos : pos + 2] == b"\x82\x01" and pos + 3 < len(data):
        # A dtn EID seen before: keys are valid canonical encodings, so a hit is exact.
        first = data[pos + 2]
        if 0x60 <= first < 0x78:
            end = pos + 3 + first - 0x60
        else:
            end = pos + 4 + data[pos + 3] if first == 0x78 else 0
        eid = _SEEN.get(data[pos:end])
        if eid is not None:
            return eid, end
    try:
        count, at = _cbor.read_array(data, pos)
        if count != 2:
            raise BadEidError(f"an endpoint ID is an array of 2 items, not {count}", offset=pos)
        scheme, at = _cbor.read_uint(data, at)
        if scheme == Scheme.DTN:
            if at < len(data) and data[at] == 0:  # the uint 0: dtn:none
                return NULL_EID, at + 1
            start, stop = _cbor.read_string(data, at, _cbor.TEXT)
            if stop - start + 4 > MAX_EID_TEXT:
                raise BadEidError(f"an EID of {stop - start + 4} characters", offset=at)
            try:
                ssp = data[start:stop].decode("ascii")
            except UnicodeDecodeError:
                raise BadEidError("a dtn EID is US-ASCII", offset=start) from None
            eid = Eid(Scheme.DTN, ssp)
            if len(_SEEN) >= _MAX_SEEN:
                _SEEN.clear()
            _SEEN[eid.to_cbor()] = eid
            return eid, stop
        if scheme == Scheme.IPN:
            count, at = _cbor.read_array(data, at)
            if count != 2:
                raise BadEidError(f"an ipn SSP is 2 numbers, not {count}", offset=at)
            node, at = _cbor.read_uint(data, at)
            service, at = _cbor.read_uint(data, at)
            return Eid(Scheme.IPN, (node, service)), at
        raise BadEidError(f"unknown URI scheme code {scheme}", offset=pos)
    except BadEidError as exc:
        if exc.offset is None:
            raise BadEidError(str(exc), offset=pos) from None
        raise
    except MalformedBundleError as exc:
        raise BadEidError(f"bad endpoint ID: {exc}", offset=exc.offset) from None


def _quoted(text: str, limit: int = 60) -> str:
    return repr(text[:limit]) + ("\u2026" if len(text) > limit else "")


NULL_EID = Eid(Scheme.DTN, "none")
BROADCAST = Eid.dtn("~mesh", "inbox")


def check_node_id(node_id: str) -> str:
    """``node_id`` if it is a trustmesh node_id (a DNS name), else :class:`BadEidError`."""
    if not isinstance(node_id, str) or not NODE_ID.match(node_id):
        raise BadEidError(f"{node_id!r:.60} is not a node_id (a lowercase DNS name)")
    return node_id


def inbox(node_id: str) -> Eid:
    """``dtn://<node_id>/inbox``: where a node receives bundles."""
    return Eid.dtn(check_node_id(node_id), "inbox")


def node_eid(node_id: str) -> Eid:
    """``dtn://<node_id>/``: the node's ID (RFC 9171 §4.2.5.2), for source and previous
    node fields."""
    return Eid.dtn(check_node_id(node_id))


def is_broadcast(eid: Eid) -> bool:
    """Whether ``eid`` is the mesh-wide broadcast endpoint ``dtn://~mesh/inbox``."""
    return eid == BROADCAST
