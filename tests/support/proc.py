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
