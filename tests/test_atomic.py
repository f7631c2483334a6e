"""Atomic writes: the old content survives a failed write, and nothing temporary is left behind."""
import os
import stat
import subprocess
import sys

import pytest

from osteo_model.atomic import atomic_file, remove_stale_temporaries


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


def _finished_pid() -> int:
    """The pid of a process that has ended (a killed writer's)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_killed_writers_temporary_is_removed_by_the_next_write_a_live_ones_is_not(tmp_path) -> None:
    """A process killed between its write and its swap leaves ``.<name>.tmp-<pid>`` behind (a half-written
    site state or private key); the next write of that file removes it once that process is gone."""
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as live:
        try:
            dead = tmp_path / f".site_state.pt.tmp-{_finished_pid()}"
            writing = tmp_path / f".site_state.pt.tmp-{live.pid}"
            other = tmp_path / f".site_model.pt.tmp-{_finished_pid()}"
            for path in (dead, writing, other):
                path.write_bytes(b"half")
            with atomic_file(tmp_path / "site_state.pt") as fh:
                fh.write(b"new")
            assert not dead.exists()
            assert writing.read_bytes() == b"half", "a running writer's temporary was removed"
            assert other.exists(), "another file's temporary is that file's writer's to clean up"
            assert remove_stale_temporaries(tmp_path) == [other]
        finally:
            live.kill()


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names an open descriptor through /proc")
def test_a_swap_flushes_the_folder_as_well_as_the_file(tmp_path, monkeypatch) -> None:
    """A rename lives in the folder: unflushed, a power cut can bring back the old file (an ε already spent,
    a model already replaced) although the write returned."""
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    with atomic_file(tmp_path / "site_state.pt") as fh:
        fh.write(b"new")
    assert str(tmp_path) in synced, synced
    assert synced.index(str(tmp_path)) > synced.index(str(tmp_path / f".site_state.pt.tmp-{os.getpid()}"))
