"""Paths oilleak did not choose stay inside the folder they belong to.

Two sides of one rule:

- a name read from a dataset file (COCO ``file_name``, labelme ``imagePath``) is checked as TEXT
  (:func:`escape_reason`): not absolute, no ``..`` climbing out of its folder. The text, not the disk:
  an image folder may hold symbolic links to photos kept elsewhere (the user made them, a json cannot),
  and the rule must hold before any file exists;
- a path oilleak WRITES, built from such a name, is resolved on the disk (:func:`inside`): symbolic
  links included, it must lie in the folder the user named.
"""

from __future__ import annotations

import posixpath
from pathlib import Path, PureWindowsPath

from oilleak.errors import OilleakError


def escape_reason(name: str, within: str = "") -> str | None:
    """Why the relative path ``name`` (read in the folder ``within``, itself relative to the root) does not
    stay under the root, or None when it does. Backslashes count as separators (a file made on Windows)."""
    text = name.replace("\\", "/")
    windows = PureWindowsPath(name)
    if text.startswith("/") or windows.drive or windows.root:
        return "is an absolute path"
    normal = posixpath.normpath(posixpath.join(within.replace("\\", "/"), text))
    if normal == ".":
        return "names the folder itself, not a file"
    if normal == ".." or normal.startswith("../"):
        return "climbs out of its folder with '..'"
    return None


def inside(folder: Path, relative: str | Path, what: str, fix: str) -> Path:
    """``folder / relative``, refused with an :class:`OilleakError` naming ``what`` and ``fix`` when it
    resolves (symbolic links followed) outside ``folder``."""
    target = folder / relative
    resolved = target.resolve()
    if folder.resolve() not in resolved.parents:
        raise OilleakError(
            f"{what}: {target} would be written at {resolved}, outside {folder}; oilleak writes only inside the "
            f"folder you name. Fix: {fix}"
        )
    return target


def is_within(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies in it, both resolved (symbolic links followed)."""
    resolved, root = path.resolve(), folder.resolve()
    return resolved == root or root in resolved.parents
