"""Atomic writes leave the file an ordinary write would: its content, and the permissions the umask gives."""

import os
import stat

import pytest

from fragile.atomic import atomic_write_bytes, atomic_write_json


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_an_atomic_write_gets_the_permissions_of_a_plain_write(tmp_path, umask):
    before = os.umask(umask)
    try:
        plain = tmp_path / "plain.txt"
        plain.write_bytes(b"x")
        atomic_write_bytes(tmp_path / "atomic.txt", b"x")
        atomic_write_json(tmp_path / "atomic.json", {"a": 1})
    finally:
        os.umask(before)
    want = stat.S_IMODE(plain.stat().st_mode)
    assert want == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "atomic.txt").stat().st_mode) == want
    assert stat.S_IMODE((tmp_path / "atomic.json").stat().st_mode) == want
    assert (tmp_path / "atomic.json").read_text() == '{\n  "a": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left behind
