"""Who may peer: a hook the session asks once the peer's OPEN has passed every check.

A policy sees the peer's proven identity (certificate names, BGP identifier, ASN, the
PSK key id it proved and the RFC 7638 thumbprint of its JWS key) and returns None to
allow, or a reason to refuse; a refusal is NOTIFICATION 2/246. :class:`CedarPolicy`
evaluates Cedar policies (https://www.cedarpolicy.com) against :data:`CEDAR_SCHEMA`,
which they are validated against when loaded, so a misspelt attribute is an error at
start, not a silent deny.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import cedarpy

CEDAR_SCHEMA = """
entity Node { asn: Long };
entity Peer { asn: Long, names: Set<String> };
action peer appliesTo {
  principal: Peer,
  resource: Node,
  context: {
    direction: String,
    psk: Bool,
    psk_key_id?: String,
    jws: Bool,
    jws_kid?: String,
    capabilities: Set<String>,
  }
};
"""


@dataclass(frozen=True)
class PeeringRequest:
    """A peer whose OPEN passed the certificate, ASN, PSK and JWS checks."""

    local_asn: int
    local_identifier: str
    peer_asn: int
    peer_identifier: str
    certificate_names: frozenset[str]
    psk_key_id: str | None  # the key id whose proof verified, if any
    jws_kid: str | None  # RFC 7638 thumbprint of the key whose signature verified, if any
    capabilities: tuple[str, ...]
    initiator: bool  # we dialled the peer

    @property
    def direction(self) -> str:
        return "outbound" if self.initiator else "inbound"


class PeeringPolicy(Protocol):
    def decide(self, request: PeeringRequest) -> str | None:
        """None to allow the session; otherwise why it is refused."""


class CedarPolicy:
    """Cedar policies over ``Peer`` (principal), ``Action::"peer"`` and ``Node``
    (resource, this node). Default deny: a session needs a ``permit`` and no ``forbid``.

    Example, permitting AS 65001 only with a proven PSK::

        permit(principal, action == Action::"peer", resource)
        when { principal.asn == 65001 && context.psk };
    """

    def __init__(self, text: str, *, source: str = "policy") -> None:
        self._schema = cedarpy.Schema.from_str(CEDAR_SCHEMA)
        result = cedarpy.validate_policies(text, self._schema)
        if not result.validation_passed:
            problems = "; ".join(str(e) for e in result.errors) or "invalid policy"
            raise ValueError(f"{source}: {problems}")
        self._policies = cedarpy.PolicySet.from_str(text)

    @classmethod
    def from_file(cls, path: Path) -> CedarPolicy:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read Cedar policy {path}: {exc}") from None
        return cls(text, source=str(path))

    def decide(self, request: PeeringRequest) -> str | None:
        peer = {"type": "Peer", "id": request.peer_identifier}
        node = {"type": "Node", "id": request.local_identifier}
        context: dict[str, Any] = {
            "direction": request.direction,
            "psk": request.psk_key_id is not None,
            "jws": request.jws_kid is not None,
            "capabilities": list(request.capabilities),
        }
        if request.psk_key_id is not None:
            context["psk_key_id"] = request.psk_key_id
        if request.jws_kid is not None:
            context["jws_kid"] = request.jws_kid
        entities = [
            {
                "uid": peer,
                "attrs": {"asn": request.peer_asn, "names": sorted(request.certificate_names)},
                "parents": [],
            },
            {"uid": node, "attrs": {"asn": request.local_asn}, "parents": []},
        ]
        cedar_request = {
            "principal": peer,
            "action": {"type": "Action", "id": "peer"},
            "resource": node,
            "context": context,
        }
        result = cedarpy.is_authorized(cedar_request, self._policies, entities, self._schema)
        if result.allowed:
            return None
        diagnostics = result.diagnostics
        if diagnostics.errors:
            return "policy evaluation failed: " + "; ".join(map(str, diagnostics.errors))
        if diagnostics.reasons:
            return "forbidden by policy " + ", ".join(diagnostics.reasons)
        return "no policy permits this peer"
