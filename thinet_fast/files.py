"""Writing files safely: writability checks up front, and atomic replacement.

A file is written to ``<path>.tmp`` next to it, flushed to disk, then moved over the
old one with ``os.replace``: an interrupted write leaves the old file whole, and a
stale ``.tmp`` from an earlier interruption is simply overwritten."""
from __future__ import annotations

import os
from typing import Callable, BinaryIO

__all__ = ["check_writable", "atomic_write", "atomic_write_path"]


def check_writable(path, what: str) -> None:
    """Raise a clear error now, before any long work, if ``path`` cannot be written.

    ``what`` names the argument (e.g. ``"resume="``) in the message."""
    path = os.fspath(path)
    if not path:
        raise ValueError(f"{what} is an empty path")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{what} {path!r} is a directory; pass a file path inside it")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"{what} {path!r}: the directory {parent!r} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{what} {path!r}: the directory {parent!r} is not writable")
    if os.path.exists(path) and not os.access(path, os.R_OK):
        raise PermissionError(f"{what} {path!r} exists but cannot be read")


def atomic_write(path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(f)`` on ``<path>.tmp``, then replace ``path`` with it."""
    def to_tmp(tmp: str) -> None:
        with open(tmp, "wb") as f:
            write(f)
    atomic_write_path(path, to_tmp)


def atomic_write_path(path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` with the path ``<path>.tmp`` (for writers that want a file
    name, such as safetensors' ``save_file``), flush it to disk, then replace ``path``."""
    path = os.fspath(path)
    tmp = f"{path}.tmp"
    try:
        write(tmp)
        with open(tmp, "rb+") as f:  # fsync through any descriptor flushes the file's pages
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
