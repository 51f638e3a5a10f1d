"""``authgw serve``: listening sockets, worker processes, clean stops.

The master process validates the configuration and builds every plugin once (so a bad
configuration stops start-up before anything listens), binds the sockets, then runs the workers.
With ``--workers 1`` it serves itself; with more it forks that many workers, which share the
listening sockets, and restarts one that dies. SIGTERM or SIGINT stops the workers cleanly.

With ``reuse_port`` (the default) each worker slot listens on a socket of its own
(``SO_REUSEPORT``), so the kernel spreads new connections evenly over the workers; on one
shared socket, whichever worker wakes first takes a whole burst (64 connections opened together
went 64/0 in 4 bursts of 5). The master binds and keeps every slot's socket: a worker that
dies is replaced on the same socket, and the connections queued on it meanwhile wait for the
new worker instead of being refused.

SIGHUP reloads conf.d (docs/design.md, "Reload"): the master validates it completely and logs
the errors of an invalid one, which changes nothing; each worker then builds the new
configuration beside the running one and swaps it in without dropping a request in flight.
Workers die with their master (``PR_SET_PDEATHSIG``); the master's PID is in
``<state_dir>/authgw.pid`` (:mod:`gateway.lifecycle`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path

from aiohttp import web

from gateway.checks import Listener
from gateway.errors import ConfigError
from gateway.http.app import build_apps
from gateway.http.protocol import ConnectionGuard, GuardedSite
from gateway.lifecycle import die_with_parent, remove_pidfile, return_freed_memory, write_pidfile
from gateway.runtime import Runtime, build_runtime
from gateway.settings import GatewaySettings, parse_listen

__all__ = ["serve"]

log = logging.getLogger("authgw.server")

EXIT_STARTUP_FAILED = 3
_SHUTDOWN_GRACE = 10.0


def bind(address: str, reuse_port: bool = False) -> socket.socket:
    host, port = parse_listen(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=2048, reuse_port=reuse_port)
    sock.setblocking(False)
    return sock


def bind_slots(addresses: list[str], count: int, reuse_port: bool) -> list[list[socket.socket]]:
    """The listening sockets of each of *count* worker slots: the same ones for every slot (one
    accept queue per address, which the workers share), or with *reuse_port* one socket per
    address and slot in a ``SO_REUSEPORT`` group, each with its own queue."""
    if not reuse_port or count == 1:
        return [[bind(address) for address in addresses]] * count
    for address in addresses:
        _check_free(address)
    slots: list[list[socket.socket]] = []
    try:
        for _ in range(count):
            slots.append([bind(address, True) for address in addresses])
    except BaseException:
        for sock in _distinct(slots):
            sock.close()
        raise
    return slots


def _distinct(slots: list[list[socket.socket]]) -> set[socket.socket]:
    """Every socket of *slots* once (slots share theirs without ``reuse_port``)."""
    return {sock for slot in slots for sock in slot}


def _check_free(address: str) -> None:
    """EADDRINUSE when anything listens on *address* already. A ``SO_REUSEPORT`` bind alone
    would succeed next to another group of the same user, a stale gateway for one, and the two
    would split the connections without a word."""
    host, port = parse_listen(address)
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as create_server does
        probe.bind((host, port))


class _Generation:
    """One configuration being served: its runtime, applications and sites."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.runners: dict[str | None, web.AppRunner] = {}


