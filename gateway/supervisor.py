"""The master of several workers (``authgw serve --workers N``): starts one per slot, replaces
one that dies, reloads on SIGHUP, stops them on SIGTERM/SIGINT.

The master keeps the configuration it last accepted (validated at start or at a SIGHUP), and
a replacement worker is built from that, never from conf.d as it is on disk at that moment: an
edit refused at SIGHUP, or made and not yet reloaded, reaches no worker. A reload's
configuration goes to the workers over their links (:mod:`gateway.lifecycle`), and each says
whether it serves it; some that do and some that do not is logged as a mixed configuration.
Only the very first start can stop the gateway: once a worker has served, a replacement that
fails to start is tried again, after 1, 2, 4 ... up to 30 seconds, with an ERROR each time.
Meanwhile a slot with a listening socket of its own (``reuse_port``) has it closed, or the
kernel would go on queueing a share of new connections there, for no one to accept; it
listens again when the next try starts.

A reload's conf.d is read and validated once, in a process of its own (a large file takes tens
of seconds): the master's loop goes on meanwhile, reaping, replacing and watching workers, and
a stop kills that process rather than wait for it. Each worker says which reload it applied,
also one a later SIGHUP overtook, so the master knows what each serves: workers left on
different configurations are a mixed configuration, and a reload every worker refused leaves
replacements building what the workers serve.

A worker whose event loop stops turning (a plugin blocking it, a deadlock, a stuck C call, a
SIGSTOP) still holds its share of new connections: the master's watchdog catches it. Each worker
counts its loop's turns, a timer callback every second or so (:func:`start_heartbeat`), in a
page of memory it shares with the master; the master looks at the counts on every turn of its
own loop, and a worker whose count has not moved for :data:`WORKER_TIMEOUT` seconds (a new
one: from its fork, at least :data:`_FIRST_BEAT_GRACE`) is named at ERROR, asked for its
threads' stacks (:data:`_STACKS_SIGNAL`: faulthandler writes them without the stuck thread),
killed with SIGKILL :data:`_STACKS_GRACE` later (a frozen process acts on nothing else) and
replaced as a worker that died is. A worker busy on its threads beats on: only its
loop must turn. Workers the master is stopping are not watched. A new worker's loop turns while
its plugins start (on a thread): one not serving :func:`start_grace` seconds after its fork (a
start-up waiting for ever on a backend) is killed the same way, as a failed start, once some
worker has served, and at the very first start fails the start (exit 3) saying so, where the
master waited for it without end; a worker's reload gives up such a start-up after as long
(gateway/server.py). A retried slot's socket is bound again without listening: its worker
listens once it serves, so the try's start-up holds no share of new connections. A worker says
where its start-up is once it has taken a second (the plugin it is in, by its stack:
:class:`gateway.lifecycle.StartupWatch`), and the lines that give it up name that plugin; the
stacks name only modules.

A reload's reader that makes no progress (a conf.d file on a network mount whose server died:
its read never returns) is named with the file it waits on (the reader says which file it reads,
:data:`gateway.yamlfiles.reading_hook`) after :data:`_BUILD_SLOW` seconds, and given up after
:func:`start_grace`: the reload is refused, and SIGHUPs sent meanwhile, one pending reload, are
read afresh. It used to hold every later reload behind it, without a word.
"""

from __future__ import annotations

import asyncio
import faulthandler
import functools
import logging
import mmap
import os
import select
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from gateway import yamlfiles
from gateway.config import Config
from gateway.errors import ConfigError
from gateway.lifecycle import KILL_AFTER, MessageReader, die_with_parent, encode_message, notify_ready
from gateway.logs import MULTILINE, printable
from gateway.runtime import build_runtime

__all__ = ["EXIT_STARTUP_FAILED", "WORKER_TIMEOUT", "explain", "start_grace", "start_heartbeat", "supervise"]

log = logging.getLogger("authgw.server")

EXIT_STARTUP_FAILED = 3
_MAX_BACKOFF = 30.0
_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

#: Seconds a worker's event loop may go without turning (its heartbeat count unchanged) before
#: the master kills and replaces it; a new worker has as long from its fork to its first beat
#: (at least :data:`_FIRST_BEAT_GRACE`). The default of the ``worker_timeout`` setting;
#: ``AUTHGW_WORKER_TIMEOUT`` in the master's environment overrides the setting, for the tests and
#: for an operator who must (0 turns the watchdog off, e.g. to sit in a debugger).
WORKER_TIMEOUT = 30.0
_BEAT_EVERY = 1.0  # seconds between beats, or a quarter of the timeout if that is shorter
#: Seconds a new worker has from its fork to its first beat, when the timeout is shorter: its
#: interpreter and event loop start on a machine that may be busy (a replacement started while
#: the others serve a burst took over 2 s under load in the tests, and was killed as hung).
_FIRST_BEAT_GRACE = 30.0
#: Seconds between asking a hung worker for its threads' stacks and killing it: time to write them.
_STACKS_GRACE = 1.0
#: Seconds a hung worker that has not yet taken the stacks signal (the kernel has not run it:
#: a machine starved of CPU) is waited for beyond the grace: a SIGKILL pending beside it is
#: taken first, and the stacks were lost (seen in the tests, two suites on two cores).
_STACKS_MAX_WAIT = 10.0
#: How many timeouts the watchdog waits for a worker whose event loop has not turned while the
#: loop's thread keeps waking up (its voluntary context switches grow): a thread waiting for the
#: GIL wakes every switch interval (5 ms) to ask for it, one that is blocked (a plugin's sleep or
#: call, a lock, SIGSTOP) does not. CPU-bound threads of a worker on a loaded machine kept its
#: loop from the GIL past a 10 s timeout in the tests (two suites on two cores): it was killed
#: while it answered its requests.
_STARVED_TIMEOUTS = 3.0
#: Seconds a reload's reading of conf.d may make no progress (no CPU used, not runnable: waiting
#: on a file of a dead network mount, say) before the log says which file it waits on; it is
#: given up after :func:`start_grace`. A large file read slowly is progress: it uses CPU.
_BUILD_SLOW = 10.0
#: Readers given up that the kernel has not let die yet (a read of a FUSE or hard NFS mount ends
#: only when its server answers): past that many, a reload is refused rather than start one more.
_MAX_ABANDONED = 4
_STACKS_SIGNAL = signal.SIGUSR2  # in a worker: write every thread's stack to stderr (faulthandler)
_BEAT = struct.Struct("Q")  # the count, in a shared anonymous page per worker
_beat: tuple[mmap.mmap, float] | None = None  # in a worker: its page and how often to beat

