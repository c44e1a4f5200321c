"""An exclusive lock between processes on one folder, for the few writes that must not interleave.

The registry's "is this content already stored? if not, store it" (import) and the model cache's
"is this checkpoint built? if not, build it" are check-then-act sequences: without one critical
section, concurrent processes all see "not yet" and all act (issue 15: four concurrent imports of
one archive stored it under three version numbers).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

__all__ = ["LOCK_NAME", "folder_lock"]

LOCK_NAME = ".lock"


@contextlib.contextmanager
def folder_lock(folder: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on `folder` (through its `.lock` file, created if needed) while open.

    Other processes wait for it; the operating system releases it when its holder dies. Not
    re-entrant: a process must not take the same folder's lock twice. Where POSIX locks do not exist,
    it only creates the folder (the atomic renames then still keep every version whole).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(folder / LOCK_NAME, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
