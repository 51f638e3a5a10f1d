"""Items earlier reviews of configuration and plugin loading left, through real ``authgw``
processes and third-party plugins installed as distributions (support.fakedist):

* numbers were lax: ``retry_after: true`` was taken as 1, ``threads: '3'`` as 3, ``deadline:
  '2.5'`` as 2.5, in the core's settings and every plugin's (a ``list[int]`` too);
* ``config show`` printed lists of keys (``encryption_keys``, ``session_keys``, ``keys``), secrets
  that are a mapping's keys (``api_keys: {sk-...: bob}``), a JWK written as a JSON string, and
  masked the path of an OIDC client's ``public_key``, which an operator needs to see;
* a plugin whose ``__getattr__`` raises for every name ended ``config check`` in a traceback (or,
  when it calls ``sys.exit()``, with status 0 and no word), a reload with no plugin named (or
  the serving gateway's exit), and ``authgw --help`` in a traceback when such a class was merely
  installed; ``credentials = 5`` ended ``config check`` in a TypeError.
"""

from __future__ import annotations

import os
import signal

import pytest

from support.fakedist import make_dist
from support.gateway import GatewayProcess, authgw, static_users, write_conf
from support.net import wait_for
from test_reload_review import PASSWORD, _errors, _hash

PLUGINS = {
    "left45_plugins.py": """
        import sys

        from gateway import PluginSettings, hookimpl


        class NumberSettings(PluginSettings):
            ports: list[int] = []
            weights: dict[str, float] = {}
            retries: int | None = None


        class Numbers:
            Settings = NumberSettings

            def __init__(self, settings, context):
                pass

            @hookimpl
            def gateway_precheck(self, attempt):
                return None


        class RaisesForEveryName:
            def __getattr__(self, name):
                raise RuntimeError(f"no {name} here")

            @hookimpl
            def gateway_authenticate(self, attempt):
                return None


        class BuiltRaisesForEveryName:
            def __init__(self, settings, context):
                pass

            def __getattr__(self, name):
                raise RuntimeError(f"no {name} here")

            @hookimpl
            def gateway_authenticate(self, attempt):
                return None


        class ExitsForEveryName:
            def __init__(self, settings, context):
                pass

            def __getattr__(self, name):
                sys.exit(0)

            @hookimpl
            def gateway_authenticate(self, attempt):
                return None


        class RaisingMeta(type):
            def __getattr__(cls, name):
                raise RuntimeError(f"no {name} on the class")


        class MetaRaises(metaclass=RaisingMeta):
            def __init__(self, settings, context):
                pass

            @hookimpl
            def gateway_authenticate(self, attempt):
                return None


        class BadCredentials:
            credentials = 5

            def __init__(self, settings, context):
                pass

            @hookimpl
            def gateway_authenticate(self, attempt):
                return None


        RAISING = RaisesForEveryName()
    """,
    "left45_module.py": """
        from gateway import hookimpl


        def __getattr__(name):
            raise RuntimeError(f"module has no {name}")


        @hookimpl
        def gateway_authenticate(attempt):
            return None
    """,
}

DIST = "distribution left45-plugins 1.0"


@pytest.fixture(scope="module")
def site_env(tmp_path_factory):
    site = make_dist(tmp_path_factory.mktemp("left45") / "site", "left45-plugins", {
        "numbers": "left45_plugins:Numbers",
        "raising_object": "left45_plugins:RAISING",
        "raising_built": "left45_plugins:BuiltRaisesForEveryName",
        "exiting_built": "left45_plugins:ExitsForEveryName",
        "raising_meta": "left45_plugins:MetaRaises",
        "raising_module": "left45_module",
        "bad_credentials": "left45_plugins:BadCredentials",
    }, PLUGINS)
    return {"PYTHONPATH": str(site)}


def _conf(directory, gateway_yaml: str, **files: str):
    return write_conf(directory, {"gateway.yaml": "throttle: {enabled: false}\n" + gateway_yaml,
                                  **static_users({"alice": _hash()}), **files})


# -- 1. numbers are strict ---------------------------------------------------------------------


