"""The committed protobuf modules are exactly what the pinned protoc makes of the .proto.

The .proto is the source of truth. If this fails, run scripts/gen-proto and commit.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import trustmesh.wire.pb

PB_DIR = Path(trustmesh.wire.pb.__file__).parent
SRC_ROOT = PB_DIR.parents[2]  # the directory that holds the trustmesh package
PROTOS = sorted(PB_DIR.glob("*.proto"))


def test_there_are_protos() -> None:
    assert [p.name for p in PROTOS] == ["botd.proto"]


@pytest.mark.parametrize("proto", PROTOS, ids=lambda p: p.name)
def test_generated_modules_match_the_proto(proto: Path, tmp_path: Path) -> None:
    relative = proto.relative_to(SRC_ROOT)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{SRC_ROOT}",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            str(relative),
        ],
        check=True,
        timeout=60,
    )
    for suffix in ("_pb2.py", "_pb2.pyi"):
        name = proto.stem + suffix
        fresh = (tmp_path / relative.parent / name).read_text()
        committed = (PB_DIR / name).read_text()
        assert committed == fresh, f"{name} is stale: run scripts/gen-proto"


def test_generated_module_carries_the_spec_fields() -> None:
    from trustmesh.wire.pb import botd_pb2

    fields = {
        name: [f.name for f in botd_pb2.DESCRIPTOR.message_types_by_name[name].fields]
        for name in ("Init", "Ack", "Ping", "Pong")
    }
    assert fields == {
        "Init": ["id", "sender_pubkey", "recipient_pubkey", "ephemeral_pubkey", "signature"],
        "Ack": ["id", "init_id", "ephemeral_pubkey", "signature"],
        "Ping": ["id"],
        "Pong": ["id", "ping_id"],
    }
    numbers = [f.number for f in botd_pb2.Init.DESCRIPTOR.fields]
    assert numbers == [1, 2, 3, 4, 5]
