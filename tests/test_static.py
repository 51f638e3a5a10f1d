"""The static users-file plugin, in-process: hashing, constant work, reloads, self-tests."""

from __future__ import annotations

import os
import time

import pytest

from gateway.model import Outcome
from gateway.passwords import DUMMY_HASH, hash_password, verify_password
from support.chainhelp import attempt, decide, static_runtime
from support.gateway import authgw, write_conf


def test_hash_password_command_makes_argon2id_hashes_that_verify():
    result = authgw("hash-password", "--stdin", input="s3cret\n")
    assert result.returncode == 0
    encoded = result.stdout.strip()
    assert encoded.startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    assert verify_password(encoded, "s3cret") and not verify_password(encoded, "s3cret ")
    assert authgw("hash-password", "--stdin", input="\n").returncode != 0, "no hash for an empty password"


def test_unknown_users_cost_a_hash_verification_too(tmp_path, monkeypatch):
    import gateway.plugins.static as static

    runtime, _ = static_runtime(tmp_path, f'users:\n  alice:\n    password_hash: "{hash_password("pw")}"\n')
    verified = []
    real = static.verify_password
    monkeypatch.setattr(static, "verify_password", lambda h, p: verified.append(h) or real(h, p))
    assert decide(runtime, attempt("nobody", "pw")).outcome is Outcome.USER_NOT_FOUND
    assert decide(runtime, attempt("alice", "wrong")).outcome is Outcome.INVALID_CREDENTIALS
    # Hashes with the default parameters: the process's dummy (test_static_files.py covers others).
    assert len(verified) == 2 and verified[0] == DUMMY_HASH


def test_plaintext_or_weak_hashes_are_refused_at_start_up(tmp_path):
    from gateway.errors import ConfigError

    with pytest.raises(ConfigError, match=r"users.yaml:3: users.alice.password_hash: String should match"):
        static_runtime(tmp_path, "users:\n  alice:\n    password_hash: hunter2\n")


def test_case_insensitive_matching_is_opt_in(tmp_path):
    users = f'users:\n  Alice:\n    password_hash: "{hash_password("pw")}"\n'
    runtime, _ = static_runtime(tmp_path, users)
    assert decide(runtime, attempt("alice", "pw")).outcome is Outcome.USER_NOT_FOUND
    runtime, _ = static_runtime(tmp_path, users, case_insensitive=True)
    # The identity carries the name as the users file spells it, not as typed (issue 9 item 4).
    for typed in ("alice", "ALICE", "aLiCe"):
        decision = decide(runtime, attempt(typed, "pw"))
        assert decision.outcome is Outcome.SUCCESS and decision.identity.username == "Alice", typed
        assert decision.identity.subject == "static:Alice"


def test_the_users_file_is_reloaded_when_it_changes_and_a_broken_edit_keeps_the_old(tmp_path):
    runtime, users = static_runtime(tmp_path, f'users:\n  alice:\n    password_hash: "{hash_password("one")}"\n',
                                  reload_interval=0.01)
    assert decide(runtime, attempt("alice", "one")).success
    users.write_text(f'users:\n  alice:\n    password_hash: "{hash_password("two")}"\n')
    os.utime(users, (time.time() + 5, time.time() + 5))
    time.sleep(0.05)
    assert decide(runtime, attempt("alice", "two")).success
    users.write_text("users: [broken\n")
    os.utime(users, (time.time() + 10, time.time() + 10))
    time.sleep(0.05)
    assert decide(runtime, attempt("alice", "two")).success, "a bad edit must not lock the break-glass account out"


def test_check_reports_a_world_readable_users_file(conf_dir, tmp_path):
    write_conf(conf_dir, {"gateway.yaml": "chain: [static]\n", "static.yaml": "static:\n  users_file: users/u.yaml\n",
                          "users/u.yaml": "users: {}\n"})
    (conf_dir / "users" / "u.yaml").chmod(0o640)  # 0644 of ours is tightened to 0600 on read
    result = authgw("check", "--config", str(conf_dir), "--state-dir", str(tmp_path / "s"))
    assert result.returncode == 0
    assert "WARN  static.users_file:" in result.stdout and "chmod 600" in result.stdout
    (conf_dir / "users" / "u.yaml").chmod(0o600)
    assert "PASS  static.users_file:" in authgw("check", "--config", str(conf_dir),
                                                "--state-dir", str(tmp_path / "s")).stdout


def test_case_insensitive_login_answers_the_canonical_name_through_serve(conf_dir, start_gateway, demo_hash):
    """Issue 9 item 4: `DEMO`, `Demo` and `demo` were three users to the application behind."""
    write_conf(conf_dir, {"gateway.yaml": "chain: [static]\nthrottle: {enabled: false}\n",
                          "static.yaml": "static:\n  users_file: users/u.yaml\n  case_insensitive: true\n",
                          "users/u.yaml": f'users:\n  Demo:\n    password_hash: "{demo_hash}"\n'})
    (conf_dir / "users" / "u.yaml").chmod(0o600)
    gateway = start_gateway(conf_dir)
    for typed in ("demo", "DEMO", "Demo", "dEmO"):
        response = gateway.auth(typed, "demo-password")
        assert (response.status, response.header("Remote-User")) == (200, "Demo"), typed
