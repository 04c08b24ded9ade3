"""Writing files so that nothing is lost: the one way oilleak replaces a file.

A file is written under a temporary name in its own folder, flushed to disk, then renamed over the final
name, and the folder is synced so that the rename survives a power cut too. A crash or an error leaves
either the old file or the new one under that name, never half of one, and the temporary file is removed.
Checkpoints, COCO annotations, detections, plots: all go through here.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def _temp_beside(path: Path) -> Path:
    # a hidden name in the same folder (a rename is atomic only within one file system); random, so two
    # processes writing the same file never share a temporary file
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")


@contextmanager
def atomic_write(path: str | Path, mode: str = "wb", *, encoding: str | None = None) -> Iterator[IO[Any]]:
    """Open ``path`` for writing (``mode`` "wb" or "w"); the file appears under its name only when the
    ``with`` block ends without error. Creates missing parent folders. The new file gets the permissions
    of any newly created file (mkstemp's would be owner-only)."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write writes whole files: mode 'wb' or 'w', not {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_beside(path)
    try:
        with open(tmp, mode.replace("w", "x"), encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _sync_folder(path.parent)


def link_or_copy(src: str | Path, dst: str | Path) -> None:
    """Make ``dst`` a copy of ``src``, atomically as :func:`atomic_write`: a hard link where the file
    system allows one (a checkpoint is not written twice), else a copy."""
    src, dst = Path(src), Path(dst)
    tmp = _temp_beside(dst)
    try:
        os.link(src, tmp)
    except OSError:
        with open(src, "rb") as source, atomic_write(dst) as target:
            shutil.copyfileobj(source, target)
        return
    try:
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _sync_folder(dst.parent)


def _sync_folder(folder: Path) -> None:
    """Flush a folder's entries: a rename survives a power cut only once its folder is synced (a killed
    process needs nothing: the kernel has the rename). Some file systems cannot sync a folder (EINVAL)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)