def test_a_boolean_or_a_string_where_a_number_is_meant_is_an_error_at_its_line(tmp_path, site_env):
    conf = _conf(tmp_path / "conf.d", "chain: [static]\nplugins: [numbers]\nthreads: true\ndeadline: '2.5'\n"
                                      "limits:\n  retry_after: '3'\n  queue_wait: true\n  max_hold: 2.5\n",
                 **{"numbers.yaml": "numbers:\n  ports: [389, true]\n  weights: {a: '0.5'}\n  retries: '2'\n",
                    "static.yaml": "static:\n  users_file: users/users.yaml\n  reload_interval: '5'\n"})
    found = _errors(authgw("config", "check", "--config", str(conf), env=site_env))
    whole = "expected a whole number, written as one"
    number = "expected a number, written as one"
    for where, key, message in [("gateway.yaml:4", "threads", whole), ("gateway.yaml:5", "deadline", number),
                                ("gateway.yaml:7", "limits.retry_after", whole),
                                ("gateway.yaml:8", "limits.queue_wait", number),
                                ("numbers.yaml:2", "numbers.ports[1]", whole),
                                ("numbers.yaml:3", "numbers.weights.a", number),
                                ("numbers.yaml:4", "numbers.retries", whole),
                                ("static.yaml:3", "static.reload_interval", number)]:
        assert f"conf.d/{where}: {key}: {message}" in found, (where, found)
    assert "max_hold" not in found and "ports[0]" not in found  # 2.5 for a float, 389 for an int: fine
    assert len(found.strip().splitlines()) == 8, found


def test_numbers_written_as_numbers_pass_an_int_where_a_float_is_meant_too(tmp_path, site_env):
    conf = _conf(tmp_path / "conf.d", "chain: [static]\nplugins: [numbers]\nthreads: 3\ndeadline: 4\n"
                                      "limits:\n  retry_after: 2\n  queue_wait: 0.25\n",
                 **{"numbers.yaml": "numbers:\n  ports: [389, 636]\n  weights: {a: 1, b: 0.5}\n  retries: null\n"})
    result = authgw("config", "show", "--config", str(conf), env={**site_env, "AUTHGW_LIMITS__MAX_HOLD": "3"})
    assert result.returncode == 0, result.stderr
    for shown in ("threads: 3", "deadline: 4", "retry_after: 2", "queue_wait: 0.25", "max_hold: 3"):
        assert shown in result.stdout, (shown, result.stdout)


# -- 2. config show masks lists of keys --------------------------------------------------------


def test_config_show_masks_lists_of_keys_keys_of_secret_mappings_and_json_jwks(tmp_path):
    secrets = [f"Left45-Secret-{n}" for n in range(12)]
    conf = _conf(tmp_path / "conf.d", "chain: [static]\n", **{"others.yaml": f"""\
        cache:
          encryption_keys: [{secrets[0]}, {secrets[1]}]
          session_keys:
            - {secrets[2]}
          keys: [{secrets[3]}]
          redis: {{url: "redis://:{secrets[4]}@127.0.0.1:6379/0"}}
        login:
          api_keys: {{{secrets[5]}: bob}}
          tokens: {{{secrets[6]}: {{user: alice}}}}
          decryption_keys: [{secrets[7]}]
          psks: [{secrets[8]}]
          keyset: '{{"keys": [{{"kty": "oct", "kid": "keep-this-kid", "k": "{secrets[9]}"}}]}}'
          enrol_ticket: {secrets[10]}
          signing_jwks: {{keys: [{{kty: RSA, n: keep-this-modulus, e: AQAB, d: {secrets[11]}}}]}}
          session_keys_ref: {{env: KEEP_THIS_REFERENCE}}
          oidc:
            clients:
              - client_id: keep-this-client
                public_key: keys/keep-this-public.pem
                public_keys: [keys/keep-this-too.pem]
          ticket_lifetime: 86400
        """})
    shown = authgw("config", "show", "--config", str(conf))
    assert shown.returncode == 0, shown.stderr
    for secret in secrets:
        assert secret not in shown.stdout + shown.stderr, (secret, shown.stdout)
    for kept in ("keep-this-kid", "keep-this-modulus", "KEEP_THIS_REFERENCE", "keep-this-client",
                 "public_key: keys/keep-this-public.pem", "keys/keep-this-too.pem", "ticket_lifetime: 86400",
                 "redis://:<redacted>@127.0.0.1:6379/0"):
        assert kept in shown.stdout, (kept, shown.stdout)


