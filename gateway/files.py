"""Files the gateway writes in its state directory: whole, private, and never through a link.

A file is written to a new temporary beside it (``O_EXCL | O_NOFOLLOW``: a name planted there,
a symbolic link to another file included, is never opened, let alone truncated), synced, and
renamed over the old one, so a reader sees the old file or the new one, never half of either,
and a symbolic link at the file's own name is replaced rather than followed.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

__all__ = ["write_atomic", "write_beside"]

_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def write_beside(path: Path, data: bytes, *, mode: int = 0o600) -> Path:
    """*data*, synced, in a new temporary file beside *path*, with permissions *mode* (the umask
    does not apply): the caller renames it over *path*, or removes it. For several files that
    change together (the console's saves): every one is written before any is renamed."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temporary, _FLAGS, mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as out:
            fd = -1
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        if fd >= 0:
            os.close(fd)
        temporary.unlink(missing_ok=True)
        raise
    return temporary


def write_atomic(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Replace *path* with *data*, with permissions *mode* (the umask does not apply)."""
    temporary = write_beside(path, data, mode=mode)
    try:
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
