"""The cache's secrets and the hot cache, on their own (no gateway, no directory)."""

from __future__ import annotations

import gc
import os
import stat
import subprocess
import sys
import textwrap

import pytest

from gateway import Identity, Secret
from gateway.plugins.cache.hot import HotCache
from gateway.plugins.cache.keys import ENCRYPTION_FILE, PEPPER_FILE, KeyFileError, load_keys, sealed_time


def ident(name: str = "alice") -> Identity:
    return Identity(subject=f"uid={name}", username=name, method="ldap", display_name="Alice Liddell",
                    email="alice@example.com", groups=("wonderland", "staff"))


def test_key_files_are_made_private_on_first_use(tmp_path):
    with pytest.raises(KeyFileError):
        load_keys(tmp_path, None, None, create=False)
    keys = load_keys(tmp_path, None, None, create=True)
    for name in (PEPPER_FILE, ENCRYPTION_FILE):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o600
    again = load_keys(tmp_path, None, None, create=False)
    assert again.kid == keys.kid and again.row_key("alice") == keys.row_key("alice")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporaries left
    assert repr(keys) == f"CacheKeys(kid={keys.kid!r})"  # no key material in logs or tracebacks


def test_a_key_file_others_can_read_is_refused(tmp_path):
    load_keys(tmp_path, None, None, create=True)
    os.chmod(tmp_path / PEPPER_FILE, 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_keys(tmp_path, None, None, create=True)


_RACE = textwrap.dedent("""
    import sys
    from pathlib import Path
    from gateway.plugins.cache.keys import load_keys
    print(load_keys(Path(sys.argv[1]), None, None, create=True).kid)
""")


def test_processes_starting_together_agree_on_one_key(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", _RACE, str(tmp_path)], stdout=subprocess.PIPE, text=True)
             for _ in range(6)]
    kids = {p.communicate(timeout=60)[0].strip() for p in procs}
    assert len(kids) == 1 and "" not in kids


def test_secrets_from_settings_replace_key_files(tmp_path):
    pepper = Secret("p" * 40, {"env": "PEPPER"})
    key = Secret("k" * 40, {"env": "KEY"})
    one = load_keys(tmp_path / "a", pepper, key, create=True)
    two = load_keys(tmp_path / "b", pepper, key, create=True)
    assert one.kid == two.kid and not (tmp_path / "a").exists()
    other = load_keys(tmp_path, Secret("q" * 40, {"env": "P2"}), key, create=True)
    assert other.kid != one.kid and other.row_key("alice") != one.row_key("alice")


def test_sealed_identities_open_only_on_their_row_with_their_key(tmp_path):
    keys = load_keys(tmp_path / "a", None, None, create=True)
    other = load_keys(tmp_path / "b", None, None, create=True)
    row = keys.row_key("alice")
    sealed = keys.seal(row, ident(), "ldap", 1234.5, password_hash="$argon2id$x")
    assert b"Alice" not in sealed and b"wonderland" not in sealed and b"alice" not in sealed
    document = keys.open(row, sealed)
    assert document["groups"] == ["wonderland", "staff"] and document["step"] == "ldap"
    assert sealed_time(document) == 1234.5
    assert keys.open(keys.row_key("bob"), sealed) is None  # copied onto another user's row
    assert other.open(row, sealed) is None  # another install's key
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    assert keys.open(row, tampered) is None


def test_the_peppered_input_binds_user_password_and_pepper(tmp_path):
    keys = load_keys(tmp_path / "a", None, None, create=True)
    other = load_keys(tmp_path / "b", None, None, create=True)
    base = keys.peppered("alice", "pw")
    assert len(base) == 32
    assert base != keys.peppered("bob", "pw") != keys.peppered("alice", "pw2")
    assert base != other.peppered("alice", "pw")
    assert keys.peppered("a\0b", "c") != keys.peppered("a", "b\0c")


# -- hot cache -------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_hot_entries_expire_after_ttl():
    clock = Clock()
    hot = HotCache(ttl=30, max_entries=10, clock=clock)
    token = hot.token("client", "alice", "pw")
    hot.put(token, "alice", ident())
    clock.now += 29.9
    assert hot.get(token).username == "alice"
    clock.now += 0.2
    assert hot.get(token) is None and len(hot) == 0


def test_hot_cache_is_a_bounded_lru():
    hot = HotCache(ttl=30, max_entries=3)
    tokens = [hot.token("c", f"user{n}", "pw") for n in range(4)]
    for n, token in enumerate(tokens[:3]):
        hot.put(token, f"user{n}", ident(f"user{n}"))
    assert hot.get(tokens[0]) is not None  # user0 is now the most recently used
    hot.put(tokens[3], "user3", ident("user3"))
    assert len(hot) == 3
    assert hot.get(tokens[1]) is None  # the least recently used went
    assert all(hot.get(t) is not None for t in (tokens[0], tokens[2], tokens[3]))


def test_hot_tokens_separate_users_passwords_and_clients():
    hot = HotCache(ttl=30, max_entries=10)
    base = hot.token("10.0.0.1", "alice", "pw")
    assert base == hot.token("10.0.0.1", "alice", "pw")
    assert len({base, hot.token("10.0.0.2", "alice", "pw"), hot.token("10.0.0.1", "alice", "pw2"),
                hot.token("10.0.0.1", "alicep", "w"), hot.token("10.0.0.1", "bob", "pw")}) == 5
    assert base != HotCache(ttl=30, max_entries=10).token("10.0.0.1", "alice", "pw")  # per-process key


def test_a_forked_child_starts_the_hot_cache_with_a_new_key_and_no_entries():
    # Workers are forked from the master: a parent's entries must not answer in a child, and
    # two children must not share a key (a token seen in one tells nothing about the other).
    hot = HotCache(ttl=30, max_entries=10)
    token = hot.token("c", "alice", "pw")
    hot.put(token, "alice", ident())
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, then leave without running the parent's cleanup
        try:
            same_key = hot.token("c", "alice", "pw") == token
            os.write(write, f"{len(hot)} {hot.get(token) is None} {same_key}".encode())
            hot.put(hot.token("c", "alice", "pw"), "alice", ident())  # usable after the fork
            os.write(write, f" {len(hot)}".encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        report = pipe.read()
    assert os.waitpid(pid, 0)[1] == 0
    assert report == "0 True False 1"
    assert hot.get(token) is not None and hot.token("c", "alice", "pw") == token  # the parent's stay


def test_forgetting_a_user_drops_every_password_and_client():
    hot = HotCache(ttl=30, max_entries=10)
    for client, password in (("c1", "pw"), ("c2", "pw"), ("c1", "other")):
        hot.put(hot.token(client, "alice", password), "alice", ident())
    bob = hot.token("c1", "bob", "pw")
    hot.put(bob, "bob", ident("bob"))
    assert hot.forget_user("alice") == 3
    assert len(hot) == 1 and hot.get(bob) is not None
    assert hot.forget_user("alice") == 0


def test_the_hot_cache_never_holds_the_password():
    secret = "hunter2-unique-password-7f3a"
    hot = HotCache(ttl=30, max_entries=10)
    hot.put(hot.token("c", "alice", secret), "alice", ident())
    reachable = gc.get_referents(hot.__dict__) + [hot._entries, hot._by_user]
    dump = repr([(k, v) for k, v in hot._entries.items()]) + repr(hot._by_user) + repr(reachable)
    assert secret not in dump
    assert secret.encode() not in b"".join(hot._entries)
