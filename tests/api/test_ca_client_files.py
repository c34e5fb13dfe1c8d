"""The node directory's crash safety: a rotation interrupted between writing the new
pair and moving it into place is finished, never left half done."""

from __future__ import annotations

from pathlib import Path

from trustmesh.api.ca_client import NEXT_CERT, NEXT_KEY, finish_interrupted_rotation


def _node(directory: Path) -> None:
    for name, text in (("node.key", "old key"), ("node.crt", "old cert")):
        (directory / name).write_text(text)


def test_nothing_to_finish(tmp_path: Path) -> None:
    _node(tmp_path)
    assert not finish_interrupted_rotation(tmp_path)
    assert (tmp_path / "node.key").read_text() == "old key"


def test_a_complete_new_pair_is_moved_into_place(tmp_path: Path) -> None:
    _node(tmp_path)
    (tmp_path / NEXT_KEY).write_text("new key")
    (tmp_path / NEXT_CERT).write_text("new cert")
    assert finish_interrupted_rotation(tmp_path)
    assert (tmp_path / "node.key").read_text() == "new key"
    assert (tmp_path / "node.crt").read_text() == "new cert"
    assert not (tmp_path / NEXT_KEY).exists() and not (tmp_path / NEXT_CERT).exists()


def test_a_crash_after_the_key_moved_is_finished(tmp_path: Path) -> None:
    _node(tmp_path)
    (tmp_path / "node.key").write_text("new key")  # moved; the certificate was not yet
    (tmp_path / NEXT_CERT).write_text("new cert")
    assert finish_interrupted_rotation(tmp_path)
    assert (tmp_path / "node.crt").read_text() == "new cert"


def test_a_new_key_without_its_certificate_is_not_used(tmp_path: Path) -> None:
    _node(tmp_path)
    (tmp_path / NEXT_KEY).write_text("half-written rotation")  # the certificate comes last
    assert not finish_interrupted_rotation(tmp_path)
    assert (tmp_path / "node.key").read_text() == "old key"
