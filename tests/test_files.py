"""oilleak.files: a replaced file is whole or untouched, and no temporary file is left behind."""

from __future__ import annotations

import pytest

from oilleak.files import atomic_write, link_or_copy


def test_atomic_write_creates_folders_and_writes(tmp_path):
    path = tmp_path / "a" / "b" / "out.json"
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write('{"x": 1}')
    assert path.read_text(encoding="utf-8") == '{"x": 1}'
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.json"]


def test_atomic_write_error_keeps_the_old_file(tmp_path):
    path = tmp_path / "model.pth"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_write(path) as f:
        f.write(b"half of the new")
        raise RuntimeError("crash while writing")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pth"]


def test_atomic_write_rejects_append(tmp_path):
    with pytest.raises(ValueError, match="whole files"), atomic_write(tmp_path / "x", "ab"):
        pass


def test_link_or_copy_replaces_the_destination(tmp_path):
    src, dst = tmp_path / "epoch_2.pth", tmp_path / "latest.pth"
    src.write_bytes(b"new weights")
    dst.write_bytes(b"old weights")
    link_or_copy(src, dst)
    assert dst.read_bytes() == b"new weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_2.pth", "latest.pth"]