class _Worker:
    """The serving side of one process. SIGHUP builds a new generation from conf.d beside the
    running one (on duplicates of the same listening sockets), then retires the old one: it
    stops accepting and finishes its requests in flight. An invalid configuration is logged
    and the running one stays."""

    def __init__(self, config_dir: Path, state_dir: Path | None, sockets: list[socket.socket],
                 extra: dict[str, socket.socket]) -> None:
        self.config_dir = config_dir
        self.state_dir = state_dir
        self.sockets = sockets
        self.extra = extra
        self.current: _Generation | None = None
        self.guard: ConnectionGuard | None = None
        self.reloads = 0  # reload requests seen; a reload in progress serves them all
        self.reloading: asyncio.Task | None = None

    async def start(self, runtime: Runtime) -> None:
        settings = runtime.config.core
        self.guard = ConnectionGuard(settings.limits, settings.trusted_proxies)
        self.current = await self._start_generation(runtime)

    def _listeners(self, runtime: Runtime) -> dict[str, Listener]:
        listeners = {listener.name: listener for listener in runtime.gateway.listeners()}
        running = {x.name: x.address for x in self.current.runtime.gateway.listeners()} if self.current else None
        if set(listeners) != set(self.extra) or running not in (None, {n: x.address for n, x in listeners.items()}):
            raise ConfigError("plugins ask for other listeners than the running ones "
                              f"({', '.join(sorted(listeners)) or 'none'}); that needs a restart")
        return listeners

    async def _start_generation(self, runtime: Runtime) -> _Generation:
        loop = asyncio.get_running_loop()
        listeners = self._listeners(runtime)
        generation = _Generation(runtime)
        try:
            # In the try: when one plugin's start-up fails, those already started are shut down
            # (their threads and pools), not left running beside the generation that stays.
            await loop.run_in_executor(None, runtime.gateway.startup)
            apps = build_apps(runtime.gateway, runtime.metrics, list(listeners.values()))
            for name, app in apps.items():
                runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=_SHUTDOWN_GRACE)
                await runner.setup()
                generation.runners[name] = runner
            # Each generation listens on its own duplicate of the socket: closing it when the
            # generation retires leaves the socket (and its queue of connections) to the next.
            for sock in self.sockets:
                await GuardedSite(generation.runners[None], sock.dup(), self.guard).start()
            for name, sock in self.extra.items():
                factory = listeners[name].ssl_context
                await GuardedSite(generation.runners[name], sock.dup(), self.guard,
                                  ssl_context=factory() if factory else None).start()
        except BaseException:
            await self._stop_generation(generation)
            raise
        return generation

    async def _stop_generation(self, generation: _Generation) -> None:
        for runner in generation.runners.values():
            await runner.cleanup()  # stops accepting, lets in-flight requests finish
        await asyncio.get_running_loop().run_in_executor(None, generation.runtime.close)

    def request_reload(self) -> None:
        self.reloads += 1
        if self.reloading is None or self.reloading.done():
            self.reloading = asyncio.get_running_loop().create_task(self._reload_all())

    async def _reload_all(self) -> None:
        done = 0
        while done < self.reloads:
            done = self.reloads
            await self.reload()

    async def reload(self) -> bool:
        """Swap in conf.d as it is now; False (and the errors logged) when it is refused."""
        loop = asyncio.get_running_loop()
        old = self.current
        if old is None:
            return False
        try:
            runtime = await loop.run_in_executor(None, functools.partial(
                build_runtime, self.config_dir, state_dir=self.state_dir, metrics=old.runtime.metrics))
        except Exception as exc:
            log.error("reload refused, the running configuration stays: %s", _problems(exc))
            return False
        try:
            _restart_only(old.runtime.config.core, runtime.config.core)
            new = await self._start_generation(runtime)
        except Exception as exc:
            runtime.discard()
            log.error("reload refused, the running configuration stays: %s", _problems(exc))
            return False
        self.guard.limits = runtime.config.core.limits
        self.guard.trusted = tuple(runtime.config.core.trusted_proxies)
        self.current = new
        log.warning("worker %d reloaded %s; chain: %s", os.getpid(), self.config_dir,
                    " -> ".join(runtime.config.core.chain))
        await self._stop_generation(old)
        return True

    async def stop(self) -> None:
        if self.reloading is not None and not self.reloading.done():
            await asyncio.wait([self.reloading])
        if self.current is not None:
            await self._stop_generation(self.current)
            self.current = None


def _problems(exc: Exception) -> str:
    if isinstance(exc, ConfigError):
        return "\n  " + "\n  ".join(exc.problems)
    return f"{exc.__class__.__name__}: {exc}"


