"""Catalyst peering: the RFC 4271-style session over TLS 1.3 mTLS (docs/protocols/catalyst.md)."""
