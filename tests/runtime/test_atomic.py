"""runtime.atomic (one write-then-rename for every file writer) and runtime.cache (one cache rule)."""

import os
from pathlib import Path

import pytest

from runtime.atomic import replacing, write_atomic, write_json_atomic
from runtime.cache import default_cache_dir


def test_replacing_keeps_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with replacing(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("writer failed")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]  # no temporary left behind


def test_write_atomic_replaces_and_follows_umask(tmp_path):
    target = tmp_path / "f.json"
    write_atomic(target, b"x")
    write_json_atomic(target, {"a": 1})
    assert target.read_text() == '{\n "a": 1\n}\n'
    with replacing(target, follow_umask=True) as tmp:
        tmp.write_bytes(b"y")
        tmp.chmod(0o600)  # as safetensors creates its files
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]


def test_cache_dir_rule(monkeypatch, tmp_path):
    monkeypatch.setenv("CARE_EXPORT_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "explicit"
    monkeypatch.setenv("CARE_EXPORT_CACHE", "")
    assert default_cache_dir() == tmp_path / "xdg" / "care-export"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "care-export"
