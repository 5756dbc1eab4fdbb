"""User-facing errors: one clear line naming the file, field or parameter that is wrong.

CLIs catch `SpqrError`, print its message on one line and exit with status 2; anything else is a bug.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path


class SpqrError(Exception):
    """Base class of errors caused by user input (files, flags, requests), never by a bug."""


class ModelFormatError(SpqrError):
    """A model file or folder is missing, corrupt, truncated, foreign or unsupported."""


class ConfigError(SpqrError):
    """A command-line flag or request parameter has an invalid value."""


class DiskFullError(SpqrError):
    """Writing `path` failed for lack of disk space (or quota): it `needed` bytes and `free` were there.

    Whoever knows more fills in `kept` (what finished work survives, and where) and `resume` (how to
    continue, e.g. the exact command); the message is one line with all of it."""

    def __init__(self, path: str | os.PathLike[str], needed: int | None, *, kept: str = "", resume: str = ""):
        super().__init__()
        self.path, self.needed, self.kept, self.resume = Path(path), needed, kept, resume
        self.free = free_bytes(self.path.parent)

    def __str__(self) -> str:
        need = f" needed {human_bytes(self.needed)}," if self.needed is not None else ""
        text = f"no space left on the disk: writing {self.path}{need} {human_bytes(self.free)} free there"
        if self.kept:
            text += f"; kept {self.kept}"
        text += "; free some space"
        return text + (f", then continue with: {self.resume}" if self.resume else " and run it again")


def free_bytes(folder: str | os.PathLike[str]) -> int:
    """Bytes free for this user on the file system holding `folder` (its nearest existing parent)."""
    path = Path(folder).resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0


def check_free_space(path: str | os.PathLike[str], needed: int) -> None:
    """DiskFullError before writing `needed` bytes to `path` when its file system has less free."""
    if free_bytes(Path(path).parent) < needed:
        raise DiskFullError(path, needed)


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` is a write failing for lack of space: OSError ENOSPC / EDQUOT, or a library's wrapper
    of one (safetensors raises SafetensorError("... IoError(Os { code: 28, kind: StorageFull ... })"))."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)
    return any(s in text for s in ("No space left on device", "StorageFull", "Disk quota exceeded"))


def human_bytes(n: int) -> str:
    """1536 -> '1.5 KiB' (B, KiB, MiB, GiB, TiB)."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
