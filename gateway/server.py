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
The master's side (the configuration it accepted, replacements, reloads) is
:mod:`gateway.supervisor`. Workers die with their master (``PR_SET_PDEATHSIG``); the master's
PID is in ``<state_dir>/authgw.pid`` (:mod:`gateway.lifecycle`).

SIGTERM closes the listening sockets at once (a new connection is refused, not left waiting in
a queue nobody reads), then in-flight requests finish within ``SHUTDOWN_GRACE``; the plugins'
``gateway_shutdown`` gets ``CLOSE_GRACE``, and one that overruns it is named in the log and
left behind, as it is when a reload retires a generation.
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
import threading
from pathlib import Path
from typing import Any, Callable

from aiohttp import web

from gateway.checks import Listener
from gateway.config import Config
from gateway.errors import ConfigError
from gateway.http.app import EXACT_TARGETS, build_apps, exact_targets
from gateway.http.protocol import ConnectionGuard, GuardedSite, hand_over
from gateway.logs import MULTILINE, RateLimitedWarning
from gateway.lifecycle import (CLOSE_GRACE, SHUTDOWN_GRACE, MessageReader, StartupWatch, early_hups, encode_message,
                               forget_early_hups, note_early_hups, notify_ready, remove_pidfile,
                               return_freed_memory, write_pidfile)
from gateway.runtime import Runtime, build_runtime
from gateway.settings import GatewaySettings, parse_listen
from gateway.supervisor import EXIT_STARTUP_FAILED, explain, start_grace, start_heartbeat, supervise

__all__ = ["serve"]

log = logging.getLogger("authgw.server")


def bind(address: str, reuse_port: bool = False) -> socket.socket:
    host, port = parse_listen(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=2048, reuse_port=reuse_port)
    # TCP keepalive and no Nagle delay on every connection, set once here: accepted sockets inherit
    # both. (aiohttp would set them on each connection, a system call and some Python each; it is
    # kept from it: GuardedSite, _NoDelayAlreadySet in gateway/http/protocol.py.)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
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


