"""Loopback ports, and waiting: for a listener, or for any condition the tests poll."""

from __future__ import annotations

import socket
import time
from typing import Callable, TypeVar

T = TypeVar("T")


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_for(predicate: Callable[[], T], timeout: float = 30.0, *, interval: float = 0.1, what: str = "",
             log: Callable[[], str] | None = None, error: type[Exception] = AssertionError) -> T:
    """Poll *predicate* until it returns something truthy, and return that.

    The predicate is asked once more after the deadline has passed (a loaded machine may have
    slept through the last interval). On timeout it raises *error* naming *what*, with the tail
    of *log()* when given: a failure says what never happened and what the process said.
    Exceptions from the predicate are not swallowed."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            tail = f"; log:\n{log()[-4000:]}" if log is not None else ""
            raise error(f"timed out after {timeout}s waiting for {what or 'the condition'}{tail}")
        time.sleep(interval)


def wait_for_port(host: str, port: int, timeout: float = 15.0, proc=None) -> None:
    def listening() -> bool:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.pid} exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            return False

    wait_for(listening, timeout, interval=0.05, what=f"a listener on {host}:{port}", error=TimeoutError)