#: Runs in the forked worker: (slot, the configuration to build, its end of the link) -> exit code.
WorkerMain = Callable[[int, Config, socket.socket], int]


def start_grace(timeout: float) -> float | None:
    """Seconds a worker's plugins have to start (``gateway_startup``), in a new worker or in a
    reload, for a watchdog *timeout* (the ``worker_timeout`` setting): as long as a new worker has
    to its first beat (at least :data:`_FIRST_BEAT_GRACE`); None (no bound) when the watchdog is
    off. A start-up that waits for ever (a backend it connects to without a timeout) is given up:
    it used to leave a new worker's socket queueing its share of new connections for no one, and
    a worker's reload pending for good, with every later reload waiting behind it."""
    return max(timeout, _FIRST_BEAT_GRACE) if timeout else None


def explain(exc: Exception) -> str:
    """A refused configuration's problems, one a line, for the log (``extra=MULTILINE``):
    each problem made printable, so that only these line breaks are in it."""
    if isinstance(exc, ConfigError):
        return "\n  " + "\n  ".join(map(printable, exc.problems))
    return printable(f"{exc.__class__.__name__}: {exc}")


@dataclass
class _Builder:
    """The process reading conf.d for a reload (:meth:`_Master._start_build`)."""

    pid: int
    link: socket.socket
    reader: MessageReader
    answer: tuple | None = None  # ("valid", configuration) or ("refused", the problems)
    #: The file it said it reads (looks at) now, None between files (gateway/yamlfiles.py).
    reading: str | None = None
    started: float = field(default_factory=time.monotonic)
    looked: float = 0.0  # when its CPU time was last read
    ticks: int | None = None  # its CPU time then
    moved: float = field(default_factory=time.monotonic)  # when it last made progress
    slow_said: bool = False
    hup_said: bool = False  # a SIGHUP waits for it: said once


@dataclass
class _Child:
    slot: int
    started: float
    link: socket.socket
    reader: MessageReader
    beat: mmap.mmap  # where the worker's loop counts its turns
    heard: float  # when the master last saw that count move (or the fork)
    count: int = 0
    serving: bool = False
    #: Where its start-up is, as it last said (``in plugin 'x' (module m, distribution d), at
    #: ...``: gateway.lifecycle.StartupWatch), for the lines that give that start-up up.
    starting: str = ""
    hung: float | None = None  # when the watchdog found it hung and asked for its stacks
    #: During a silence: when the loop thread's wake-ups were last counted, and how many then.
    sampled: tuple[float, tuple[int, ...] | None] | None = None
    waking: bool = False  # the loop thread woke up within the last counting window
    judged: bool = False  # waking was worked out in this silence (two counts were taken)
    starved_said: bool = False
    #: The reload whose configuration it serves (0: the start's), as it last said: a worker
    #: reports every reload it applied, also one a later SIGHUP overtook.
    serves: int = 0
    #: What the master still has to send it (a reload message larger than the link's buffer, or
    #: one it has not read yet): sent as the link takes it (:meth:`_Master._send_waiting`).
    outbox: bytearray = field(default_factory=bytearray)


@dataclass
class _Reload:
    """One accepted SIGHUP while the workers' answers come in."""

    number: int
    waiting: set[int]
    applied: list[int] = field(default_factory=list)
    refused: dict[int, str] = field(default_factory=dict)