# -- 3. a plugin whose attributes raise ----------------------------------------------------------


@pytest.mark.parametrize("name, where, shown", [
    ("raising_object", "chain", "(left45_plugins:RAISING, {dist}): reading its attribute 'credentials' raised "
                                "RuntimeError: no credentials here"),
    ("raising_object", "plugins", "(left45_plugins:RAISING, {dist}): reading its attribute 'credentials' raised "
                                  "RuntimeError: no credentials here"),
    ("raising_built", "chain", "(left45_plugins:BuiltRaisesForEveryName, {dist}): reading its attribute "
                               "'credentials' raised RuntimeError: no credentials here"),
    ("exiting_built", "chain", "(left45_plugins:ExitsForEveryName, {dist}): reading its attribute 'credentials' "
                               "raised SystemExit: 0"),
    ("raising_meta", "chain", "(left45_plugins:MetaRaises, {dist}): reading its attribute 'Settings' raised "
                              "RuntimeError: no Settings on the class"),
    ("raising_module", "chain", "(left45_module, {dist}): reading its attribute 'credentials' raised "
                                "RuntimeError: module has no credentials"),
    ("bad_credentials", "chain", "(left45_plugins:BadCredentials, {dist}): its `credentials` must be a tuple of "
                                 "'password', 'negotiate', 'certificate', not 5"),
])
def test_a_plugin_whose_attributes_raise_is_a_named_load_error(tmp_path, site_env, name, where, shown):
    enable = f"chain: [{name}]\n" if where == "chain" else f"chain: [static]\nplugins: [{name}]\n"
    conf = _conf(tmp_path / "conf.d", enable)
    found = _errors(authgw("config", "check", "--config", str(conf), env=site_env))
    assert f"error: plugin {name!r} " + shown.format(dist=DIST) in found, found


def test_a_plugin_class_whose_attributes_raise_leaves_help_and_the_core_s_problems_alone(tmp_path, site_env):
    # Installed, not enabled: --help lists every command, as for any plugin it cannot import.
    conf = _conf(tmp_path / "conf.d", "chain: [static]\n")
    shown = authgw("--help", env={**site_env, "AUTHGW_CONFIG": str(conf)})
    assert shown.returncode == 0 and "hash-password" in shown.stdout, shown.stdout + shown.stderr
    # Enabled beside a wrong core setting (its settings are checked without building it).
    conf = _conf(tmp_path / "wrong", "chain: [static]\nplugins: [raising_meta]\ndeadline: -1\n")
    found = _errors(authgw("config", "check", "--config", str(conf), env=site_env))
    assert "plugin 'raising_meta' (left45_plugins:MetaRaises" in found, found
    schema = authgw("config", "schema", "--config", str(conf), env=site_env)
    assert "Traceback" not in schema.stderr and "plugin 'raising_meta'" in _errors(schema)


@pytest.mark.parametrize("name", ["exiting_built", "raising_object"])
def test_a_reload_onto_a_plugin_whose_attributes_raise_is_refused_naming_it_and_the_gateway_serves_on(
        tmp_path, site_env, name):
    conf = _conf(tmp_path / "conf.d", "chain: [static]\n")
    gw = GatewayProcess(conf, tmp_path / "state", env=site_env).start()
    try:
        assert gw.auth("alice", PASSWORD).status == 200
        write_conf(conf, {"gateway.yaml": f"throttle: {{enabled: false}}\nchain: [{name}]\n"})
        os.kill(gw.proc.pid, signal.SIGHUP)
        wait_for(lambda: "reload refused" in gw.output() or gw.proc.poll() is not None, timeout=30,
                 what="the reload's end", log=gw.output)
        assert gw.proc.poll() is None, gw.output()[-3000:]
        refusal = gw.output().split("reload refused", 1)[1]
        assert f"plugin {name!r} (left45_plugins:" in refusal.splitlines()[0], refusal
        assert gw.auth("alice", PASSWORD).status == 200  # the running configuration stays
        assert gw.auth("alice", "wrong").status == 401
    finally:
        gw.stop()
