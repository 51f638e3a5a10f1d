"""Review of the supervisor and the workers' start-ups through real ``authgw serve --workers 2``
processes: a stop that arrives while the master forks a worker, a plugin start-up that never
returns in a worker's reload, and one that never returns in a replacement worker."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from support.gateway import static_users, write_conf
from support.net import free_port, wait_for, wait_for_port
from support.proc import children
from support.supervisorenv import (PASSWORD, TESTS_DIR, alice_hash, alive, conf, gateway_yaml, master_pid,  # noqa: F401
                                   plugins_env, realm, realms, serving)


# -- a stop while the master forks a worker -------------------------------------------------------

#: ``authgw`` with one change of timing: once the file $SPAWN_FLAG exists, a SIGTERM reaches the
#: master while it forks a worker. Signals are blocked around that fork, so the handler runs when
#: they are unblocked, before the master has noted the new worker.
_SIGTERM_AT_SPAWN = '''
import os, runpy, signal, sys

import gateway.supervisor as supervisor

_real_fork = os.fork
_in_spawn = [False]


def _fork():
    pid = _real_fork()
    if pid and _in_spawn[0] and os.path.exists(os.environ["SPAWN_FLAG"]):
        os.kill(os.getpid(), signal.SIGTERM)  # pending until the master unblocks signals
    return pid


def _spawn(self, slot, _real=supervisor._Master.spawn):
    _in_spawn[0] = True
    try:
        return _real(self, slot)
    finally:
        _in_spawn[0] = False


os.fork = _fork
supervisor._Master.spawn = _spawn
sys.argv = ["authgw", *sys.argv[1:]]
runpy.run_module("gateway", run_name="__main__")
'''


@pytest.mark.parametrize("when", ["a replacement", "the start"])
def test_a_stop_that_arrives_while_a_worker_is_forked_stops_that_worker_too(tmp_path, alice_hash, when):
    """The SIGTERM handler signalled the workers the master knew; one forked as the signal came
    was not among them: it went on serving after "listening sockets closed" until the master
    killed it (SIGKILL) KILL_AFTER (17) seconds into the stop, its requests cut (review of the
    supervisor). Now a worker forked once a stop was asked for is told to stop at once, and no
    further one is forked."""
    conf_dir = conf(tmp_path / "conf.d", alice_hash, "r0")
    script = tmp_path / "sigterm_at_spawn.py"
    script.write_text(_SIGTERM_AT_SPAWN)
    flag = tmp_path / "armed"
    if when == "the start":
        flag.write_text("")
    port = free_port()
    log_path = tmp_path / "log"
    output = lambda: log_path.read_text(errors="replace")  # noqa: E731
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, str(script), "serve", "--config", str(conf_dir),
                                 "--state-dir", str(tmp_path / "state"), "--workers", "2",
                                 "--listen", f"127.0.0.1:{port}"], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "SPAWN_FLAG": str(flag), "PYTHONPATH": TESTS_DIR})
    try:
        if when == "a replacement":
            wait_for_port("127.0.0.1", port, timeout=30, proc=proc)
            wait_for(lambda: output().count("serving on") >= 2, 30, what="two workers serving", log=output)
            flag.write_text("")
            os.kill(children(proc.pid)[0], signal.SIGKILL)  # its replacement is forked as the SIGTERM comes
        assert proc.wait(timeout=60) == 0, output()[-3000:]
        assert "still running" not in output() and "killing them (SIGKILL)" not in output(), output()[-3000:]
        assert "Traceback" not in output(), output()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


# -- plugin start-ups that never return -----------------------------------------------------------

_HANGS_AT_START = '''
import os
import time

from gateway import PluginSettings, hookimpl


class HangsAtStartSettings(PluginSettings):
    #: a file holding the PIDs (one a line) whose start-up waits, or ``all``; the wait ends when
    #: the file no longer names the process
    pid_file: str


class HangsAtStart:
    """A ``gateway_startup`` that waits for a backend that does not answer (no timeout of its
    own), in the processes ``pid_file`` names, for as long as it names them."""

    Settings = HangsAtStartSettings

    def __init__(self, settings, context):
        self.pid_file = settings.pid_file

    def _named(self):
        try:
            with open(self.pid_file) as f:
                names = f.read().split()
        except FileNotFoundError:
            return False
        return "all" in names or str(os.getpid()) in names

    @hookimpl
    def gateway_startup(self):
        if not self._named():
            return
        with open(self.pid_file + ".waiting", "a") as f:  # for the test to wait for
            f.write(f"{os.getpid()}\\n")
        deadline = time.monotonic() + 600  # bounded, for a test run that goes wrong
        while self._named() and time.monotonic() < deadline:
            time.sleep(0.1)
'''


@pytest.fixture
def plugin_env(tmp_path):
    return plugins_env(tmp_path / "site", "supervisor-left45-plugins", {"hangsatstart": "left45_hangs:HangsAtStart"},
                       {"left45_hangs.py": _HANGS_AT_START})


def test_a_reload_whose_plugin_start_up_never_returns_is_refused_and_the_next_reload_applies(
        conf_dir, alice_hash, start_gateway, plugin_env, tmp_path):
    """A worker whose reload waited in a plugin's start-up for good (a backend it waits on with no
    timeout) served the configuration before it for good: every later reload queued behind it
    (the one that removed the plugin too), and the master said nothing, its answer never came
    (review of the supervisor: one worker of two served the start's realm after two reloads).
    Now the start-up has the start grace (the worker timeout, at least 30 s); then the reload is
    refused, which the master reports, and the next one applies."""
    waiting = tmp_path / "waiting"
    gw = start_gateway(conf(conf_dir, alice_hash, "r0"), workers=2, env=plugin_env)
    wait_for(lambda: len(serving(gw)) == 2, what="two workers serving", log=gw.output)
    stuck = serving(gw)[0]
    waiting.write_text(f"{stuck}\n")  # its start-up waits; the other worker's does not
    (conf_dir / "hangsatstart.yaml").write_text(f"hangsatstart:\n  pid_file: {waiting}\n")
    (conf_dir / "gateway.yaml").write_text(gateway_yaml("r1", "plugins: [hangsatstart]\n"))
    os.kill(master_pid(gw), signal.SIGHUP)
    wait_for(lambda: Path(f"{waiting}.waiting").exists(), timeout=30, what="the start-up waiting", log=gw.output)
    line = wait_for(lambda: re.search(r"MIXED CONFIGURATION: .*", gw.output()), timeout=120,
                    what="the reload given up and reported", log=gw.output).group(0)
    assert f"worker(s) {stuck} refused it" in line, line
    assert f"worker {stuck}: RuntimeError: the plugins' gateway_startup has not returned after 30 s" in gw.output()
    # The next reload (without the plugin) reaches both workers.
    (conf_dir / "gateway.yaml").write_text(gateway_yaml("r2"))
    os.kill(master_pid(gw), signal.SIGHUP)
    wait_for(lambda: gw.output().count(" reloaded ") >= 3, timeout=60, what="the next reload in both workers",
             log=gw.output)
    assert realms(gw, timeout=30) == {realm("r2")}
    assert alive(stuck) and gw.auth("alice", PASSWORD).status == 200
    waiting.unlink()  # the thread left behind ends
    assert gw.proc.poll() is None and "Traceback" not in gw.output()


def test_a_replacement_whose_plugin_start_up_never_returns_is_killed_and_its_slot_closed_until_it_serves(
        conf_dir, alice_hash, start_gateway, plugin_env, tmp_path):
    """A replacement worker whose plugins' start-up never returned held its slot's listening
    socket (reuse_port) for good: the kernel queued every other new connection there, for no one
    to accept (half the logins timed out, 40 s on), and nothing was logged; its loop turned, so
    the watchdog saw nothing wrong (review of the supervisor). Now a new worker not serving the
    start grace after its fork is named, its stacks written, killed and started again as a failed
    start (its slot's socket closed meanwhile), until one serves."""
    waiting = tmp_path / "waiting"
    write_conf(conf_dir, {"gateway.yaml": gateway_yaml("r0", "plugins: [hangsatstart]\n"),
                          "hangsatstart.yaml": f"hangsatstart:\n  pid_file: {waiting}\n",
                          **static_users({"alice": alice_hash})})
    gw = start_gateway(conf_dir, workers=2, env=plugin_env)
    wait_for(lambda: len(serving(gw)) == 2, what="two workers serving", log=gw.output)
    waiting.write_text("all\n")  # the backend stops answering: every start-up from now on waits
    victim = serving(gw)[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: Path(f"{waiting}.waiting").exists(), timeout=30, what="the replacement waiting", log=gw.output)
    hung = int(Path(f"{waiting}.waiting").read_text().split()[0])
    line = wait_for(lambda: re.search(rf"worker {hung} \(slot \d+\) has not started serving .*", gw.output()),
                    timeout=120, what="the replacement named", log=gw.output).group(0)
    assert "killed (SIGKILL) and started again" in line, gw.output()[-4000:]
    wait_for(lambda: not alive(hung), timeout=30, what="the replacement killed", log=gw.output)
    # Logged when the master reaps it, a moment after it is gone (not at once under load).
    wait_for(lambda: re.search(rf"worker {hung} failed to start \(exit -9\), 1 time\(s\) in a row.*its listening "
                               r"socket is closed meanwhile", gw.output()), timeout=30,
             what="the replacement's failed start said", log=gw.output)
    assert "in gateway_startup" in gw.output(), gw.output()[-6000:]  # its stacks say where it waited
    waiting.unlink()  # the backend answers again: the next try serves
    wait_for(lambda: len(serving(gw)) == 3, timeout=120, what="a replacement serving", log=gw.output)
    assert [gw.auth("alice", PASSWORD, timeout=30).status for _ in range(12)] == [200] * 12, gw.output()[-4000:]
    assert gw.proc.poll() is None and "Traceback" not in gw.output(), gw.output()[-4000:]