class _Master:
    def __init__(self, config_dir: Path, state_dir: Path | None, slots: list[list[socket.socket]],
                 extra: set[socket.socket], config: Config, worker_main: WorkerMain,
                 rebind: Callable[[int], list[socket.socket]] | None, timeout: float = WORKER_TIMEOUT) -> None:
        self.config_dir = config_dir
        self.state_dir = state_dir
        self.count = len(slots)
        self.slots = slots
        self.extra = extra
        self.rebind = rebind
        self.unbound: set[int] = set()  # slots whose sockets are closed until their next try
        self.accepted = config
        self.accepted_number = 0  # the reload that made it (0: the start)
        #: The configurations some worker serves, or that replacements build, by reload number.
        self.configs: dict[int, Config] = {0: config}
        self.worker_main = worker_main
        self.pid = os.getpid()
        self.children: dict[int, _Child] = {}
        self.due: dict[int, float] = {}  # slot -> when its next worker starts
        self.failures: dict[int, int] = {}  # slot -> failed starts in a row
        self.served = False  # some worker has served: no start failure is fatal from then on
        self.stop_requested = False
        self.stopping_since: float | None = None
        self.killed = False
        self.reload_pending = False
        self.reload: _Reload | None = None
        self.reloads = 0
        self.exit_code = 0
        self.timeout = timeout  # 0: no watchdog
        #: The process reading conf.d for a reload, while it runs: the master's loop goes on
        #: meanwhile (reaping, replacing and watching workers).
        self.builder: _Builder | None = None
        self.notify = ""  # $NOTIFY_SOCKET until READY=1 is said (once a worker serves)
        #: Readers given up that have not exited yet (stuck in the kernel): reaped when they do.
        self.abandoned: dict[int, _Builder] = {}
        #: Each slot's addresses (family, address), for binding it again (:meth:`_bind_quiet`).
        self.addresses: dict[int, list[tuple[int, tuple]]] = {}

    # -- signals ---------------------------------------------------------------------------------

    def on_stop(self, signum, frame) -> None:
        self.stop_requested = True
        self._kill_all(signal.SIGTERM)
        if self.builder is not None:
            # A large conf.d file takes seconds to read: the stop does not wait for it.
            _signal(self.builder.pid, signal.SIGKILL)

    def on_hup(self, signum, frame) -> None:
        self.reload_pending = True

    def _kill_all(self, sig: int) -> None:
        for pid in list(self.children):
            _signal(pid, sig)

    # -- the loop --------------------------------------------------------------------------------

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.on_stop)
        signal.signal(signal.SIGINT, self.on_stop)
        signal.signal(signal.SIGHUP, self.on_hup)
        # READY=1 once a worker serves (systemd's Type=notify), not once the workers are forked:
        # said at the fork, `systemctl start` succeeded for a gateway whose workers then never
        # served (a start-up waiting on a backend), and systemd's start timeout never applied.
        # SIGHUP is the master's to take from here on all the same; taken out of the environment
        # before the forks, so that no worker says it.
        self.notify = os.environ.pop("NOTIFY_SOCKET", "")
        for slot in range(self.count):
            self.spawn(slot)
        while self.children or self.builder or (self.due and not self.stop_requested):
            if self.stop_requested and self.stopping_since is None:
                self._begin_stop()
            if self.reload_pending and not self.stop_requested:
                if self.builder is None:
                    self.reload_pending = False
                    self._start_build()
                elif not self.builder.hup_said:
                    # Coalesced: any number of SIGHUPs meanwhile are one reload, read once this one ends.
                    self.builder.hup_said = True
                    log.info("reload: SIGHUP noted; it waits for the reading under way (%.0f s so far%s), then "
                             "conf.d is read again", time.monotonic() - self.builder.started,
                             f", at {printable(self.builder.reading)}" if self.builder.reading else "")
            self._start_due()
            self._read_links(0.1)  # signals interrupt nothing here: handlers only set flags
            self._reap()
            self._escalate()
            self._watch()
            self._watch_builder()
        self._close_sockets()
        return self.exit_code

    def spawn(self, slot: int) -> None:
        global _beat  # set in the forked worker
        if self.stop_requested:  # asked for during the start's spawns: no worker to start, then stop
            return
        if slot in self.unbound:
            try:
                self.slots[slot][:] = self._bind_quiet(slot)
            except OSError as exc:
                log.error("slot %d cannot listen again: %s; trying again in %.0f s", slot, exc, _MAX_BACKOFF)
                self.due[slot] = time.monotonic() + _MAX_BACKOFF
                return
            self.unbound.discard(slot)
        made: list = []
        try:
            parent_end, child_end = socket.socketpair()
            made += [parent_end, child_end]
            beat = mmap.mmap(-1, _BEAT.size)  # MAP_SHARED: the worker's writes are the master's to read
            made.append(beat)
        except OSError as exc:
            for thing in made:
                thing.close()
            self._cannot_spawn(slot, exc)
            return
        # A signal between fork and the child's own handlers would run the master's handler in
        # the child (a SIGTERM there signalled its siblings): held back until they are in place.
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            try:
                pid = os.fork()
            except OSError as exc:  # EAGAIN: a pids limit (systemd TasksMax=, a container's); ENOMEM
                for thing in made:
                    thing.close()
                self._cannot_spawn(slot, exc)
                return
            if pid == 0:  # worker
                code = 1
                try:
                    _child_signals()
                    parent_end.close()
                    self._close_links()  # the siblings' (and a builder's) are the master's
                    if self.timeout:
                        _beat = (beat, min(_BEAT_EVERY, self.timeout / 4))
                        _register_stacks()
                    die_with_parent(self.pid)
                    code = self.worker_main(slot, self.accepted, child_end)
                finally:
                    os._exit(code)
        finally:
            if os.getpid() == self.pid:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
        child_end.close()
        parent_end.settimeout(2.0)  # a stuck worker costs the master two seconds, not its loop
        now = time.monotonic()
        self.children[pid] = _Child(slot, now, parent_end, MessageReader(parent_end), beat, heard=now,
                                    serves=self.accepted_number)
        if self.stop_requested:
            # A SIGTERM held while forking ran its handler before this worker was known: it was
            # not told to stop, served on after "listening sockets closed" and was killed
            # (SIGKILL) KILL_AFTER seconds into the stop (review of the supervisor).
            _signal(pid, signal.SIGTERM)

    def _close_links(self) -> None:
        """In a forked child: close the master's ends of its links to the other processes."""
        for child in self.children.values():
            child.link.close()
            child.beat.close()
        if self.builder is not None:
            self.builder.link.close()

    def _cannot_spawn(self, slot: int, exc: OSError) -> None:
        """A worker for *slot* could not be made (no process, descriptor or memory to spare):
        tried again with the back-off of a failed start, the workers that serve go on. The
        error left the master's loop: the master exited, and every worker with it (review of
        reliability: one worker's crash under a pids limit became a whole outage). At the first
        start, with nothing serving yet, it still stops the gateway, saying why."""
        if not self.served:
            raise exc
        failures, delay, serving, closed = self._failed_start(slot)
        log.error("slot %d: no worker could be started (%s), %d time(s) in a row; %d of %d workers serve; trying "
                  "again in %.0f s (a process or file limit: TasksMax=, LimitNOFILE=)%s", slot, exc, failures, serving,
                  self.count, delay, closed)
        self.due[slot] = time.monotonic() + delay

    def _failed_start(self, slot: int) -> tuple[int, float, int, str]:
        """Count a failed start on *slot* and close its sockets: the failures in a row, the
        back-off before the next try, the workers that serve meanwhile, what to log of the slot."""
        failures = self.failures[slot] = self.failures.get(slot, 0) + 1
        serving = sum(c.serving for c in self.children.values())
        return failures, min(2.0 ** (failures - 1), _MAX_BACKOFF), serving, self._close_slot(slot)

    def _close_slot(self, slot: int) -> str:
        """Close *slot*'s listening sockets while no worker serves it (reuse_port: connections
        would wait in a queue nobody accepts from); rebound at its next start. What to log."""
        if self.rebind is None or slot in self.unbound:
            return ""
        self.addresses[slot] = [_address_of(sock) for sock in self.slots[slot]]
        for sock in self.slots[slot]:
            sock.close()
        self.unbound.add(slot)
        return "; its listening socket is closed meanwhile (new connections go to the others)"

    def _bind_quiet(self, slot: int) -> list[socket.socket]:
        """New sockets for *slot*, in its addresses' ``SO_REUSEPORT`` groups, bound but not
        listening: the worker's server listens on them once its plugins have started and it
        serves (asyncio and uvloop call ``listen`` on a socket they are given). Bound listening
        (``rebind``), a retried slot's socket took its share of new connections from the fork
        on, for the whole of a start-up that then failed (up to the start grace, each try): they
        waited for no one and were reset when the try was killed (review of the supervisor).
        Not listening, it is no member the kernel picks, and they go to the workers that serve."""
        made: list[socket.socket] = []
        try:
            for family, address, options in self.addresses[slot]:
                sock = socket.socket(family, socket.SOCK_STREAM)
                made.append(sock)
                for level, name, value in options:
                    sock.setsockopt(level, name, value)
                sock.bind(address)
                sock.setblocking(False)
        except BaseException:
            for sock in made:
                sock.close()
            raise
        return made

    def _start_due(self) -> None:
        now = time.monotonic()
        for slot, when in sorted(self.due.items()):
            if when <= now and not self.stop_requested:
                del self.due[slot]
                self.spawn(slot)

    def _read_links(self, timeout: float) -> None:
        links = {child.link: pid for pid, child in self.children.items()}
        sending = [child.link for child in self.children.values() if child.outbox]
        builder = self.builder
        try:
            ready, writable, _ = select.select(list(links) + ([builder.link] if builder else []), sending, [],
                                               timeout)
        except (OSError, ValueError):  # a link closed meanwhile: its worker is reaped below
            ready, writable = [], []
        if builder is not None and builder.link in ready:
            ready.remove(builder.link)
            self._read_builder(builder)
        for link in writable:
            pid = links[link]
            child = self.children.get(pid)
            if child is not None:
                self._send_waiting(pid, child)
        for link in ready:
            pid = links[link]
            child = self.children.get(pid)
            if child is not None:
                self._take_messages(pid, child)

    def _take_messages(self, pid: int, child: _Child) -> bool:
        """Act on what *child* has said so far; False when nothing complete was waiting."""
        messages = child.reader.read()
        for message in messages or []:
            self._on_message(pid, child, message)
        return bool(messages)

    def _on_message(self, pid: int, child: _Child, message: tuple) -> None:
        if message[0] == "starting":
            child.starting = printable(str(message[1]))
        elif message[0] == "serving":
            child.serving = self.served = True
            self.failures.pop(child.slot, None)
            if self.notify:
                notify_ready(self.notify)
                self.notify = ""
        elif message[0] == "reloaded" and message[1] in self.configs:
            child.serves = message[1]  # an overtaken reload's too: it serves that one now
        if message[0] in ("reloaded", "refused") and self.reload and message[1] == self.reload.number:
            self.reload.waiting.discard(pid)
            if message[0] == "reloaded":
                self.reload.applied.append(pid)
            else:
                self.reload.refused[pid] = message[2]
            self._settle_reload()

    def _reap(self) -> None:
        from prometheus_client import multiprocess

        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.builder is not None and pid == self.builder.pid:
                self._builder_exited(os.waitstatus_to_exitcode(status))
                continue
            if pid in self.abandoned:
                self.abandoned.pop(pid).link.close()
                multiprocess.mark_process_dead(pid)
                log.info("reload: the reader of conf.d given up (process %d) has ended", pid)
                continue
            child = self.children.pop(pid, None)
            if child is None:
                continue
            # What it said before it died ("serving") decides whether it failed to start: a
            # worker killed with its message unread is not a failed start.
            while self._take_messages(pid, child):
                pass
            child.link.close()
            child.beat.close()
            multiprocess.mark_process_dead(pid)
            if self.reload:
                self.reload.waiting.discard(pid)
                self._settle_reload()
            if self.stop_requested:
                continue
            self._replace(pid, child, os.waitstatus_to_exitcode(status))

    def _replace(self, pid: int, child: _Child, code: int) -> None:
        if child.serving:
            log.warning("worker %d exited (%s); starting a new one", pid, code)
            delay = 1.0 if time.monotonic() - child.started < 1.0 else 0.0  # no spinning
        elif not self.served:
            log.error("worker %d failed to start; stopping%s", pid, _where(child))
            self.exit_code = EXIT_STARTUP_FAILED
            self.on_stop(signal.SIGTERM, None)
            return
        else:
            failures, delay, serving, closed = self._failed_start(child.slot)
            log.error("worker %d failed to start (exit %s), %d time(s) in a row on slot %d; %d of %d workers "
                      "serve; trying again in %.0f s%s%s", pid, code, failures, child.slot, serving, self.count, delay,
                      closed, _where(child))
        self.due[child.slot] = time.monotonic() + delay

    # -- the watchdog ----------------------------------------------------------------------------

    def _watch(self) -> None:
        """Name each worker whose event loop has not beaten for ``self.timeout`` seconds, have it
        write its threads' stacks to stderr (where its loop is stuck: a plugin's call, a lock),
        and kill it (SIGKILL) :data:`_STACKS_GRACE` later, once it has taken that signal (at most
        :data:`_STACKS_MAX_WAIT`); :meth:`_reap` replaces it. A worker whose loop thread kept
        waking up in the last half timeout (starved of the GIL, not blocked) has up to
        :data:`_STARVED_TIMEOUTS` timeouts. Not while stopping: :meth:`_escalate` has those."""
        if not self.timeout or self.stop_requested:
            return
        now = time.monotonic()
        for pid, child in self.children.items():
            if child.hung is not None:
                waited = now - child.hung
                if waited >= _STACKS_GRACE and (waited >= _STACKS_MAX_WAIT or not _signal_pending(pid, _STACKS_SIGNAL)):
                    _signal(pid, signal.SIGKILL)  # again at each turn: harmless until it is reaped
                continue
            if not child.serving and now - child.started > start_grace(self.timeout):
                # Its loop turns (start-up runs on a thread), so the beats said nothing: a new
                # worker whose plugins' start-up never returned held its slot's socket, whose
                # share of new connections waited for no one, for good and without a word
                # (review of the supervisor). Killed as a failed start: its slot's socket is
                # closed until the next try, which the back-off spaces out.
                # At the very first start, with no worker serving yet, it was waited for without
                # end: the sockets took connections nobody answered, the log said nothing after
                # "running N workers" (and systemd had READY=1). The start fails instead, as a
                # start-up that raises does (exit 3: systemd's Restart= tries again), saying why.
                if not self.served and any(other.hung is not None for other in self.children.values()):
                    # The start fails already: one worker's stacks are enough, and two written
                    # at once to the one stderr come out interleaved, unreadable.
                    child.hung = now
                    log.error("worker %d (slot %d) has not started serving either%s; it is killed (SIGKILL)",
                              pid, child.slot, _where(child, "is"))
                    continue
                child.hung = now
                then = ("and started again" if self.served else
                        "and, no worker serving yet, the start fails (exit 3) as when a start-up fails")
                log.error("worker %d (slot %d) has not started serving %.0f s after its fork%s; its threads' "
                          "stacks follow on stderr, then it is killed (SIGKILL) %s", pid, child.slot,
                          now - child.started, _where(child, "is") or " (a plugin's gateway_startup that does not "
                          "return: a backend it waits on?)", then)
                _signal(pid, _STACKS_SIGNAL)
                continue
            (count,) = _BEAT.unpack_from(child.beat)
            if count != child.count:
                child.count, child.heard = count, now
                child.sampled, child.waking, child.judged, child.starved_said = None, False, False, False
                continue
            silent = now - child.heard
            allowed = self.timeout if child.count else max(self.timeout, _FIRST_BEAT_GRACE)
            if silent > allowed / 2:
                _count_wakeups(pid, child, now, allowed / 2)
            if silent <= allowed:
                continue
            if child.count and not child.judged and silent <= _STARVED_TIMEOUTS * allowed:
                # The counts are a half timeout apart: on a loaded machine the first look past the
                # timeout could come before the second, and the loop was killed for want of it
                # (the CI-like run). Not judged yet: the next count decides (a blocked loop goes
                # within half a timeout more).
                continue
            if child.count and child.waking and silent <= _STARVED_TIMEOUTS * allowed:
                if not child.starved_said:
                    child.starved_said = True
                    log.warning("worker %d (slot %d): its event loop has not turned for %.0f s, but its thread keeps "
                                "waking up (starved of the GIL by the worker's busy threads, or polling in a plugin's "
                                "call); it is taken for hung after %.0f s", pid, child.slot, silent,
                                _STARVED_TIMEOUTS * allowed)
                continue
            child.hung = now
            since = f"for {silent:.0f} s" if child.count else f"since it started {silent:.0f} s ago"
            log.error("worker %d (slot %d) is hung: its event loop has not turned %s (a plugin blocking it, a "
                      "deadlock, a stuck call, SIGSTOP); its threads' stacks follow on stderr, then it is killed "
                      "(SIGKILL) and a new one started; its loop thread in the kernel: %s", pid, child.slot, since,
                      _kernel_view(pid, child))
            _signal(pid, _STACKS_SIGNAL)

    # -- stopping --------------------------------------------------------------------------------

    def _begin_stop(self) -> None:
        self.stopping_since = time.monotonic()
        self.due.clear()
        # The kernel refuses a connection at once when no process holds the listening socket;
        # the workers close theirs too, and finish the requests in flight.
        self._close_sockets()
        log.info("master %d stopping: listening sockets closed, workers finish their requests", self.pid)

    def _close_sockets(self) -> None:
        for sock in {sock for slot in self.slots for sock in slot} | self.extra:
            sock.close()

    def _escalate(self) -> None:
        if self.stopping_since is None or self.killed or not self.children:
            return
        if time.monotonic() - self.stopping_since > KILL_AFTER:
            log.error("worker(s) %s still running %.0f s after SIGTERM; killing them (SIGKILL)",
                      ", ".join(map(str, sorted(self.children))), KILL_AFTER)
            self.killed = True
            self._kill_all(signal.SIGKILL)

    # -- reloading -------------------------------------------------------------------------------

    def _start_build(self) -> None:
        """Read and validate conf.d for a reload in a process of its own (its errors logged
        once, not once per worker); :meth:`_built` goes on when it answers. The master's loop
        used to do it: a large conf.d file took it 20-40 s, during which a worker that died was
        neither reaped nor replaced (its slot's socket queued a share of new connections for
        no one: 4 of 10 logins timed out) and a hung one was not killed (review of the
        supervisor)."""
        if len(self.abandoned) >= _MAX_ABANDONED:
            log.error("reload refused, the running configuration stays: %d readings of conf.d given up are still "
                      "stuck in the kernel (processes %s: a dead network mount?); fix the mount, then SIGHUP again",
                      len(self.abandoned), ", ".join(map(str, sorted(self.abandoned))))
            return
        log.info("reload: reading %s", self.config_dir)
        try:
            ours, theirs = socket.socketpair()
        except OSError as exc:
            log.error("reload refused, the running configuration stays: %s", exc)
            return
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)  # as in spawn(): the child's handlers first
        try:
            try:
                pid = os.fork()
            except OSError as exc:
                ours.close()
                theirs.close()
                log.error("reload refused, the running configuration stays: no process to read conf.d (%s)", exc)
                return
            if pid == 0:  # the builder
                code = 1
                try:
                    _child_signals()
                    ours.close()
                    self._close_links()
                    for sock in {sock for slot in self.slots for sock in slot} | self.extra:
                        sock.close()  # a dead worker's slot, closed by the master, must not listen on here
                    die_with_parent(self.pid)
                    yamlfiles.reading_hook = functools.partial(_tell_reading, theirs)
                    theirs.sendall(encode_message(_build(self.config_dir, self.state_dir)))
                    code = 0
                finally:
                    os._exit(code)
        finally:
            if os.getpid() == self.pid:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
        theirs.close()
        ours.setblocking(False)
        self.builder = _Builder(pid, ours, MessageReader(ours))
        if self.stop_requested:
            # A SIGTERM held while forking ran its handler before the builder was known here:
            # the stop then waited for the whole read (a minute for a large conf.d; review of
            # this stop's diff).
            _signal(pid, signal.SIGKILL)

    def _read_builder(self, builder: _Builder) -> None:
        _take_answer(builder, builder.reader.read())

    def _watch_builder(self) -> None:
        """Name a reload's reading of conf.d that makes no progress (no CPU used and not waiting
        for a CPU) for :data:`_BUILD_SLOW` seconds, with the file it waits on, and give it up
        (killed, the reload refused) after :func:`start_grace`. A file of a dead network mount
        held the reader for good: nothing was logged after "reload: reading", and every later
        SIGHUP waited behind it, the running configuration served for good (review of the
        supervisor). A stop does not wait for a reader the kernel will not let die."""
        builder = self.builder
        now = time.monotonic()
        if builder is None or now - builder.looked < 1.0:
            return
        builder.looked = now
        pid = builder.pid
        if self.stop_requested:
            if self.stopping_since is not None and now - self.stopping_since > _STACKS_MAX_WAIT / 2:
                log.warning("reload abandoned: the reader of conf.d (process %d) has not ended at SIGKILL (in the "
                            "kernel: %s); the master stops without it", pid, _reader_view(pid))
                self._abandon(builder)
            return
        ticks = _cpu_ticks(pid)
        if ticks is None:  # exited: reaped at the next turn
            return
        if ticks != builder.ticks or _thread_state(pid) == "R":
            builder.ticks, builder.moved = ticks, now
            return
        still = now - builder.moved
        where = (f"waiting on {printable(builder.reading)}" if builder.reading else
                 "not in a read of a file (its plugins being built: one waiting on a backend?)")
        grace = start_grace(self.timeout)
        if grace is not None and still >= grace:
            log.error("reload refused, the running configuration stays: reading %s has made no progress for %.0f s, "
                      "%s (a dead network mount?; the reader in the kernel: %s); given up (process %d killed); "
                      "send SIGHUP again once it reads", self.config_dir, still, where, _reader_view(pid), pid)
            _signal(pid, signal.SIGKILL)
            self._abandon(builder)
        elif still >= _BUILD_SLOW and not builder.slow_said:
            builder.slow_said = True
            log.warning("reload: still reading %s after %.0f s, no progress for %.0f s: %s (the reader, process %d, "
                        "in the kernel: %s); the workers serve the configuration before, SIGHUPs wait for it, and "
                        "it is given up %s", self.config_dir, now - builder.started, still, where, pid,
                        _reader_view(pid), f"after {grace:.0f} s without progress" if grace else
                        "never (worker_timeout 0)")

    def _abandon(self, builder: _Builder) -> None:
        """Stop waiting for *builder* (killed): reaped when the kernel lets it end."""
        self.builder = None
        self.abandoned[builder.pid] = builder

    def _builder_exited(self, code: int) -> None:
        from prometheus_client import multiprocess

        builder, self.builder = self.builder, None
        # What it wrote before it exited is in the link; then its end (bounded all the same,
        # should a process it started hold the link: reading stops when nothing more comes).
        builder.link.settimeout(1.0)
        while builder.answer is None:
            size = len(builder.reader.buffer)
            messages = builder.reader.read()
            if messages:
                _take_answer(builder, messages)
            elif messages is None or len(builder.reader.buffer) == size:
                break
        builder.link.close()
        multiprocess.mark_process_dead(builder.pid)
        if self.stop_requested:
            log.warning("reload abandoned: the gateway is stopping")
        elif builder.answer is None:
            log.error("reload refused, the running configuration stays: reading conf.d ended without an answer "
                      "(exit %s)", code)
        elif builder.answer[0] == "refused":
            log.error("reload refused, the running configuration stays: %s", builder.answer[1], extra=MULTILINE)
        else:
            self._built(builder.answer[1])

    def _built(self, config: Config) -> None:
        """conf.d is valid: it is the accepted configuration, and each worker builds and swaps
        it in."""
        self.reloads += 1
        message = encode_message(("reload", self.reloads, config))
        # A reload this one overtakes (its answers no longer awaited) may still be applied, or
        # refused, by each worker: what each serves is kept per worker (_Child.serves), and what
        # this one falls back to is worked out from that once it settles. Taking the overtaken
        # reload's "before" made the master believe the workers served the start's configuration
        # while they served the overtaken one: no MIXED CONFIGURATION was logged, and a
        # replacement built the start's (review of the supervisor).
        self.reload = _Reload(self.reloads, waiting=set(self.children))
        self.accepted, self.accepted_number = config, self.reloads
        self.configs[self.reloads] = config
        log.info("reload: %s is valid; workers reload it", self.config_dir)
        for pid, child in list(self.children.items()):
            # Queued whole and sent as the link takes it: a message larger than the link's
            # buffer, to a worker not reading yet (starting, starved, stopped), was sent with a
            # 2 s timeout and left half-sent, and that worker could read no later message: it
            # served the old configuration for good (review of the supervisor: a user removed
            # since still signed in on half the connections).
            child.outbox += message
            self._send_waiting(pid, child)
        self._settle_reload()

    def _send_waiting(self, pid: int, child: _Child) -> None:
        """Send what *child*'s link takes now of its outbox, without waiting."""
        while child.outbox:
            try:
                if not select.select([], [child.link], [], 0)[1]:
                    return  # the rest when it reads (_read_links watches the link)
                sent = child.link.send(child.outbox)
            except (BlockingIOError, InterruptedError, TimeoutError):
                return
            except (OSError, ValueError) as exc:  # exiting: reaped soon, its replacement starts with the new one
                log.warning("reload: worker %d did not take the configuration: %s", pid, exc)
                child.outbox.clear()
                if self.reload is not None:
                    self.reload.waiting.discard(pid)
                return
            del child.outbox[:sent]

    def _settle_reload(self) -> None:
        reload = self.reload
        if reload is None or reload.waiting:
            return
        self.reload = None
        served: dict[int, list[int]] = {}  # reload number -> the workers that serve it
        for pid, child in sorted(self.children.items()):
            served.setdefault(child.serves, []).append(pid)
        if served and reload.number not in served:
            # Every worker refused it: replacements build what the workers serve (the newest, when
            # they differ), not a configuration none of them runs.
            self.accepted_number = max(served)
            self.accepted = self.configs[self.accepted_number]
        self.configs = {n: c for n, c in self.configs.items() if n in served or n == self.accepted_number}
        if not reload.refused and len(served) <= 1:
            return
        # each reason is a worker's explain(): printable but for its own line breaks
        reasons = "".join(f"\n  worker {pid}: {reason}" for pid, reason in sorted(reload.refused.items()))
        if len(served) <= 1:
            log.error("reload refused by every worker, the running configuration stays:%s", reasons, extra=MULTILINE)
            return

        def named(number: int) -> str:
            return ("the new configuration" if number == reload.number else
                    "the configuration of the start" if number == 0 else f"the configuration of reload {number}")

        serving = ", ".join(f"worker(s) {', '.join(map(str, pids))} serve {named(number)}"
                            for number, pids in sorted(served.items(), reverse=True))
        refused = f"; worker(s) {', '.join(map(str, sorted(reload.refused)))} refused it" if reload.refused else ""
        log.error("MIXED CONFIGURATION: %s%s; remove the cause and send SIGHUP again:%s", serving, refused, reasons,
                  extra=MULTILINE)


