"""``authgw cache ...`` and ``authgw check`` for the cache, as an operator runs them."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from gateway.plugins.cache.store import Entry
from gateway.runtime import build_runtime
from support.chainhelp import attempt
from support.gateway import authgw, write_conf


@pytest.fixture
def setup(tmp_path, demo_hash):
    conf = write_conf(tmp_path / "conf.d", {
        "gateway.yaml": """\
            chain: [static]
            plugins: [cache]
            throttle: {enabled: false}
        """,
        "static.yaml": f"static: {{users_file: {tmp_path / 'users.yaml'}}}\n",
        "cache.yaml": "cache: {methods: [static]}\n",
    })
    write_conf(tmp_path, {
        "users.yaml": f"""\
            users:
              alice:
                password_hash: "{demo_hash}"
                display_name: "Alice \\e[31mRed"
                email: alice@example.com
                groups: [staff, wonderland]
              bob:
                password_hash: "{demo_hash}"
        """,
    })
    state = tmp_path / "state"
    runtime = build_runtime(conf, state_dir=state)
    runtime.gateway.startup()
    for user in ("alice", "bob"):
        assert asyncio.run(runtime.gateway.authenticate(attempt(user, "demo-password"))).success
    yield conf, state, runtime
    runtime.close()


def run(conf, state, *args):
    return authgw("cache", *args, "--config", str(conf), "--state-dir", str(state))


def test_list_and_show_print_profiles_but_no_secrets(setup, demo_hash):
    conf, state, _ = setup
    listed = run(conf, state, "list")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert any(line.startswith("alice ") and "usable offline" in line for line in lines)
    assert any(line.startswith("bob ") for line in lines)
    assert "2 entries in sqlite:" in listed.stdout

    shown = run(conf, state, "show", "alice")
    assert shown.returncode == 0, shown.stderr
    assert "staff, wonderland" in shown.stdout and "alice@example.com" in shown.stdout
    assert "0 of 5" in shown.stdout and "static" in shown.stdout
    assert "\x1b" not in shown.stdout and "\\x1b[31mRed" in shown.stdout  # escaped, not obeyed
    for output in (listed.stdout + listed.stderr, shown.stdout + shown.stderr):
        assert "$argon2" not in output and demo_hash not in output and "demo-password" not in output

    missing = run(conf, state, "show", "carol")
    assert missing.returncode == 1 and "no entry for carol" in missing.stdout


def test_options_may_follow_the_action(setup):
    conf, state, _ = setup
    result = authgw("cache", "list", "--config", str(conf), "--state-dir", str(state))
    assert result.returncode == 0 and "2 entries" in result.stdout
    result = authgw("cache", "--config", str(conf), "--state-dir", str(state), "show", "bob")
    assert result.returncode == 0 and "usable offline" in result.stdout


def test_purge_one_user_expired_entries_or_everything(setup):
    conf, state, runtime = setup
    store = runtime.gateway.plugins["cache"].offline.store
    bob = [e for e in store.scan()]
    old = bob[0]
    store.delete(old.key)  # age the entry (put never writes over a newer one)
    store.put(Entry(old.key, old.kid, old.password_hash, old.sealed, time.time() - 30 * 86400))

    expired = run(conf, state, "purge", "--expired")
    assert expired.returncode == 0 and "deleted 1 expired entries" in expired.stdout
    assert len(list(store.scan())) == 1

    asyncio.run(runtime.gateway.authenticate(attempt("alice", "demo-password")))
    asyncio.run(runtime.gateway.authenticate(attempt("bob", "demo-password")))
    one = run(conf, state, "purge", "alice")
    assert one.returncode == 0 and "deleted the entry for alice" in one.stdout
    assert run(conf, state, "show", "alice").returncode == 1
    assert run(conf, state, "purge", "alice").returncode == 1

    everything = run(conf, state, "purge")
    assert everything.returncode == 0 and "deleted 1 entries" in everything.stdout
    assert "0 entries" in run(conf, state, "list").stdout


def test_check_runs_the_cache_self_tests(setup):
    conf, state, _ = setup
    result = authgw("check", "--config", str(conf), "--state-dir", str(state))
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("cache.keys", "cache.store", "cache.argon2"):
        assert any(line.startswith("PASS") and name in line for line in result.stdout.splitlines()), result.stdout
    assert "journal_mode=wal" in result.stdout and "m=19456" in result.stdout


def test_check_fails_on_a_key_file_others_can_read(setup):
    conf, state, _ = setup
    os.chmod(state / "cache-pepper.key", 0o644)
    result = authgw("check", "--config", str(conf), "--state-dir", str(state))
    assert result.returncode == 1
    assert any(line.startswith("FAIL") and "cache.keys" in line and "chmod 600" in line
               for line in result.stdout.splitlines()), result.stdout
