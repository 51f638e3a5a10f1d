"""Opening a SQLite file that several processes share (the workers of one machine).

Stores that live in the state directory (the throttle counts, the login sessions, the relay's
connections, the offline cache) are opened by every worker at once when the gateway starts.
``PRAGMA journal_mode=WAL`` needs an exclusive lock: when two connections switch a new file at
the same moment, SQLite answers one of them ``database is locked`` at once, without waiting for
its busy timeout (waiting could deadlock the two), and a worker that fails to open its store
fails to start. So the switch is retried here, within the busy timeout, and skipped when the file
is in WAL mode already (the mode is kept in the file).
"""

from __future__ import annotations

import os
import sqlite3
import stat
import time
from os import PathLike

__all__ = ["connect_wal", "create_private", "refuse_planted", "result_code"]

#: The files SQLite keeps beside a database, which it opens (and follows) by name.
_SIBLINGS = ("", "-wal", "-shm", "-journal")


def result_code(exc: BaseException) -> int:
    """SQLite's primary result code of *exc* (5 busy, 6 locked, 13 full...; an extended code
    carries it in its low byte), 0 when it has none."""
    return getattr(exc, "sqlite_errorcode", 0) & 0xFF


def create_private(path: str | PathLike[str]) -> None:
    """Create *path* empty and private (0600) unless it exists, without ever opening an existing
    file: closing any descriptor of a database file releases every POSIX lock this process holds
    on it, SQLite's in other threads included (https://www.sqlite.org/howtocorrupt.html, section
    2.2), and another thread's transaction then runs unlocked against other processes."""
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600))
    except FileExistsError:
        pass


def refuse_planted(path: str | PathLike[str]) -> None:
    """Raise :class:`sqlite3.DatabaseError` when *path*, or a file SQLite keeps beside it (its
    ``-wal``, ``-shm``, ``-journal``), is a symbolic link or not a regular file. SQLite opens
    these by name and follows links: one planted in the state directory would have the
    gateway's counts, sessions or cached credentials written into the file it points at
    (another store, a key file), or read from one another user controls. Python's ``sqlite3`` cannot pass ``SQLITE_OPEN_NOFOLLOW``, so this looks
    first; the directory is the gateway user's (0700, checked at start), so nothing can be
    planted between the look and the open by anyone who could not write the files anyway."""
    for suffix in _SIBLINGS:
        name = f"{os.fspath(path)}{suffix}"
        try:
            info = os.lstat(name)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise sqlite3.DatabaseError(f"{name}: {exc.strerror or exc}") from None
        if stat.S_ISLNK(info.st_mode):
            what = "a symbolic link"
        elif not stat.S_ISREG(info.st_mode):
            what = "not a regular file"
        else:  # a second name (hard link) is not refused: backups made with `cp -al` (rsnapshot) make them
            continue
        raise sqlite3.DatabaseError(f"{name} is {what}, where the gateway keeps a file of its own: it is not "
                                    f"followed; remove it (the gateway creates the file afresh)")


def connect_wal(path: str | PathLike[str], *, timeout: float = 5.0, check_same_thread: bool = True,
                isolation_level: str | None = None) -> sqlite3.Connection:
    """A connection to *path* in WAL mode, with a busy timeout of *timeout* seconds; a link
    planted in its place is refused (:func:`refuse_planted`)."""
    refuse_planted(path)
    conn = sqlite3.connect(path, timeout=timeout, isolation_level=isolation_level,
                           check_same_thread=check_same_thread)
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
        deadline = time.monotonic() + timeout
        delay = 0.005
        while True:
            try:
                if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                    conn.execute("PRAGMA journal_mode=WAL")
                return conn
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() + delay > deadline:
                    raise
                time.sleep(delay)  # another process is switching the same file: it will be WAL
                delay = min(delay * 2, 0.2)
    except BaseException:
        conn.close()
        raise