def _rebind(addresses: list[str], slot: int) -> list[socket.socket]:
    """New sockets in the ``SO_REUSEPORT`` groups for a slot whose own were closed."""
    sockets: list[socket.socket] = []
    try:
        for address in addresses:
            sockets.append(bind(address, True))
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


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
    stops accepting, hands its connections between requests over to the new one, and finishes
    its requests in flight. An invalid configuration is logged and the running one stays."""

    def __init__(self, config_dir: Path, state_dir: Path | None, sockets: list[socket.socket],
                 extra: dict[str, socket.socket], workers: int | None = None) -> None:
        self.config_dir = config_dir
        self.state_dir = state_dir
        #: The worker processes of this gateway (``--workers`` or ``workers:`` at start; a reload
        #: cannot change it): every generation's throttle store is chosen for it.
        self.workers = workers
        self.sockets = sockets
        self.extra = extra
        self.current: _Generation | None = None
        self.guard: ConnectionGuard | None = None
        #: The latest reload asked for, (configuration or None for conf.d, callback with the
        #: result); a reload in progress serves the ones asked for before it.
        self.wanted: tuple[Config | None, Callable[[bool], Any] | None] | None = None
        self.reloading: asyncio.Task | None = None
        self.refusal = ""  # why the last reload was refused
        self.retiring: set[asyncio.Task] = set()
        self.stopping = False

    async def start(self, runtime: Runtime, grace: float | None = None, watch: StartupWatch | None = None) -> None:
        """The first generation; *grace*: seconds its plugins' start-up may take (None: the master
        bounds it, killing a worker not serving in time); *watch*: where it is, by plugin."""
        settings = runtime.config.core
        self.guard = ConnectionGuard(settings.limits, settings.trusted_proxies, settings.throttle.ipv6_prefix)
        self.current = await self._start_generation(runtime, grace, watch)

    def _listeners(self, runtime: Runtime) -> dict[str, Listener]:
        listeners = {listener.name: listener for listener in runtime.gateway.listeners()}
        running = {x.name: x.address for x in self.current.runtime.gateway.listeners()} if self.current else None
        if set(listeners) != set(self.extra) or running not in (None, {n: x.address for n, x in listeners.items()}):
            raise ConfigError("plugins ask for other listeners than the running ones "
                              f"({', '.join(sorted(listeners)) or 'none'}); that needs a restart")
        return listeners

    async def _start_generation(self, runtime: Runtime, grace: float | None = None,
                                watch: StartupWatch | None = None) -> _Generation:
        """*runtime* started and listening; *grace*: seconds its plugins' start-up may take;
        *watch*: names the plugin it is in, in the log and in the message of a start-up given up."""
        listeners = self._listeners(runtime)
        generation = _Generation(runtime)
        try:
            # In the try: when one plugin's start-up fails, those already started are shut down
            # (their threads and pools), not left running beside the generation that stays.
            # On a daemon thread: a start-up that hangs (a backend that does not answer) must not
            # keep a stopping process from exiting, as a thread of the loop's executor would.
            starting = _in_thread(watch.following(runtime.gateway.startup) if watch else runtime.gateway.startup)
            try:
                await asyncio.wait_for(asyncio.shield(starting), grace)
            except asyncio.TimeoutError:
                if starting.done():
                    # The plugin's own TimeoutError (a socket timeout; asyncio's is the same class
                    # since Python 3.11): a start-up that failed, not one that never returned.
                    raise
                # A reload's start-up that never returned held every later reload behind it: the
                # worker served its configuration for good, and the master said nothing (review
                # of the supervisor). Given up (its thread left behind), the reload refused.
                where = f"; it is {watch.where()}" if watch else " (a backend one waits on?)"
                raise RuntimeError(f"the plugins' gateway_startup has not returned after {grace:.0f} s{where}; "
                                   "given up") from None
            apps = build_apps(runtime.gateway, runtime.metrics, list(listeners.values()))
            for name, app in apps.items():
                # aiohttp waits this long for a request in flight, cancels it, and waits as long
                # again: half the grace each, so that a stop takes the grace at most.
                runner = web.AppRunner(app, access_log=None, handle_signals=False,
                                       shutdown_timeout=SHUTDOWN_GRACE / 2)
                await runner.setup()
                if EXACT_TARGETS in app:  # /auth straight to its handler (gateway/http/app.py)
                    runner.server.request_handler = exact_targets(runner.server.request_handler, app[EXACT_TARGETS])
                generation.runners[name] = runner
            # Each generation listens on its own duplicate of the socket: closing it when the
            # generation retires leaves the socket (and its queue of connections) to the next.
            for sock in self.sockets:
                await GuardedSite(generation.runners[None], sock.dup(), self.guard).start()
            for name, sock in self.extra.items():
                factory = listeners[name].ssl_context
                await GuardedSite(generation.runners[name], sock.dup(), self.guard,
                                  ssl_context=factory() if factory else None, listener=name).start()
        except BaseException:
            await self._stop_generation(generation)
            raise
        return generation

    @staticmethod
    async def _stop_accepting(generation: _Generation) -> None:
        """Every site of *generation* stops accepting (each closes its socket); its connections
        stay open."""
        for runner in generation.runners.values():
            for site in list(runner.sites):
                await site.stop()

    async def _stop_generation(self, generation: _Generation) -> None:
        # Every site first, then the drains together: a second listener must not accept while
        # the first one's requests finish.
        await self._stop_accepting(generation)
        await asyncio.gather(*(runner.cleanup() for runner in generation.runners.values()))
        runtime = generation.runtime
        try:
            await asyncio.wait_for(asyncio.shield(_in_thread(runtime.close)), CLOSE_GRACE)
        except asyncio.TimeoutError:
            log.error("worker %d: plugin %r is still in its gateway_shutdown after %.0f s; going on without it",
                      os.getpid(), runtime.gateway.shutting_down or "?", CLOSE_GRACE)

    def _retire(self, generation: _Generation) -> None:
        """Stop *generation* in the background: a reload after this one need not wait for it."""
        task = asyncio.get_running_loop().create_task(self._stop_generation(generation))
        self.retiring.add(task)
        task.add_done_callback(self.retiring.discard)

    def request_reload(self, config: Config | None = None, done: Callable[[bool], Any] | None = None) -> None:
        self.wanted = (config, done)
        if self.reloading is None or self.reloading.done():
            self.reloading = asyncio.get_running_loop().create_task(self._reload_all())

    async def _reload_all(self) -> None:
        while self.wanted is not None:
            config, done = self.wanted
            self.wanted = None
            applied = await self.reload(config)
            if done is not None:
                done(applied)

    async def reload(self, config: Config | None = None) -> bool:
        """Swap in *config* (the master's), or else conf.d as it is now; False (and the errors
        logged) when it is refused."""
        loop = asyncio.get_running_loop()
        old = self.current
        if old is None:
            return False
        watch = StartupWatch(f"worker {os.getpid()}: a reload's start-up").start()
        try:
            try:
                runtime = await loop.run_in_executor(None, watch.following(functools.partial(
                    build_runtime, self.config_dir, state_dir=self.state_dir, metrics=old.runtime.metrics,
                    config=config, workers=self.workers)))
            except Exception as exc:
                return self._refused(exc)
            watch.pm = runtime.gateway.pm
            try:
                _restart_only(old.runtime.config.core, runtime.config.core)
                # Throttle counts (and failure-timing samples) go on, as metrics do: a reload must
                # never hand guessers a fresh budget.
                runtime.gateway.carry_over(old.runtime.gateway)
                new = await self._start_generation(runtime, start_grace(old.runtime.config.core.worker_timeout),
                                                   watch)
            except Exception as exc:
                runtime.discard()
                return self._refused(exc)
        finally:
            watch.stop()
        self.guard.limits = runtime.config.core.limits
        self.guard.trusted = tuple(runtime.config.core.trusted_proxies)
        # The per-client cap counts an IPv6 client by its network as the throttle does: a changed
        # prefix reached the throttle at the reload and the cap only at the next restart.
        self.guard.ipv6_prefix = runtime.config.core.throttle.ipv6_prefix
        self.current = new
        # The old generation stops accepting before the reload is said done: it listened on the
        # same sockets, and until its retirement ran, a connection made after "reloaded" could
        # still reach it and be served with the configuration before.
        await self._stop_accepting(old)
        # Its connections between requests go on with the new generation rather than being
        # closed under a request their client may be sending (gateway/http/protocol.py).
        for name, runner in old.runners.items():
            if runner.server is not None:
                hand_over(runner.server, functools.partial(self._server, name))
        log.warning("worker %d reloaded %s; chain: %s", os.getpid(), self.config_dir,
                    " -> ".join(runtime.config.core.chain))
        self._retire(old)
        return True

    def _server(self, listener: str | None):
        """The aiohttp server of *listener* (None: the ``listen:`` sockets) in the generation
        serving now; None once the worker stops."""
        runner = self.current.runners.get(listener) if self.current is not None and not self.stopping else None
        return runner.server if runner is not None else None

    def _refused(self, exc: Exception) -> bool:
        self.refusal = explain(exc)
        log.error("reload refused, the running configuration stays: %s", self.refusal, extra=MULTILINE)
        return False

    async def stop(self) -> None:
        self.wanted = None
        self.stopping = True  # a retiring generation's connections are no longer handed over
        if self.reloading is not None and not self.reloading.done():
            # A reload still starting (a plugin's start-up waiting on a backend) has the close
            # grace, then is given up: a stop waited for it without end, and the process went on
            # accepting after SIGTERM (review of reliability).
            done, _ = await asyncio.wait([self.reloading], timeout=CLOSE_GRACE)
            if not done:
                log.warning("worker %d: a reload still starting after %.0f s is given up; stopping", os.getpid(),
                            CLOSE_GRACE)
                self.reloading.cancel()
                await asyncio.wait([self.reloading], timeout=CLOSE_GRACE)
        # This process's own references first: once the generation's sites close theirs, the
        # kernel refuses new connections (unless another process still holds the socket).
        for sock in (*self.sockets, *self.extra.values()):
            sock.close()
        if self.current is not None:
            await self._stop_generation(self.current)
            self.current = None
        if self.retiring:
            await asyncio.wait(list(self.retiring))


def _in_thread(function: Callable[[], Any]) -> asyncio.Future:
    """*function* run on a daemon thread of its own: one that hangs (a plugin's shut-down) must
    not keep the process from exiting, as a thread of the loop's executor would."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if not future.done():
            future.set_exception(error) if error is not None else future.set_result(result)

    def run() -> None:
        result, error = None, None
        try:
            result = function()
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            error = exc
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    threading.Thread(target=run, name="authgw-close", daemon=True).start()
    return future


def _restart_only(old: GatewaySettings, new: GatewaySettings) -> None:
    """Keys the running process cannot change (its sockets, its process layout): say so."""
    for key in ("listen", "workers", "event_loop", "pin_workers", "reuse_port", "state_dir", "worker_timeout",
                "log_level", "log_format"):
        if getattr(old, key) != getattr(new, key):
            log.warning("reload: `%s` changed; it takes effect at the next restart", key)


async def _serve_worker(config_dir: Path, state_dir: Path | None, sockets: list[socket.socket],
                        extra: dict[str, socket.socket], runtime: Runtime | None = None,
                        config: Config | None = None, link: socket.socket | None = None,
                        workers: int | None = None) -> None:
    """Serve until SIGTERM/SIGINT. Alone (no *link*), SIGHUP reloads conf.d here; a worker of a
    master builds *config* (the master's) and takes reloads over its *link*. *workers*: how many
    worker processes the gateway runs (it chooses the throttle store of ``store: auto``)."""
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(_LoopErrors())
    start_heartbeat()  # a worker of a master: its watchdog sees this loop turn (gateway/supervisor.py)
    stop = asyncio.Event()
    worker = _Worker(config_dir, state_dir, sockets, extra, workers)
    hups = 0

    def on_hup() -> None:
        nonlocal hups
        if worker.current is None:  # still starting: reload once serving
            hups += 1
        else:
            worker.request_reload()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if link is None:
        loop.add_signal_handler(signal.SIGHUP, on_hup)
        hups += early_hups()
    else:
        loop.add_signal_handler(signal.SIGHUP, lambda: log.info(
            "worker %d: SIGHUP ignored; reloads are the master's (kill -HUP %d)", os.getpid(), os.getppid()))
    # Names the plugin a start-up that goes on is in: in the log, and to the master, which gives
    # the start-up up and says so (the stacks it has written name only modules).
    watch = StartupWatch(f"worker {os.getpid()}: the start-up", _tell_where(link)).start()
    try:
        runtime = runtime or await loop.run_in_executor(None, watch.following(functools.partial(
            build_runtime, config_dir, state_dir=state_dir, config=config, workers=workers)))
        watch.pm = runtime.gateway.pm
        # Alone (no master to watch it), the start-up is bounded here: a plugin's gateway_startup
        # that never returned kept `authgw serve` starting for good, its socket taking connections no
        # one answered and nothing logged (review of the supervisor). Under a master, the master
        # bounds it (and names the worker): two bounds would race to say why.
        await worker.start(runtime, start_grace(runtime.config.core.worker_timeout) if link is None else None, watch)
    finally:
        watch.stop()  # before the link is the loop's (_follow_master): the watch tells on it
    names = ", ".join([_url(s) for s in sockets] + [_url(s, "https" if x.ssl_context else "http") + f" ({n})"
                      for n, s in extra.items() for x in runtime.gateway.listeners() if x.name == n])
    if link is not None:  # the master first: once this line is logged, the master has been told
        _follow_master(worker, link)
    log.info("authgw worker %d serving on %s; chain: %s; event loop: %s", os.getpid(), names,
             " -> ".join(runtime.config.core.chain), type(loop).__module__.split(".")[0])
    if link is None:
        notify_ready()  # alone, this process is the service: serving, and SIGHUP reloads
    if hups:
        worker.request_reload()
    try:
        await stop.wait()
        log.info("worker %d stopping", os.getpid())
    finally:
        if link is not None:
            loop.remove_reader(link.fileno())
        await worker.stop()


def _tell_where(link: socket.socket | None) -> Callable[[str], None] | None:
    """What tells the master where this worker's start-up is (:class:`StartupWatch`)."""
    if link is None:
        return None

    def tell(where: str) -> None:
        try:
            # Without waiting: this thread must not hold the link half-written when the loop
            # takes it over (a few hundred bytes go whole into an empty enough buffer, or not at all).
            link.send(encode_message(("starting", where[:1000])), socket.MSG_DONTWAIT)
        except OSError:
            pass  # the master is gone (this worker is told to stop) or not reading: it is in the log too

    return tell


def _follow_master(worker: _Worker, link: socket.socket) -> None:
    """Tell the master this worker serves; from now on, reload what it sends, and say how it went."""
    loop = asyncio.get_running_loop()
    link.setblocking(False)
    reader = MessageReader(link)

    def tell(message: tuple) -> None:
        try:
            link.sendall(encode_message(message))
        except OSError as exc:  # the master is gone (this worker is told to stop) or stuck
            log.warning("worker %d cannot tell the master %s: %s", os.getpid(), message[0], exc)

    def answer(number: int, applied: bool) -> None:
        tell(("reloaded", number) if applied else ("refused", number, worker.refusal))

    def on_message() -> None:
        try:
            messages = reader.read()
        except Exception as exc:  # noqa: BLE001 - a frame that does not read: the link is out of step
            # No later message could be read either: this worker would serve its configuration
            # for good. It stops (its requests answered) and the master starts another.
            log.error("worker %d: a message from the master does not read (%s): stopping; the master "
                      "starts a worker with its configuration", os.getpid(), exc.__class__.__name__)
            loop.remove_reader(link.fileno())
            os.kill(os.getpid(), signal.SIGTERM)
            return
        if messages is None:
            loop.remove_reader(link.fileno())
            return
        for _kind, number, config in messages:  # ("reload", number, configuration)
            worker.request_reload(config, functools.partial(answer, number))

    tell(("serving",))
    loop.add_reader(link.fileno(), on_message)


class _LoopErrors:
    """The worker's event-loop exception handler (errors no task was there to receive).

    A peer certificate the ``ssl`` module cannot decode (a client certificate's UPN that is not
    UTF-8, say) makes the loop's own TLS protocol raise in its handshake callback, at
    ``getpeercert()``: the connection is refused, and the default handler logged a traceback for
    each one, so one certificate from a trusted CA could fill the log. Those are logged in one
    line a minute at most, with a count; everything else goes to the default handler."""

    def __init__(self) -> None:
        # A TLS handshake's refusal: logged where the HTTP layer's other refusals are.
        self.warn = RateLimitedWarning(logging.getLogger("authgw.http"), every=60.0)

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        failure = context.get("exception")
        if context.get("message") != "SSL handshake failed" or not isinstance(failure, ValueError):
            loop.default_exception_handler(context)
            return
        self.warn("undecodable_certificate", "worker %d: refused a TLS connection whose peer certificate Python's "
                  "ssl module cannot decode (%s); such refusals are logged once a minute at most",
                  os.getpid(), failure.__class__.__name__)


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
                 extra: dict[str, socket.socket], run, runtime: Runtime | None = None,
                 config: Config | None = None, link: socket.socket | None = None,
                 workers: int | None = None) -> int:
    try:
        run(_serve_worker(config_dir, state_dir, sockets, extra, runtime, config, link, workers))
    except ConfigError as exc:  # what to fix, not a traceback at every retry of a replacement
        log.error("worker %d failed: the configuration does not start:%s", os.getpid(), explain(exc), extra=MULTILINE)
        return EXIT_STARTUP_FAILED
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
    note_early_hups()  # until the reload handlers exist (cli.main did already, for `authgw serve`)
    return_freed_memory()  # inherited by the workers
    # Validate and build everything once in the master: configuration and plugin errors stop here.
    # `--workers` wins over `workers:`; the count decides the throttle store (`store: auto`), here,
    # in every worker, at every reload and in every replacement worker.
    probe = build_runtime(config_dir, state_dir=state_dir, workers=workers)
    # The state directory is the one this start found (--state-dir, else `state_dir:`), for
    # every worker, reload and replacement: a reload read a changed `state_dir:` again, and the
    # throttle's counts (a guesser's budget) started afresh in the new one (review).
    state_dir = probe.state_dir
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
            return _worker_main(config_dir, state_dir, slots[0], extra, run, probe, workers=count)
        probe.discard()  # each worker builds its own after the fork, from probe.config

        def worker_main(slot: int, config: Config, link: socket.socket) -> int:
            forget_early_hups()  # the master's, not this worker's
            if settings.pin_workers:
                _pin(slot)
            for other in _distinct(slots) - set(slots[slot]):
                other.close()  # the master keeps them for the workers of those slots
            return _worker_main(config_dir, state_dir, slots[slot], extra, run, config=config, link=link,
                                workers=count)

        metrics_dir = _enable_multiprocess_metrics()
        log.info("authgw master %d running %d workers%s", os.getpid(), count,
                 ", each on a listening socket of its own (reuse_port)" if len(_distinct(slots)) > len(slots[0]) else "")
        try:
            own = len(_distinct(slots)) > len(slots[0])  # reuse_port: a socket per slot
            return supervise(config_dir, state_dir, slots, set(extra.values()), probe.config, worker_main,
                             rebind=functools.partial(_rebind, listen or settings.listen) if own else None,
                             reload_at_once=early_hups() > 0)
        finally:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    finally:
        remove_pidfile(pidfile)
