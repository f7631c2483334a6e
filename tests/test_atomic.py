"""Atomic writes: the old content survives a failed write, and nothing temporary is left behind."""
import stat

import pytest

from osteo_model.atomic import atomic_file


def test_success_replaces_content(tmp_path) -> None:
    target = tmp_path / "f.csv"
    target.write_text("old")
    with atomic_file(target, "w") as fh:
        fh.write("a,b\r\n")
    assert target.read_bytes() == b"a,b\r\n"  # text mode does not translate newlines (csv writes its own)
    assert [p.name for p in tmp_path.iterdir()] == ["f.csv"]


def test_failure_keeps_old_content_and_cleans_up(tmp_path) -> None:
    target = tmp_path / "state.pt"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_file(target) as fh:
            fh.write(b"half")
            raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]


def test_private_file_is_owner_only(tmp_path) -> None:
    with atomic_file(tmp_path / "key", private=True) as fh:
        fh.write(b"secret")
    assert stat.S_IMODE((tmp_path / "key").stat().st_mode) == 0o600
