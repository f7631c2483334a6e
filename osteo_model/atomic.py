"""One way to write a file so that a reader, a run interrupted half-way or a power cut never sees half of it.

Temporaries are hidden siblings named ``.<name>.tmp-<pid>``: a process killed before its swap leaves one
behind, and the next write to the same folder removes it once that process is gone (a site's state folder
must not fill up with half-written model states, nor keep a half-written private key).
"""
from __future__ import annotations

import glob
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

TEMPORARY_MARK = ".tmp-"


def temporary_sibling(path: str | Path) -> Path:
    """This process's temporary for ``path``, in the same folder (so the swap is one rename)."""
    path = Path(path)
    return path.with_name(f".{path.name}{TEMPORARY_MARK}{os.getpid()}")


def remove_stale_temporaries(folder: str | Path, name: str = "*") -> list[Path]:
    """Remove the temporaries for ``name`` (a glob; default: every file) in ``folder`` whose writer no
    longer runs; a live writer's are left alone. Returns what was removed."""
    removed = []
    for tmp in Path(folder).glob(f".{name}{TEMPORARY_MARK}*"):
        pid = tmp.name.rsplit(TEMPORARY_MARK, 1)[1]
        if not pid.isdigit() or process_alive(int(pid)):
            continue
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def replace(source: str | Path, target: str | Path) -> None:
    """``os.replace`` that survives a power cut: the rename is a change of the folder, which is flushed too
    (without that, a site's privacy accountant could come back from a crash with an ε already spent)."""
    os.replace(source, target)
    sync_folder(Path(target).parent)


def sync_folder(folder: str | Path) -> None:
    """Flush a folder's entries (renames, new files) to disk, where the platform allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform without directory handles (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:  # a file system that refuses a directory fsync: nothing more can be done
        pass
    finally:
        os.close(fd)


def sync_file(path: str | Path) -> None:
    """Flush a file written by a library that does not (``np.save``) before it is swapped in."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: str | Path, mode: str = "wb", private: bool = False, sweep: bool = True) -> Iterator[IO]:
    """Write through a temporary sibling that replaces ``path`` in one step once the block succeeds.

    The data and then the rename are flushed to disk; on an error the temporary file is removed and ``path``
    keeps its old content. ``private`` creates the file readable by its owner only (keys). ``sweep`` first
    removes a dead writer's temporary of ``path``; it lists the folder, so a writer of many files into one
    folder sweeps that folder once itself (``remove_stale_temporaries``) and passes False.
    """
    path = Path(path)
    if sweep:
        remove_stale_temporaries(path.parent, glob.escape(path.name))
    tmp = temporary_sibling(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o666)
    try:
        text = {} if "b" in mode else {"encoding": "utf-8", "newline": ""}
        with os.fdopen(fd, mode, **text) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def process_alive(pid: int) -> bool:
    """Whether ``pid`` still runs. A zombie counts as dead: a killed run's orphaned pool worker stays one
    where PID 1 does not reap (containers), and its half-written file must still be cleaned up."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:  # no /proc (not Linux), or it ended just now
        return not Path("/proc/self/stat").exists()
