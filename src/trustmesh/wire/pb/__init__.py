"""Generated protobuf modules; each .proto here is the source of truth (scripts/gen-proto)."""
