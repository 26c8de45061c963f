"""One atomic-write rule for every file the package writes, and one cache folder."""

import os
import stat

import pytest

from lora_loom.files import atomic_write, atomic_write_text, cache_root


def test_atomic_write_replaces_whole_with_normal_permissions(tmp_path):
    target = tmp_path / "sub" / "file.txt"
    atomic_write_text(target, "old")
    kept_open = open(target)  # a reader of the old file keeps reading the old file
    atomic_write(target, lambda temporary: temporary.write_bytes(b"new"))
    assert target.read_text() == "new" and kept_open.read() == "old"
    kept_open.close()
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in target.parent.iterdir()] == ["file.txt"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "file.txt"
    atomic_write_text(target, "old")

    def half_then_fail(temporary):
        temporary.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]


def test_cache_root_order(monkeypatch, tmp_path):
    monkeypatch.setenv("LORA_LOOM_CACHE", str(tmp_path / "explicit"))
    assert cache_root() == tmp_path / "explicit"
    monkeypatch.delenv("LORA_LOOM_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "lora_loom"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "lora_loom"