def _where(child: _Child, tense: str = "was") -> str:
    """Where *child*'s start-up is as it last said, for a line that gives it up: the plugin it
    is in (the stacks name only modules; with ten plugins the operator had to work it out), or
    nothing when it said nothing (a start-up under a second, or an older worker)."""
    return f"; its start-up {tense} {child.starting}" if child.starting and not child.serving else ""


def _child_signals() -> None:
    """In a process the master forked (a worker, a reload's builder): SIGTERM and SIGINT back to
    their default, SIGHUP ignored (a worker's reloads come over its link), then the signals held
    around the fork let through."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)


def _take_answer(builder: _Builder, messages: list | None) -> None:
    """What a reload's reader said: the file it reads now, and its answer."""
    for message in messages or []:
        if message[0] == "reading":
            builder.reading = message[1]
        elif builder.answer is None:
            builder.answer = message


def _tell_reading(link: socket.socket, name: str | None) -> None:
    """In a reload's reader: tell the master which file is read now (None: none)."""
    try:
        link.sendall(encode_message(("reading", name)))
    except OSError:
        pass  # the master is gone: this process is told to end


def _cpu_ticks(pid: int) -> int | None:
    """The CPU time *pid* has used (clock ticks, user and system), None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return None


def _reader_view(pid: int) -> str:
    return f"state {_thread_state(pid)}, wchan {_task_file(pid, 'wchan') or '-'}"


def _address_of(sock: socket.socket) -> tuple[int, tuple, list[tuple[int, int, int]]]:
    """What binds a socket like *sock* again: its family, address and options."""
    options = [(socket.SOL_SOCKET, socket.SO_REUSEADDR), (socket.SOL_SOCKET, socket.SO_REUSEPORT),
               (socket.SOL_SOCKET, socket.SO_KEEPALIVE), (socket.IPPROTO_TCP, socket.TCP_NODELAY)]
    if sock.family == socket.AF_INET6:
        options.append((socket.IPPROTO_IPV6, socket.IPV6_V6ONLY))
    return sock.family, sock.getsockname(), [(level, name, sock.getsockopt(level, name)) for level, name in options]


def _build(config_dir: Path, state_dir: Path | None) -> tuple:
    """In the builder process: conf.d read, validated and its plugins built once (then
    discarded), as ``("valid", configuration)`` or ``("refused", the problems for the log)``."""
    from prometheus_client import values

    values.ValueClass = values.MutexValue  # its metrics are thrown away: no files of its own to the workers'
    try:
        runtime = build_runtime(config_dir, state_dir=state_dir)
    except Exception as exc:
        return ("refused", explain(exc))
    runtime.discard()
    return ("valid", runtime.config)


def _register_stacks() -> None:
    """In a new worker: write every thread's stack on :data:`_STACKS_SIGNAL`, from C and without
    the GIL, so that a loop blocked in a call shows where. A diagnostic: a worker whose stderr
    cannot take it (closed, not a file) starts without it (the signal then just ends it)."""
    try:
        faulthandler.register(_STACKS_SIGNAL, file=sys.stderr, all_threads=True)
    except (RuntimeError, OSError, ValueError, AttributeError) as exc:
        log.warning("worker %d: no stacks of a hung worker (faulthandler: %s)", os.getpid(), exc)


def _count_wakeups(pid: int, child: _Child, now: float, window: float) -> None:
    """Once every *window* seconds of a silence, count the wake-ups of *pid*'s event loop thread
    (its main thread's ``voluntary_ctxt_switches``, with its scheduler counts: time on the CPU,
    time waiting for one, times run) and say whether it woke since the last count
    (``child.waking``; not before two counts). The scheduler counts are for a thread so starved
    of CPU (two suites on two cores, the worker's busy threads) that it did not get to wait for
    the GIL even once in the window: it was killed as hung while its worker answered. A thread
    blocked for good (a lock, a sleep, a stuck call, SIGSTOP) changes none of them; nor does one
    woken and given no CPU since, which is why a thread found runnable (state R) is waking too."""
    if child.sampled is not None and now - child.sampled[0] < window:
        return
    try:
        with open(f"/proc/{pid}/task/{pid}/status") as status:
            line = next(line for line in status if line.startswith("voluntary_ctxt_switches:"))
        wakeups: tuple | None = (int(line.split()[1]),)
        try:
            with open(f"/proc/{pid}/task/{pid}/schedstat") as schedstat:
                wakeups += tuple(int(field) for field in schedstat.read().split()[:3])
        except (OSError, ValueError):
            pass  # a kernel without scheduler statistics: the switches alone
    except (OSError, StopIteration, ValueError, IndexError):
        wakeups = None
    if child.sampled is not None:
        before = child.sampled[1]
        # Runnable now (state R) is waking too: a thread woken but given no CPU since (two suites
        # on two cores, a virtual CPU the host does not run) changes none of the counts, which
        # are kept as it gets on a CPU; one blocked on a lock, a sleep or a call is asleep (S, D)
        # or stopped (T).
        moved = wakeups is not None and before is not None and wakeups != before
        child.waking = moved or _thread_state(pid) == "R"
        child.judged = True
    child.sampled = (now, wakeups)


def _task_file(pid: int, name: str, tid: int | None = None) -> str:
    """The text of ``/proc/PID/task/TID/NAME`` (the main thread's by default), stripped; ``?``
    when /proc does not say."""
    try:
        with open(f"/proc/{pid}/task/{tid or pid}/{name}") as f:
            return f.read().strip()
    except (OSError, ValueError):
        return "?"


def _thread_state(pid: int, tid: int | None = None) -> str:
    """The kernel's one-letter state of thread *tid* (the main one by default) of *pid*: R
    running or runnable, S asleep, D in uninterruptible I/O, T stopped...; ``?`` when /proc
    does not say."""
    fields = _task_file(pid, "stat", tid).rsplit(")", 1)
    return fields[1].split()[0] if len(fields) == 2 and fields[1].split() else "?"


def _kernel_view(pid: int, child: _Child) -> str:
    """What the kernel says of *pid*'s event loop thread as it is found hung, for the log: its
    state (R running or runnable, S sleeping, D in I/O, T stopped), where it sleeps (``wchan``),
    its kernel stack when /proc shows it (root), its wake-up counts at the last look and
    whether they had moved since the one before, and the states of the worker's other threads.
    A Python stack cannot say whether a thread waits on a lock, for the CPU or in a system
    call; this can."""
    stack = " < ".join(line.split(" ", 1)[-1] for line in _task_file(pid, "stack").splitlines()[:8])
    try:
        others = sorted(int(tid) for tid in os.listdir(f"/proc/{pid}/task") if int(tid) != pid)
    except (OSError, ValueError):
        others = []
    states = ",".join(_thread_state(pid, tid) for tid in others)
    counts = child.sampled[1] if child.sampled is not None else None
    return (f"state {_thread_state(pid)}, wchan {_task_file(pid, 'wchan') or '-'}, stack [{stack or '?'}], "
            f"wake-up counts {counts} ({'waking' if child.waking else 'no change'} since the look before); "
            f"other threads [{states}]")


def _signal_pending(pid: int, sig: int) -> bool:
    """Whether *sig*, sent to process *pid*, waits still for one of its threads to take it
    (``ShdPnd`` of /proc/PID/status): the kernel has not run the process since. Not for a
    stopped process (SIGSTOP: it will not run), nor when /proc does not say."""
    try:
        with open(f"/proc/{pid}/status") as status:
            fields = dict(line.split(":", 1) for line in status if ":" in line)
        if fields.get("State", "").strip().startswith(("T", "t")):
            return False
        return bool(int(fields["ShdPnd"], 16) >> (sig - 1) & 1)
    except (OSError, KeyError, ValueError):
        return False


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:  # exited meanwhile: reaped at the next turn
        pass


def start_heartbeat() -> None:
    """In a worker of a master, on its event loop: count the loop's turns for the master's
    watchdog, once now and then every second or so, for as long as the loop runs. Elsewhere
    (``--workers 1``, no master; the watchdog off), nothing."""
    if _beat is None:
        return
    page, every = _beat
    loop = asyncio.get_running_loop()
    count = 0

    def beat() -> None:
        nonlocal count
        count = count % 0xFFFF_FFFF_FFFF_FFFF + 1  # never 0, the count of a worker not heard from yet
        _BEAT.pack_into(page, 0, count)
        loop.call_later(every, beat)

    beat()


def _timeout(configured: float) -> float:
    """The ``worker_timeout`` setting (seconds; 0: no watchdog), logged when not the default.
    ``$AUTHGW_WORKER_TIMEOUT`` is that setting's environment override, validated with the rest
    of the configuration (gateway/config.py, ``apply_environment``)."""
    if configured == 0:
        log.warning("worker_timeout 0: hung workers are not replaced (no watchdog)")
    elif configured != WORKER_TIMEOUT:
        log.warning("worker_timeout %g: a worker whose event loop does not turn for %g s is killed",
                    configured, configured)
    return configured


def supervise(config_dir: Path, state_dir: Path | None, slots: list[list[socket.socket]], extra: set[socket.socket],
              config: Config, worker_main: WorkerMain, rebind: Callable[[int], list[socket.socket]] | None = None,
              reload_at_once: bool = False) -> int:
    """Run a worker per slot, each forked to run ``worker_main(slot, config, link)`` with the
    accepted *config*, until SIGTERM/SIGINT; the exit code of ``authgw serve``. *slots* (each
    slot's listening sockets) and *extra* (the plugins' listeners) are closed when the stop
    begins. With *rebind* (slots with sockets of their own), a slot whose worker fails to start
    has its sockets closed, and ``rebind(slot)`` binds new ones for the next try (in *slots*,
    where ``worker_main`` finds them)."""
    master = _Master(config_dir, state_dir, slots, extra, config, worker_main, rebind,
                     _timeout(config.core.worker_timeout))
    master.reload_pending = reload_at_once
    return master.run()
