"""A start-up that hangs names the plugin it hangs in, through real ``authgw serve --workers 2``
processes and third-party plugins installed as a distribution: one whose ``gateway_startup``
waits in its own code (opening a FIFO nobody writes to), one that waits inside a library it
called (ldap3, binding to a server that takes the connection and never answers). The master
used to say only that a worker had not started serving, and the stacks it had written named
modules: with ten plugins the operator had to work out which one hung (the last stop's note)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading

import pytest

from support.gateway import GatewayProcess, static_users, write_conf
from support.net import free_port, wait_for
from support.supervisorenv import (alice_hash, gateway_yaml, master_pid, plugins_env, realm,  # noqa: F401
                                   realms, serving)

DIST = "supervisor-left47-plugins"

_FINE = '''
from gateway import PluginSettings, hookimpl


class Fine:
    """Starts at once, and wraps every plugin's gateway_startup: a wrapper waits (suspended) while
    the others start, and must not be taken for the one that hangs."""

    def __init__(self, settings, context):
        pass

    @hookimpl(wrapper=True)
    def gateway_startup(self):
        return (yield)
'''

_FIFO = '''
import os

from gateway import PluginSettings, hookimpl


class HangsOnFifoSettings(PluginSettings):
    fifo: str


class HangsOnFifo:
    """Its gateway_startup opens a FIFO for reading: it waits, in its own code, until a writer
    opens it (the test's clean-up does)."""

    Settings = HangsOnFifoSettings

    def __init__(self, settings, context):
        self.fifo = settings.fifo

    @hookimpl
    def gateway_startup(self):
        with open(self.fifo + ".waiting", "a") as f:
            f.write(f"{os.getpid()}\\n")
        with open(self.fifo) as fifo:
            fifo.read()
'''

_IN_LIBRARY = '''
import os

import ldap3

from gateway import PluginSettings, hookimpl


class HangsInLibrarySettings(PluginSettings):
    port: int
    flag: str


class HangsInLibrary:
    """Its gateway_startup binds to an LDAP server with no receive timeout: it waits inside
    ldap3 (a socket read) while the server never answers."""

    Settings = HangsInLibrarySettings

    def __init__(self, settings, context):
        self.port = settings.port
        self.flag = settings.flag

    @hookimpl
    def gateway_startup(self):
        with open(self.flag, "a") as f:
            f.write(f"{os.getpid()}\\n")
        server = ldap3.Server("127.0.0.1", port=self.port)
        ldap3.Connection(server, user="cn=startup", password="not-logged", auto_bind=True)
'''

_TIMES_OUT = '''
import socket

from gateway import PluginSettings, hookimpl


class TimesOutSettings(PluginSettings):
    port: int


class TimesOut:
    """Its gateway_startup reads from a server that never answers, with a timeout of its own:
    it fails at once with the socket's TimeoutError."""

    Settings = TimesOutSettings

    def __init__(self, settings, context):
        self.port = settings.port

    @hookimpl
    def gateway_startup(self):
        with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
            sock.recv(1)
'''


@pytest.fixture
def plugin_env(tmp_path):
    return plugins_env(tmp_path / "site", DIST, {"fine": "left47_plugins.fine:Fine",
                                                 "hangsfifo": "left47_plugins.fifo:HangsOnFifo",
                                                 "hangsinlib": "left47_plugins.inlib:HangsInLibrary",
                                                 "timesout": "left47_plugins.timesout:TimesOut"},
                       {"left47_plugins/__init__.py": "", "left47_plugins/fine.py": _FINE,
                        "left47_plugins/fifo.py": _FIFO, "left47_plugins/inlib.py": _IN_LIBRARY,
                        "left47_plugins/timesout.py": _TIMES_OUT})


#: The master's line for a reload every worker refused, with its workers' reasons (one a line).
_REFUSED_BY_EVERY_WORKER = r"ERROR[^\n]*reload refused by every worker[^\n]*(\n  worker [^\n]*)+"


def _release(fifo) -> None:
    """Let every start-up waiting to open *fifo* go on (it reads an end of file)."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass  # no reader (any more)


def _starting(gw: GatewayProcess) -> GatewayProcess:
    """*gw* started, not waited for: it never becomes healthy."""
    gw._log = open(gw.log_path, "ab")
    gw.proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(gw.conf_dir), "--state-dir", str(gw.state_dir),
         "--workers", str(gw.workers), "--listen", f"127.0.0.1:{gw.port}"], stdout=gw._log,
        stderr=subprocess.STDOUT, env=gw.env)
    return gw


def test_a_first_start_that_hangs_in_a_plugins_own_code_names_that_plugin(conf_dir, alice_hash, plugin_env,
                                                                          tmp_path):
    """Two workers whose start-up hangs in `hangsfifo`'s gateway_startup, beside a plugin that
    started and wraps a hook: each worker names that plugin, its module and distribution, at
    WARNING after 10 s, and the master names it where it gives the start up (exit 3)."""
    fifo = tmp_path / "backend.fifo"
    os.mkfifo(fifo)
    write_conf(conf_dir, {"gateway.yaml": gateway_yaml("r0", "plugins: [fine, hangsfifo]\n"),
                          "hangsfifo.yaml": f"hangsfifo:\n  fifo: {fifo}\n", **static_users({"alice": alice_hash})})
    gw = _starting(GatewayProcess(conf_dir, tmp_path / "state", workers=2, env=plugin_env))
    try:
        wait_for(lambda: len(open(f"{fifo}.waiting").read().split()) == 2 if os.path.exists(f"{fifo}.waiting")
                 else False, timeout=60, what="both workers in the start-up", log=gw.output)
        code = gw.proc.wait(timeout=120)
        out = gw.output()
        assert code == 3, out[-4000:]
        named = (r"in plugin 'hangsfifo' \(module left47_plugins\.fifo, distribution supervisor-left47-plugins "
                 r"1\.0\), at HangsOnFifo\.gateway_startup \(left47_plugins\.fifo, line \d+\)")
        for pid in open(f"{fifo}.waiting").read().split():
            assert re.search(rf"WARNING.*worker {pid}: the start-up has not finished after 1\d s; it is {named}$",
                             out, re.M), out[-6000:]
        assert re.search(rf"ERROR.*has not started serving \d+ s after its fork; its start-up is {named}; its "
                         r"threads' stacks follow", out), out[-6000:]
        assert re.search(rf"ERROR.*worker \d+ failed to start; stopping; its start-up was {named}$", out, re.M), \
            out[-6000:]
        assert "plugin 'fine'" not in out, out[-6000:]  # started, and its wrapper waits suspended: not it
    finally:
        _release(fifo)
        gw.stop()


def test_a_reload_that_hangs_inside_a_library_a_plugin_called_names_that_plugin(conf_dir, alice_hash, plugin_env,
                                                                                start_gateway, tmp_path):
    """A reload whose start-up waits inside ldap3 (the innermost frames are the library's, not
    the plugin's): the plugin that called it is named, with where it waits, at WARNING after
    10 s and in the refusal once the start-up is given up; the workers serve on."""
    silent = socket.create_server(("127.0.0.1", free_port()), backlog=16)  # takes connections, never answers
    flag = tmp_path / "binding"
    gw = start_gateway(write_conf(conf_dir, {"gateway.yaml": gateway_yaml("r0", "plugins: [fine]\n"),
                                             **static_users({"alice": alice_hash})}), workers=2, env=plugin_env)
    try:
        wait_for(lambda: len(serving(gw)) == 2, what="two workers serving", log=gw.output)
        write_conf(conf_dir, {"hangsinlib.yaml": f"hangsinlib:\n  port: {silent.getsockname()[1]}\n  flag: {flag}\n",
                              "gateway.yaml": gateway_yaml("r1", "plugins: [fine, hangsinlib]\n")})
        os.kill(master_pid(gw), signal.SIGHUP)
        wait_for(lambda: flag.exists() and len(flag.read_text().split()) == 2, timeout=60,
                 what="both workers binding in their reload's start-up", log=gw.output)
        named = (r"in plugin 'hangsinlib' \(module left47_plugins\.inlib, distribution supervisor-left47-plugins "
                 r"1\.0\), at HangsInLibrary\.gateway_startup \(left47_plugins\.inlib, line \d+\), waiting in "
                 r"\S+ \(ldap3\.[\w.]+, line \d+\)")
        for pid in serving(gw):
            line = wait_for(lambda: re.search(rf"WARNING.*worker {pid}: a reload's start-up has not finished after "
                                              rf"1\d s; it is .*", gw.output()), timeout=60,
                            what="the slow reload named", log=gw.output).group(0)
            assert re.search(named, line), line  # the plugin, and the library it waits in
        line = wait_for(lambda: re.search(_REFUSED_BY_EVERY_WORKER, gw.output()),
                        timeout=120, what="the reload given up", log=gw.output).group(0)
        for pid in serving(gw):
            assert re.search(rf"worker {pid}: RuntimeError: the plugins' gateway_startup has not returned after \d+ s; "
                             rf"it is {named}; given up", line), line
        assert "plugin 'fine'" not in gw.output() and "not-logged" not in gw.output(), gw.output()[-6000:]
        assert realms(gw, timeout=30) == {realm("r0")}  # the workers serve on
    finally:
        silent.close()  # the connections waiting in its queue are reset: the threads left behind end


def test_a_start_up_that_raises_timeout_error_is_not_reported_as_one_that_never_returned(
        conf_dir, alice_hash, plugin_env, start_gateway):
    """A plugin whose gateway_startup raised TimeoutError (a socket's timeout) at once had its
    reload refused as "gateway_startup has not returned after 30 s (a backend one waits on?)":
    asyncio's TimeoutError is the built-in one since Python 3.11, so the grace's handler took
    the plugin's error for its own. The refusal now says what the plugin raised."""
    silent = socket.create_server(("127.0.0.1", free_port()), backlog=16)
    gw = start_gateway(write_conf(conf_dir, {"gateway.yaml": gateway_yaml("r0"),
                                             **static_users({"alice": alice_hash})}), workers=2, env=plugin_env)
    try:
        wait_for(lambda: len(serving(gw)) == 2, what="two workers serving", log=gw.output)
        write_conf(conf_dir, {"timesout.yaml": f"timesout:\n  port: {silent.getsockname()[1]}\n",
                              "gateway.yaml": gateway_yaml("r1", "plugins: [timesout]\n")})
        os.kill(master_pid(gw), signal.SIGHUP)
        line = wait_for(lambda: re.search(_REFUSED_BY_EVERY_WORKER, gw.output()),
                        timeout=60, what="the reload refused", log=gw.output).group(0)
        assert "has not returned" not in gw.output(), line
        assert all(f"worker {pid}: TimeoutError: timed out" in line for pid in serving(gw)), line
        assert realms(gw, timeout=30) == {realm("r0")}
    finally:
        silent.close()


def test_where_names_the_innermost_plugin_and_says_when_no_plugin_is_on_the_stack(tmp_path):
    """The stack walk alone, on real threads: a plugin object registered under a name whose
    entry point's module is another one (it imports its class from elsewhere) is named by the
    module of the object registered; a thread in no plugin's code is said to be in none."""
    from support.fakedist import make_dist

    site = make_dist(tmp_path / "site", "left47-where", {"outer": "left47_entry:Outer"},
                     {"left47_entry.py": "from left47_impl import Outer\n",
                      "left47_impl.py": '''
                          import threading
                          gate = threading.Event()
                          class Outer:
                              def gateway_startup(self):
                                  gate.wait(30)
                          '''})
    sys.path.insert(0, str(site))
    try:
        import importlib.metadata as md

        import pluggy

        from gateway.registry import PluginInfo, plugin_places, where_in_plugins

        ep = next(ep for ep in md.entry_points(group="authgw.plugins") if ep.name == "outer")
        impl = __import__("left47_impl")
        discovered = {"outer": PluginInfo("outer", ep.value, "left47-where", "1.0", ep)}
        pm = pluggy.PluginManager("authgw")
        plugin = impl.Outer()
        pm.register(plugin, name="outer")
        stuck = threading.Thread(target=plugin.gateway_startup)
        idle = threading.Event()
        from gateway.lifecycle import StartupWatch

        elsewhere = threading.Thread(target=StartupWatch("test").following(lambda: idle.wait(30)))
        stuck.start()
        elsewhere.start()
        try:
            wait_for(lambda: {stuck.ident, elsewhere.ident} <= set(sys._current_frames()))
            frames = sys._current_frames()
            # Without the registered object only the entry point's module is known: not this code.
            assert where_in_plugins(frames[stuck.ident], plugin_places(discovered)).startswith("not inside a plugin")
            where = where_in_plugins(frames[stuck.ident], plugin_places(discovered, pm))
            assert re.match(r"in plugin 'outer' \(module left47_impl, distribution left47-where 1\.0\), at "
                            r"Outer\.gateway_startup \(left47_impl, line \d+\), waiting in Condition\.wait "
                            r"\(threading, line \d+\)", where), where
            # In the core's code (what runs a start-up), waiting in the standard library's.
            where = where_in_plugins(frames[elsewhere.ident], plugin_places(discovered, pm))
            assert re.match(r"not inside a plugin, at the core's StartupWatch\.following\.<locals>\.run \(gateway\."
                            r"lifecycle, line \d+\), waiting in Condition\.wait \(threading, line \d+\)$", where), where
            del frames
        finally:
            impl.gate.set()
            idle.set()
            stuck.join(10)
            elsewhere.join(10)
    finally:
        sys.path.remove(str(site))
        for name in ("left47_entry", "left47_impl"):
            sys.modules.pop(name, None)
