"""What a second review of configuration, plugin loading and the command line found, through real
``authgw`` processes and third-party plugins installed as distributions (support.fakedist):

* a plugin that calls ``sys.exit()`` while importing or starting made ``config check`` and
  ``serve`` end with status 0 and no word, ``authgw --help`` print nothing, and a reload onto it
  stop the serving gateway;
* a module plugin enabled under two names, a plugin whose attribute raises when read, and a
  misspelt ``specname=`` ended in tracebacks, pluggy's words without the plugin's name, or (with
  ``optionalhook``) loaded without a word and never called;
* ``authgw check`` never ended once a self-test hung, reported the tests after it as hanging
  without running them, and ended in a traceback on a test that returned no ``CheckResult``;
* ``serve --workers -1`` and ``--listen`` values that are no address ended in tracebacks, a
  ``*.yml`` symbolic link loop in conf.d too, and a network that is not one was named by
  pydantic's union internals (``trusted_proxies[0].lax-or-strict[lax=function-plain[...``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pluggy
import pytest

from gateway.yamlfiles import display_name
from support.fakedist import make_dist
from support.gateway import GatewayProcess, authgw, static_users, write_conf
from support.net import wait_for
from test_reload_review import PASSWORD, _errors, _hash

PLUGINS = {
    "review2_exiting.py": """
        import sys
        sys.exit(0)
    """,
    "review2_module.py": """
        from gateway import hookimpl

        @hookimpl
        def gateway_authenticate(attempt):
            return None
    """,
    "review2_plugins.py": """
        import sys
        import threading

        from gateway import PluginSettings, hookimpl
        from gateway.checks import CheckResult, SelfTest


        class ExitSettings(PluginSettings):
            exit: bool = False


        class ExitsWhenTold:
            Settings = ExitSettings

            def __init__(self, settings, context):
                if settings.exit:
                    sys.exit(0)

            @hookimpl
            def gateway_precheck(self, attempt):
                return None


        class RaisingProperty:
            def __init__(self, settings, context):
                pass

            @property
            def broken(self):
                raise RuntimeError("not built yet")

            @hookimpl
            def gateway_authenticate(self, attempt):
                return None


        class MisspeltSpec:
            def __init__(self, settings, context):
                pass

            @hookimpl(specname="gateway_precheckk", optionalhook=True)
            def deny_everyone(self, attempt):
                raise RuntimeError("never asked")

            @hookimpl
            def gateway_authenticate(self, attempt):
                return None


        NEVER = threading.Event()


        class Tests:
            def __init__(self, settings, context):
                pass

            @hookimpl
            def gateway_authenticate(self, attempt):
                return None

            @hookimpl
            def gateway_selftests(self):
                return [SelfTest("tests.hangs", lambda: CheckResult.ok("late") if NEVER.wait() else None),
                        SelfTest("tests.fine", lambda: CheckResult.ok("answered")),
                        SelfTest("tests.none", lambda: None),
                        SelfTest("tests.exits", lambda: sys.exit(3))]
    """,
}


@pytest.fixture(scope="module")
def site_env(tmp_path_factory):
    site = make_dist(tmp_path_factory.mktemp("review2") / "site", "review2-plugins", {
        "exits_importing": "review2_exiting:Plugin",
        "exits_when_told": "review2_plugins:ExitsWhenTold",
        "module_a": "review2_module",
        "module_b": "review2_module",
        "raising_property": "review2_plugins:RaisingProperty",
        "misspelt_spec": "review2_plugins:MisspeltSpec",
        "tests": "review2_plugins:Tests",
    }, PLUGINS)
    return {"PYTHONPATH": str(site)}


def _conf(tmp_path, name: str, gateway_yaml: str):
    return write_conf(tmp_path / name, {"gateway.yaml": "throttle: {enabled: false}\n" + gateway_yaml,
                                        **static_users({"alice": _hash()})})


def test_a_plugin_that_exits_while_importing_or_starting_is_a_named_error(tmp_path, site_env):
    conf = _conf(tmp_path, "importing", "chain: [static]\nplugins: [exits_importing]\n")
    found = _errors(authgw("config", "check", "--config", str(conf), env=site_env))
    assert "plugin 'exits_importing' (review2_exiting:Plugin, distribution review2-plugins 1.0) failed while " \
           "importing: SystemExit: 0" in found, found
    listed = authgw("plugins", "--config", str(conf), env=site_env)
    assert listed.returncode == 1 and "Traceback" not in listed.stderr, listed.stderr
    assert "exits_importing  CANNOT LOAD" in listed.stdout, listed.stdout

    conf = _conf(tmp_path, "starting", "chain: [static]\nplugins: [exits_when_told]\n"
                                       "exits_when_told: {exit: true}\n")
    found = _errors(authgw("config", "check", "--config", str(conf), env=site_env))
    assert "plugin 'exits_when_told' (review2_plugins:ExitsWhenTold, distribution review2-plugins 1.0) failed " \
           "to start: SystemExit: 0" in found, found

    # Installed, not enabled: `--help` still lists every command.
    shown = authgw("--help", env={**site_env, "AUTHGW_CONFIG": str(_conf(tmp_path, "help", "chain: [static]\n"))})
    assert shown.returncode == 0 and "hash-password" in shown.stdout, shown.stdout + shown.stderr


def test_a_reload_onto_a_plugin_that_exits_while_starting_is_refused_and_the_gateway_serves_on(tmp_path, site_env):
    conf = _conf(tmp_path, "conf.d", "chain: [static]\nplugins: [exits_when_told]\n")
    gw = GatewayProcess(conf, tmp_path / "state", env=site_env).start()
    try:
        assert gw.auth("alice", PASSWORD).status == 200
        write_conf(conf, {"gateway.yaml": "throttle: {enabled: false}\nchain: [static]\nplugins: [exits_when_told]\n"
                                          "exits_when_told: {exit: true}\n"})
        os.kill(gw.proc.pid, signal.SIGHUP)
        wait_for(lambda: "reload refused" in gw.output() or gw.proc.poll() is not None, timeout=30,
                 what="the reload's end", log=gw.output)
        assert gw.proc.poll() is None, gw.output()[-3000:]
        refusal = gw.output().split("reload refused", 1)[1]
        assert "plugin 'exits_when_told'" in refusal and "failed to start: SystemExit: 0" in refusal, refusal
        assert gw.auth("alice", PASSWORD).status == 200  # the running configuration stays
        assert gw.auth("alice", "wrong").status == 401
    finally:
        gw.stop()


@pytest.mark.parametrize("gateway_yaml, message", [
    ("chain: [module_a, module_b]\n",
     "plugin 'module_b' (review2_module, distribution review2-plugins 1.0) is the same object as plugin "
     "'module_a' (review2_module); enable it under one name only"),
    ("chain: [misspelt_spec]\n",
     "plugin 'misspelt_spec' (review2_plugins:MisspeltSpec, distribution review2-plugins 1.0) implements "
     "'gateway_precheckk', which is not an authgw hook; it would never be called; did you mean 'gateway_precheck'?"),
])
def test_a_plugin_that_cannot_be_registered_is_named_never_a_traceback_nor_loaded(tmp_path, site_env,
                                                                                  gateway_yaml, message):
    conf = _conf(tmp_path, "conf.d", gateway_yaml)
    assert message in _errors(authgw("config", "check", "--config", str(conf), env=site_env))


def _pluggy_reads_properties() -> bool:
    """Whether this pluggy runs a plugin's properties when it looks for hook implementations
    (before 1.7; from 1.7 it looks with ``inspect.getattr_static``)."""
    class Probe:
        @property
        def broken(self):
            raise RuntimeError("read")

    try:
        pluggy.PluginManager("probe").register(Probe())
    except RuntimeError:
        return True
    return False


def test_a_plugin_whose_property_raises_when_read_is_named_or_not_read(tmp_path, site_env):
    """A property that raises when pluggy reads it (pluggy before 1.7 reads every attribute) was a
    traceback; it is an error naming the plugin. A pluggy that does not read properties loads it."""
    conf = _conf(tmp_path, "conf.d", "chain: [raising_property]\n")
    result = authgw("config", "check", "--config", str(conf), env=site_env)
    assert "Traceback" not in result.stdout + result.stderr
    if _pluggy_reads_properties():
        assert ("plugin 'raising_property' (review2_plugins:RaisingProperty, distribution review2-plugins 1.0) cannot "
                "be registered: RuntimeError: not built yet") in _errors(result)
    else:
        assert result.returncode == 0 and "chain: raising_property" in result.stdout, result.stdout + result.stderr


def test_check_ends_when_a_self_test_hangs_and_runs_every_test_after_it(tmp_path, site_env):
    conf = _conf(tmp_path, "conf.d", "chain: [tests]\n")
    # Bounded: before, the command never ended (killed here, a failure of this test).
    checked = authgw("check", "--config", str(conf), "--state-dir", str(tmp_path / "state"), env=site_env,
                     timeout=120)
    assert "Traceback" not in checked.stderr, checked.stderr
    assert checked.returncode == 1, checked.stdout + checked.stderr
    lines = checked.stdout.splitlines()
    assert "FAIL  tests.hangs: no answer within 15s" in lines, lines
    assert "PASS  tests.fine: answered" in lines, lines  # it ran: the hung test held nothing
    assert "FAIL  tests.none: the test returned NoneType, not a CheckResult" in lines, lines
    assert "FAIL  tests.exits: the test raised SystemExit: 3" in lines, lines
    assert "4 self-tests, 3 failed" in lines, lines


@pytest.mark.parametrize("arguments, message", [
    (["--workers", "-1"], "argument --workers: -1 is not from 1 to 64 (as `workers:`)"),
    (["--workers", "0"], "argument --workers: 0 is not from 1 to 64 (as `workers:`)"),
    (["--listen", "localhost"], "argument --listen: 'localhost' is not HOST:PORT"),
    (["--listen", "127.0.0.1:65536"], "argument --listen: '127.0.0.1:65536' is not HOST:PORT"),
])
def test_serve_refuses_workers_and_addresses_it_cannot_use_without_a_traceback(tmp_path, arguments, message):
    conf = _conf(tmp_path, "conf.d", "chain: [static]\n")
    started = subprocess.run([sys.executable, "-m", "gateway", "serve", "--config", str(conf), "--state-dir",
                              str(tmp_path / "state"), "--listen", "127.0.0.1:1", *arguments],
                             capture_output=True, text=True, timeout=60)
    assert started.returncode == 2, started.stderr[-2000:]
    assert "Traceback" not in started.stderr and message in started.stderr, started.stderr[-2000:]


def test_a_yml_link_that_loops_is_reported_not_a_traceback(tmp_path):
    conf = _conf(tmp_path, "conf.d", "chain: [static]\n")
    (conf / "ldap.yml").symlink_to("ldap.yml")
    found = _errors(authgw("config", "check", "--config", str(conf)))
    assert "ldap.yml: not read: configuration files end in `.yaml`" in found, found


def test_a_network_that_is_not_one_is_named_by_its_key_and_line_once(tmp_path):
    conf = _conf(tmp_path, "conf.d", "chain: [static]\ntrusted_proxies:\n  - 10.0.0.0/8\n  - 10.0.0.1/8\n"
                                     "health:\n  details_from: [127.0.0.0/8, proxy.example]\n")
    found = _errors(authgw("config", "check", "--config", str(conf)))
    problems = [line for line in found.splitlines() if line.startswith("error: ")]
    expected = ("not an IP network: write it in CIDR form with the host bits zero (`10.0.0.0/8`, `192.0.2.7/32`, "
                "`fd00::/8`)")
    shown = display_name(conf / "gateway.yaml")
    assert problems == [f"error: {shown}:5: trusted_proxies[1]: {expected}",
                        f"error: {shown}:7: health.details_from[1]: {expected}"], problems
