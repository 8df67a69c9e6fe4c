"""Atomic output: a failed write leaves the old file or directory untouched and no debris."""

import pytest

from attrpatch.atomic import atomic_write, atomic_write_json, replace_dir, staging_dir


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "result.json"
    atomic_write_json(target, {"a": 1})

    def explode(f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, explode)
    assert target.read_text() == '{\n  "a": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_replace_dir_swaps_whole_directory(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    staging = staging_dir(out)
    (staging / "new.txt").write_text("new")
    replace_dir(staging, out, ours=lambda d: {"old.txt"})
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
