"""One way to write a file so that a reader, or a run interrupted half-way, never sees half of it."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator


@contextmanager
def atomic_file(path: str | Path, mode: str = "wb", private: bool = False) -> Iterator[IO]:
    """Write through a temporary sibling that replaces ``path`` in one step once the block succeeds.

    The data is flushed to disk before the swap; on an error the temporary file is removed and ``path``
    keeps its old content. ``private`` creates the file readable by its owner only (keys).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o666)
    try:
        text = {} if "b" in mode else {"encoding": "utf-8", "newline": ""}
        with os.fdopen(fd, mode, **text) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
