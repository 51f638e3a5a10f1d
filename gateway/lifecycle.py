"""Process lifecycle contracts of ``authgw serve``: the PID file, and workers that die with their
master.

* ``<state_dir>/authgw.pid`` holds the master's PID (mode 0600, written once the sockets are
  bound, removed at exit). ``kill -HUP $(cat <state_dir>/authgw.pid)`` reloads conf.d; the
  console and operators rely on exactly this.
* A worker asks the kernel for SIGTERM when its master dies (``PR_SET_PDEATHSIG``), so a killed
  master leaves no orphan holding the port (issue 10).
* Memory used for a burst is given back (:func:`return_freed_memory`).
* Under systemd (``Type=notify``, ``NOTIFY_SOCKET`` set) the process holding the reload handler
  says ``READY=1`` once it has it (:func:`notify_ready`): systemd holds a ``systemctl reload``
  until then, so a SIGHUP never reaches a process still starting, whose default for it is to
  die.
* A stop is bounded: in-flight requests get :data:`SHUTDOWN_GRACE` in all, the plugins'
  ``gateway_shutdown`` :data:`CLOSE_GRACE` after that, and the master kills (SIGKILL) a worker
  still running :data:`KILL_AFTER` seconds after its SIGTERM (under systemd's
  ``TimeoutStopSec=20``).
* The master and each worker share a *link* (a socket pair) of pickled tuples
  (:func:`send_message`, :class:`MessageReader`): the master hands a reload's configuration
  over it, and the worker says it serves and how each reload went.
"""

from __future__ import annotations

import ctypes
import logging
import os
import pickle
import signal
import socket
import struct
from pathlib import Path
from typing import Any

from gateway.files import write_atomic

__all__ = ["CLOSE_GRACE", "KILL_AFTER", "PID_FILE", "SHUTDOWN_GRACE", "MessageReader", "die_with_parent", "early_hups",
           "encode_message", "forget_early_hups", "note_early_hups", "notify_ready", "remove_pidfile",
           "return_freed_memory", "write_pidfile"]

log = logging.getLogger("authgw.server")

PID_FILE = "authgw.pid"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_M_MMAP_THRESHOLD = -3  # <malloc.h>

SHUTDOWN_GRACE = 10.0  # in-flight requests of a stopping or retiring generation, all told
CLOSE_GRACE = 5.0  # the plugins' gateway_shutdown, all together; then the process goes on without them
KILL_AFTER = SHUTDOWN_GRACE + CLOSE_GRACE + 2.0
_LENGTH = struct.Struct("!I")


def write_pidfile(state_dir: Path) -> Path:
    """Write this process's PID to ``state_dir/authgw.pid`` (0600, replaced atomically)."""
    path = state_dir / PID_FILE
    write_atomic(path, f"{os.getpid()}\n".encode())
    return path


def remove_pidfile(path: Path) -> None:
    """Remove *path* if it still names this process (a newer master may have replaced it)."""
    try:
        if path.read_text().strip() == str(os.getpid()):
            path.unlink()
    except OSError:
        pass


_early_hups = 0  # SIGHUPs received before this process's reload handling was in place


def _note_early_hup(signum, frame) -> None:
    # Neither ignored (the configuration may have changed after this process read it) nor
    # fatal (SIGHUP's default): noted, and served once the process can reload.
    global _early_hups
    _early_hups += 1


def note_early_hups() -> None:
    """Note SIGHUPs from now until the reload handlers exist (:func:`early_hups`). ``authgw
    serve`` calls it first thing in ``cli.main``; what comes before (Python loading the
    ``gateway`` package, about half a second) still dies of a SIGHUP: under systemd
    ``Type=notify`` holds reloads until :func:`notify_ready`."""
    signal.signal(signal.SIGHUP, _note_early_hup)


def early_hups() -> int:
    """How many SIGHUPs :func:`note_early_hups` noted."""
    return _early_hups


def forget_early_hups() -> None:
    """A forked worker's: the SIGHUPs noted are its master's to serve."""
    global _early_hups
    _early_hups = 0


def notify_ready(address: str | None = None) -> None:
    """Tell systemd this service is started (``READY=1`` to ``$NOTIFY_SOCKET``, the
    ``sd_notify`` protocol: one datagram to a Unix socket, ``@`` for the abstract namespace),
    and unset the variable so that no child process says it again. Nothing without the variable
    (not under systemd, or ``Type=exec``); a failure is logged, never fatal. *address*: the
    variable's value, taken from the environment earlier (a master forks its workers first)."""
    if address is None:
        address = os.environ.pop("NOTIFY_SOCKET", "")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(f"READY=1\nMAINPID={os.getpid()}".encode(), address)
    except OSError as exc:
        logging.getLogger("authgw").warning("could not tell systemd the service is ready (NOTIFY_SOCKET): %s", exc)


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


def return_freed_memory() -> None:
    """Make glibc give large freed blocks back to the system at once.

    An argon2id verification allocates its memory cost (tens of MiB) on a chain thread. glibc
    raises its mmap threshold after each such block is freed, so later ones come from the
    thread's heap arena and stay there: a burst left RSS several times its idle level for good
    (issue 10). A fixed threshold (which also turns the dynamic one off) keeps every block of
    1 MiB or more in its own mapping, unmapped when freed. Not glibc: nothing to do.
    """
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):
        pass


def trim_freed_memory() -> None:
    """Give the pages glibc holds free inside its heaps back to the system (``malloc_trim``).

    Called after a burst of connections has ended (:class:`gateway.http.protocol.ConnectionGuard`):
    a thousand connections' buffers, freed, leave holes in the heaps that glibc keeps (the top of
    a heap only is returned on its own). Walks every arena: milliseconds, so not per request.
    Not glibc: nothing to do."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def encode_message(message: tuple) -> bytes:
    """*message* framed for a link: its length, then its pickle. Only a master and the workers
    it forked share a link, so a pickle is as trusted as the process itself."""
    payload = pickle.dumps(message)
    return _LENGTH.pack(len(payload)) + payload


class MessageReader:
    """The messages that come in on one end of a link, as its bytes arrive."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()

    def read(self) -> list[Any] | None:
        """The messages complete so far ([] when none); None once the other end has closed."""
        try:
            data = self.sock.recv(1 << 16)
        except (BlockingIOError, InterruptedError, TimeoutError):
            return []
        except OSError:
            return None
        if not data:
            return None
        self.buffer += data
        messages = []
        while len(self.buffer) >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(self.buffer)
            if len(self.buffer) < _LENGTH.size + length:
                break
            messages.append(pickle.loads(bytes(self.buffer[_LENGTH.size:_LENGTH.size + length])))
            del self.buffer[:_LENGTH.size + length]
        return messages
