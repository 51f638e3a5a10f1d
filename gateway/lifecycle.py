"""Process lifecycle contracts of ``authgw serve``: the PID file, and workers that die with their
master.

* ``<state_dir>/authgw.pid`` holds the master's PID (mode 0600, written once the sockets are
  bound, removed at exit). ``kill -HUP $(cat <state_dir>/authgw.pid)`` reloads conf.d; the
  console and operators rely on exactly this.
* A worker asks the kernel for SIGTERM when its master dies (``PR_SET_PDEATHSIG``), so a killed
  master leaves no orphan holding the port (issue 10).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
from pathlib import Path

__all__ = ["PID_FILE", "die_with_parent", "remove_pidfile", "write_pidfile"]

log = logging.getLogger("authgw.server")

PID_FILE = "authgw.pid"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def write_pidfile(state_dir: Path) -> Path:
    """Write this process's PID to ``state_dir/authgw.pid`` (0600, replaced atomically)."""
    path = state_dir / PID_FILE
    temporary = state_dir / f".{PID_FILE}.{os.getpid()}"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
    finally:
        os.close(fd)
    os.replace(temporary, path)
    return path


def remove_pidfile(path: Path) -> None:
    """Remove *path* if it still names this process (a newer master may have replaced it)."""
    try:
        if path.read_text().strip() == str(os.getpid()):
            path.unlink()
    except OSError:
        pass


def die_with_parent(parent: int) -> None:
    """SIGTERM this process when *parent* exits. Linux only; elsewhere, a warning."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    except (OSError, AttributeError) as exc:
        log.warning("worker %d cannot ask to die with its master: %s", os.getpid(), exc)
        return
    if os.getppid() != parent:  # the master died between fork and prctl
        os.kill(os.getpid(), signal.SIGTERM)
