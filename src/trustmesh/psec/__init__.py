"""PSEC: security negotiation for packet-oriented transports (docs/protocols/psec.md).

``frames`` is the wire format; ``negotiation`` the sans-IO core that agrees on a scheme.
"""