def _restart_only(old: GatewaySettings, new: GatewaySettings) -> None:
    """Keys the running process cannot change (its sockets, its process layout): say so."""
    for key in ("listen", "workers", "event_loop", "pin_workers", "reuse_port", "state_dir"):
        if getattr(old, key) != getattr(new, key):
            log.warning("reload: `%s` changed; it takes effect at the next restart", key)


_early_hups = 0  # SIGHUPs received before a process's reload handling was in place


def _note_early_hup(signum, frame) -> None:
    # Neither ignored (the configuration may have changed after this process read it) nor
    # fatal (SIGHUP's default): noted, and served once the process can reload.
    global _early_hups
    _early_hups += 1


async def _serve_worker(config_dir: Path, state_dir: Path | None, sockets: list[socket.socket],
                        extra: dict[str, socket.socket], runtime: Runtime | None = None) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    worker = _Worker(config_dir, state_dir, sockets, extra)
    hups = 0

    def on_hup() -> None:
        nonlocal hups
        if worker.current is None:  # still starting: reload once serving
            hups += 1
        else:
            worker.request_reload()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    hups += _early_hups
    runtime = runtime or await loop.run_in_executor(None, functools.partial(build_runtime, config_dir, state_dir=state_dir))
    await worker.start(runtime)
    names = ", ".join([_url(s) for s in sockets] + [_url(s, "https" if x.ssl_context else "http") + f" ({n})"
                      for n, s in extra.items() for x in runtime.gateway.listeners() if x.name == n])
    log.info("authgw worker %d serving on %s; chain: %s; event loop: %s", os.getpid(), names,
             " -> ".join(runtime.config.core.chain), type(loop).__module__.split(".")[0])
    if hups:
        worker.request_reload()
    try:
        await stop.wait()
        log.info("worker %d stopping", os.getpid())
    finally:
        await worker.stop()


def _url(sock: socket.socket, scheme: str = "http") -> str:
    host, port = sock.getsockname()[:2]
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def _event_loop_runner(choice: str):
    """``asyncio.run`` or uvloop's. uvloop's TLS layer is compiled, where asyncio's is Python:
    measured ~10% more certificate logins (new TLS connection each) per second with it."""
    if choice in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise ConfigError("event_loop: uvloop, but uvloop is not installed: pip install 'authgw[speed]'")
        else:
            return uvloop.run
    return asyncio.run


def _worker_main(config_dir: Path, state_dir: Path | None, sockets: list[socket.socket],
                 extra: dict[str, socket.socket], run, runtime: Runtime | None = None) -> int:
    try:
        run(_serve_worker(config_dir, state_dir, sockets, extra, runtime))
    except Exception:
        log.exception("worker %d failed", os.getpid())
        return EXIT_STARTUP_FAILED
    return 0


def _pin(slot: int) -> None:
    """Keep worker *slot* on one CPU of those this process may use.

    A worker's event loop and its plugin threads share one GIL; spread over several cores they
    hand it back and forth across caches (measured: ~40% fewer attempts per second). One worker
    per core, each on its own, is the shape that scales (nginx's ``worker_cpu_affinity auto``).
    """
    try:
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[slot % len(cpus)]})
    except (AttributeError, OSError) as exc:  # not Linux, or not allowed: run unpinned
        log.warning("cannot pin worker %d to a CPU: %s", os.getpid(), exc)


