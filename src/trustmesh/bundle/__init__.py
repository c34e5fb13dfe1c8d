"""Bundle Protocol version 7 (RFC 9171), byte-exact and strict (docs/protocols/bundles.md).

``eid`` holds endpoint IDs, ``ids`` bundle IDs and DTN time, ``codec`` the blocks and
bundles with their encoder and decoder, ``fragment`` fragmentation and reassembly, and
``errors`` the error tree.
"""
