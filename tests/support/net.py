"""Loopback ports, and waiting: for a listener, or for any condition the tests poll."""

from __future__ import annotations

import fcntl
import os
import random
import socket
import tempfile
import time
from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")


#: Ports handed out come from the range just below the kernel's ephemeral range, through a
#: counter shared by every test process of the machine (see :func:`free_port`).
_PORT_SPAN = 12000


def _port_counter() -> Path:
    """The counter's file: in /tmp whatever ``TMPDIR`` says, so that suites run side by side with
    temporary directories of their own share it (each with its own counter, two suites handed
    out the same ports: a server of one took a port the other had just found free); one per user,
    who must be able to write it."""
    directory = "/tmp" if os.access("/tmp", os.W_OK) else tempfile.gettempdir()
    return Path(directory) / f"authgw-test-ports-{os.getuid()}"


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on, for a server a test is about to start.

    Not ``bind(0)``: the kernel picks those from the ephemeral range, where the port is free
    again the moment the probe closes. Another test process (the other xdist worker, another
    suite) could be handed the same port before our server binds it, and the two servers then
    race for it; a client that reaches the wrong one sees the wrong process's answers. So
    ports come from below the ephemeral range (which no ``bind(0)`` and no outgoing
    connection uses), in turn from a counter under an exclusive lock that all test processes
    share, and each is checked free before it is handed out.
    """
    low = _ephemeral_low()
    first = max(1024, low - _PORT_SPAN)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    fd = os.open(_port_counter(), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        nxt = int(text) if text.isdigit() else first + random.randrange(low - first)
        for _ in range(low - first):
            port = first + (nxt - first) % (low - first)
            nxt = port + 1
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind
                try:
                    sock.bind((host, port))
                except OSError:
                    continue  # a service of the machine, or a test server still running
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(nxt).encode(), 0)
            return port
        raise OSError(f"no free port in {first}-{low - 1}")
    finally:
        os.close(fd)  # releases the lock


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
