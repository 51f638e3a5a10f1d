"""``authgw serve``: listening sockets, worker processes, clean stops.

The master process validates the configuration and builds every plugin once (so a bad
configuration stops start-up before anything listens), binds the sockets, then runs the workers.
With ``--workers 1`` it serves itself; with more it forks that many workers, which share the
listening sockets, and restarts one that dies. SIGTERM or SIGINT stops the workers cleanly.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path

from aiohttp import web

from gateway.errors import ConfigError
from gateway.http.app import build_apps
from gateway.runtime import Runtime, build_runtime
from gateway.settings import parse_listen

__all__ = ["serve"]

log = logging.getLogger("authgw.server")

EXIT_STARTUP_FAILED = 3
_SHUTDOWN_GRACE = 10.0


def bind(address: str) -> socket.socket:
    host, port = parse_listen(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=2048, reuse_port=False)
    sock.setblocking(False)
    return sock


async def _serve_worker(config_dir: Path, state_dir: Path | None, sockets: list[socket.socket],
                        extra: dict[str, socket.socket], runtime: Runtime | None = None) -> None:
    runtime = runtime or build_runtime(config_dir, state_dir=state_dir)
    listeners = {listener.name: listener for listener in runtime.gateway.listeners()}
    if set(listeners) != set(extra):
        raise RuntimeError("plugins asked for different listeners in the worker than in the master")
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await loop.run_in_executor(None, runtime.gateway.startup)
    apps = build_apps(runtime.gateway, runtime.metrics, list(listeners.values()))
    runners = {name: web.AppRunner(app, access_log=None, handle_signals=False,
                                   shutdown_timeout=_SHUTDOWN_GRACE) for name, app in apps.items()}
    for runner in runners.values():
        await runner.setup()
    for sock in sockets:
        await web.SockSite(runners[None], sock).start()
    for name, sock in extra.items():
        factory = listeners[name].ssl_context
        await web.SockSite(runners[name], sock, ssl_context=factory() if factory else None).start()
    names = ", ".join([_url(s) for s in sockets] + [_url(s, "https" if listeners[n].ssl_context else "http") + f" ({n})" for n, s in extra.items()])
    log.info("authgw worker %d serving on %s; chain: %s; event loop: %s", os.getpid(), names,
             " -> ".join(runtime.config.core.chain), type(loop).__module__.split(".")[0])
    try:
        await stop.wait()
        log.info("worker %d stopping", os.getpid())
    finally:
        for runner in runners.values():
            await runner.cleanup()  # stops accepting, lets in-flight requests finish
        await loop.run_in_executor(None, runtime.close)


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
    # Validate and build everything once in the master: configuration and plugin errors stop here.
    probe = build_runtime(config_dir, state_dir=state_dir)
    settings = probe.config.core
    try:
        run = _event_loop_runner(settings.event_loop)
        sockets = [bind(address) for address in (listen or settings.listen)]
        extra = {listener.name: bind(listener.address) for listener in probe.gateway.listeners()}
    except BaseException:
        probe.discard()
        raise
    count = workers or settings.workers
    if count == 1:  # serve with the runtime just validated
        return _worker_main(config_dir, state_dir, sockets, extra, run, probe)
    probe.discard()  # each worker builds its own after the fork

    metrics_dir = _enable_multiprocess_metrics()
    children: dict[int, tuple[int, float]] = {}  # pid -> (slot, started)
    stopping = False

    def spawn(slot: int) -> None:
        pid = os.fork()
        if pid == 0:  # worker
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            code = 1
            try:
                if settings.pin_workers:
                    _pin(slot)
                code = _worker_main(config_dir, state_dir, sockets, extra, run)
            finally:
                os._exit(code)
        children[pid] = (slot, time.monotonic())

    def on_signal(signum, frame) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for slot in range(count):
        spawn(slot)
    log.info("authgw master %d running %d workers", os.getpid(), count)
    exit_code = 0
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
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
    for sock in [*sockets, *extra.values()]:
        sock.close()
    shutil.rmtree(metrics_dir, ignore_errors=True)
    return exit_code