def _enable_multiprocess_metrics() -> str:
    """prometheus_client picks its value store at import; switch it before the first metric.
    Returns the directory the workers share their values in (the master removes it at exit)."""
    directory = tempfile.mkdtemp(prefix="authgw-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    from prometheus_client import values

    values.ValueClass = values.get_value_class()
    return directory


def serve(config_dir: Path, *, state_dir: Path | None = None, workers: int | None = None,
          listen: list[str] | None = None) -> int:
    signal.signal(signal.SIGHUP, _note_early_hup)  # until the reload handlers exist
    return_freed_memory()  # inherited by the workers
    # Validate and build everything once in the master: configuration and plugin errors stop here.
    probe = build_runtime(config_dir, state_dir=state_dir)
    settings = probe.config.core
    count = workers or settings.workers
    try:
        run = _event_loop_runner(settings.event_loop)
        slots = bind_slots(listen or settings.listen, count, settings.reuse_port)
        extra = {listener.name: bind(listener.address) for listener in probe.gateway.listeners()}
        pidfile = write_pidfile(probe.state_dir)
    except BaseException:
        probe.discard()
        raise
    try:
        if count == 1:  # serve with the runtime just validated; SIGHUP reloads in this process
            return _worker_main(config_dir, state_dir, slots[0], extra, run, probe)
        probe.discard()  # each worker builds its own after the fork
        return _supervise(config_dir, state_dir, slots, extra, run, settings.pin_workers)
    finally:
        remove_pidfile(pidfile)


def _supervise(config_dir: Path, state_dir: Path | None, slots: list[list[socket.socket]],
               extra: dict[str, socket.socket], run, pin: bool) -> int:
    """The master of one worker per slot: starts them, restarts one that dies (on its slot's
    sockets), stops them on SIGTERM/SIGINT, and on SIGHUP validates conf.d and has every worker
    reload it."""
    metrics_dir = _enable_multiprocess_metrics()
    master = os.getpid()
    children: dict[int, tuple[int, float]] = {}  # pid -> (slot, started)
    stopping = False
    reload_pending = False

    def spawn(slot: int) -> None:
        pid = os.fork()
        if pid == 0:  # worker
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, signal.SIG_DFL)
            global _early_hups
            _early_hups = 0  # the master's, not this worker's
            signal.signal(signal.SIGHUP, _note_early_hup)  # until its loop handles it
            code = 1
            try:
                die_with_parent(master)
                if pin:
                    _pin(slot)
                for other in _distinct(slots) - set(slots[slot]):
                    other.close()  # the master keeps them for the workers of those slots
                code = _worker_main(config_dir, state_dir, slots[slot], extra, run)
            finally:
                os._exit(code)
        children[pid] = (slot, time.monotonic())

    def on_signal(signum, frame) -> None:
        nonlocal stopping
        stopping = True
        _kill_all(children, signal.SIGTERM)

    def on_hup(signum, frame) -> None:
        nonlocal reload_pending
        reload_pending = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_hup)
    reload_pending = _early_hups > 0
    for slot in range(len(slots)):
        spawn(slot)
    log.info("authgw master %d running %d workers%s", master, len(slots),
             ", each on a listening socket of its own (reuse_port)" if len(_distinct(slots)) > len(slots[0]) else "")
    exit_code = 0
    while children:
        if reload_pending and not stopping:
            reload_pending = False
            _validate_then_reload(config_dir, state_dir, children)
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            time.sleep(0.1)  # signals interrupt nothing here: handlers only set flags
            continue
        child = children.pop(pid, None)
        if child is None:
            continue
        slot, started = child
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
        code = os.waitstatus_to_exitcode(status)
        if stopping:
            continue
        if code == EXIT_STARTUP_FAILED:
            log.error("worker %d failed to start; stopping", pid)
            exit_code = EXIT_STARTUP_FAILED
            on_signal(signal.SIGTERM, None)
            continue
        log.warning("worker %d exited (%s); starting a new one", pid, code)
        if time.monotonic() - started < 1.0:
            time.sleep(1.0)  # do not spin on a worker that dies at once
        spawn(slot)
    for sock in _distinct(slots) | set(extra.values()):
        sock.close()
    shutil.rmtree(metrics_dir, ignore_errors=True)
    return exit_code


def _kill_all(children: dict[int, tuple[int, float]], sig: int) -> None:
    for pid in list(children):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _validate_then_reload(config_dir: Path, state_dir: Path | None, children: dict[int, tuple[int, float]]) -> None:
    """Build conf.d once in the master (the errors are logged once, not once per worker); when
    it is valid, each worker builds and swaps it in (``_Worker.reload``)."""
    try:
        build_runtime(config_dir, state_dir=state_dir).discard()
    except Exception as exc:
        log.error("reload refused, the running configuration stays: %s", _problems(exc))
        return
    log.info("reload: %s is valid; workers reload it", config_dir)
    _kill_all(children, signal.SIGHUP)
