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
* A start-up that goes on for :data:`SLOW_STARTUP` seconds is named by the plugin it is in
  (:class:`StartupWatch`), in the log and to the master.
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
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from gateway.files import write_atomic

__all__ = ["CLOSE_GRACE", "KILL_AFTER", "PID_FILE", "SHUTDOWN_GRACE", "SLOW_STARTUP", "MessageReader", "StartupWatch",
           "die_with_parent", "early_hups", "encode_message", "forget_early_hups", "note_early_hups", "notify_ready", "remove_pidfile",
           "return_freed_memory", "write_pidfile"]

log = logging.getLogger("authgw.server")

PID_FILE = "authgw.pid"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_M_MMAP_THRESHOLD = -3  # <malloc.h>

SHUTDOWN_GRACE = 10.0  # in-flight requests of a stopping or retiring generation, all told
CLOSE_GRACE = 5.0  # the plugins' gateway_shutdown, all together; then the process goes on without them
KILL_AFTER = SHUTDOWN_GRACE + CLOSE_GRACE + 2.0
#: Seconds a start-up (building the plugins, their gateway_startup) may take before the log
#: names the plugin it is in; the master gives it up after its start grace (gateway/supervisor.py).
SLOW_STARTUP = 10.0
_LOOK_EVERY = 1.0  # seconds between looks at a start-up's stack
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


class StartupWatch:
    """Where a start-up is, by plugin: once a second after the first, a thread of its own looks
    at the stack of the thread doing it (``sys._current_frames``) and names the innermost plugin
    on it (:func:`gateway.registry.where_in_plugins`). It says where to *tell* each time that
    changes (a worker tells its master, which names it when it gives the start-up up), and logs
    it at WARNING once, after :data:`SLOW_STARTUP` seconds. The stacks written when a worker is
    given up name modules only: with ten plugins the operator had to work out which one hung
    (the note of the last stop). Nothing changes how the hooks are called: the stack is read
    from outside, and only code names and line numbers are kept from it."""

    def __init__(self, what: str, tell: Callable[[str], None] | None = None) -> None:
        self.what = what  # "worker 123: the start-up": for the log
        self.tell = tell
        #: The plugin manager, once built: the objects registered in it name plugins too.
        self.pm: Any = None
        self.thread: int | None = None  # the thread doing the start-up now (:meth:`following`)
        self.started = time.monotonic()
        self._discovered: dict | None = None
        self._told = ""
        self._done = threading.Event()
        self._watcher: threading.Thread | None = None

    def following(self, function: Callable[[], Any]) -> Callable[[], Any]:
        """*function*, watched on whichever thread runs it."""
        def run() -> Any:
            self.thread = threading.get_ident()
            try:
                return function()
            finally:
                self.thread = None  # an executor's thread goes on to other work

        return run

    def start(self) -> StartupWatch:
        self._watcher = threading.Thread(target=self._run, name="authgw-startup-watch", daemon=True)
        self._watcher.start()
        return self

    def stop(self) -> None:
        self._done.set()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(5.0)

    def where(self) -> str:
        """Where the start-up is now (``it is ...``)."""
        from gateway.registry import discover, plugin_places, where_in_plugins

        if self._discovered is None:
            try:
                self._discovered = discover()
            except Exception:  # noqa: BLE001 - the start-up reports it; here, no entry point names a plugin
                self._discovered = {}
        frame = sys._current_frames().get(self.thread)
        try:
            return where_in_plugins(frame, plugin_places(self._discovered, self.pm))
        finally:
            del frame  # no reference to another thread's frames is kept

    def _run(self) -> None:
        said = False
        while not self._done.wait(_LOOK_EVERY):
            if self.thread is None:  # between two steps of the start-up
                continue
            try:
                where = self.where()
            except Exception as exc:  # noqa: BLE001 - a diagnostic: the start-up goes on without it
                log.warning("%s: cannot tell where it is (%s)", self.what, exc.__class__.__name__)
                return
            if where != self._told and self.tell is not None and not self._done.is_set():
                self._told = where
                self.tell(where)
            elapsed = time.monotonic() - self.started
            if not said and elapsed >= SLOW_STARTUP and not self._done.is_set():
                said = True
                log.warning("%s has not finished after %.0f s; it is %s", self.what, elapsed, where)

