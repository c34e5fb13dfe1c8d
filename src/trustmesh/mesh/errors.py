"""Mesh errors: what a node refuses, and why.

A link answers each with a ``close`` frame naming its code (docs/protocols/mesh-link.md);
the HTTP API maps them to 400, 403 and 429.
"""

from __future__ import annotations

from trustmesh.errors import DecodeError, ProtocolError


class MeshError(ProtocolError):
    """Root of the mesh's errors."""


class MalformedMessage(DecodeError, MeshError):
    """A link frame or gossip message does not parse, or breaks a field rule."""


class BadMessageId(MalformedMessage):
    """A gossip message whose id is not derived from its origin and content
    (docs/protocols/mesh-link.md section 5): no node but the origin could have made it
    under that id, and an honest relay never forwards it."""

    code = "bad-message-id"


class GossipRejected(MeshError):
    """A well-formed gossip message that this node will not accept or forward."""

    code = "rejected"


class BadSignature(GossipRejected):
    """The signature does not verify under the origin's certificate: the sender is cut off."""

    code = "bad-signature"


class UntrustedOrigin(GossipRejected):
    """The origin's certificate is missing, does not chain to the mesh CA, or names
    another node."""

    code = "untrusted-origin"


class RevokedOrigin(GossipRejected):
    """The origin's certificate is revoked."""

    code = "revoked"


class ExpiredMessage(GossipRejected):
    """The message's expiry has passed, its lifetime is too long, or it is from the future."""

    code = "expired"


class RateLimited(GossipRejected):
    """The sending peer is over its gossip rate."""

    code = "rate-limited"
