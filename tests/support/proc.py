"""Stopping the processes the tests started, by PID, within bounded time."""

from __future__ import annotations

import signal
import subprocess


def stop(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
    """Send *sig* to *proc* if it still runs, wait up to *timeout*, then SIGKILL; return its code."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    return proc.returncode


def kill(proc: subprocess.Popen | None) -> None:
    """SIGKILL: the process vanishes mid-conversation."""
    stop(proc, signal.SIGKILL, timeout=10.0)


def children(pid: int) -> list[int]:
    """The PIDs of *pid*'s children (a gateway master's workers), from /proc."""
    return [int(p) for p in open(f"/proc/{pid}/task/{pid}/children").read().split()]


def die_with_parent() -> None:
    """``preexec_fn`` of a server the tests start: in the child, before exec, ask Linux to send it
    SIGTERM when the thread that started it dies (prctl PR_SET_PDEATHSIG), so a crashed or
    interrupted test run or benchmark leaves no server behind."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


class Daemon:
    """What the servers the tests start share: ``self.proc`` (set by the subclass's ``start()``)
    and ``self._log`` (the file its output goes to); the PID, whether it runs, and stopping it by
    PID with the log closed. ``with server:`` starts and stops it."""

    proc: subprocess.Popen | None = None
    _log = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM by PID and wait up to *timeout* (then SIGKILL); the log is closed."""
        stop(self.proc, timeout=timeout)
        self._close_log()

    def kill(self) -> None:
        """SIGKILL by PID: the server vanishes mid-conversation."""
        kill(self.proc)
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
