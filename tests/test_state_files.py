"""The state directory is the gateway user's alone, and files written there are never opened
through a name someone planted (review of operations, finding 6: a state directory owned by
another user was accepted, and the PID file's temporary was opened with ``O_CREAT | O_TRUNC``,
following a link planted under its predictable name onto a file of the gateway's user)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from gateway.errors import ConfigError
from gateway.files import write_atomic
from gateway.lifecycle import PID_FILE, write_pidfile
from gateway.runtime import ensure_state_dir
from support.gateway import authgw

NOBODY = 65534
SHIPPED = Path(__file__).resolve().parent.parent / "conf.d"


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another user needs root")
def test_a_state_directory_another_user_owns_is_refused(tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.chown(state, NOBODY, NOBODY)
    with pytest.raises(ConfigError, match=f"belongs to uid {NOBODY}, not to this user"):
        ensure_state_dir(state)
    conf = shutil.copytree(SHIPPED, tmp_path / "conf.d")  # the shipped configuration, demo user and all
    result = authgw("--config", str(conf), "--state-dir", str(state), "check")
    assert result.returncode == 2 and f"belongs to uid {NOBODY}" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (state / PID_FILE).exists()
    os.chown(state, os.geteuid(), os.getegid())
    assert ensure_state_dir(state) == state


def test_files_are_written_whole_and_never_through_a_link(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    victim.chmod(0o600)
    state = ensure_state_dir(tmp_path / "state")
    (state / PID_FILE).symlink_to(victim)
    # What the old code opened (with O_TRUNC), planted as links for every PID near ours.
    for pid in range(os.getpid() - 5, os.getpid() + 6):
        (state / f".{PID_FILE}.{pid}").symlink_to(victim)

    path = write_pidfile(state)
    assert victim.read_bytes() == b"precious\n"  # neither the link at the name nor a planted one followed
    assert not path.is_symlink() and path.read_text() == f"{os.getpid()}\n"
    assert path.stat().st_mode & 0o777 == 0o600

    old = os.umask(0o077)
    try:
        write_atomic(state / "public.pem", b"cert\n", mode=0o644)  # the mode asked for, whatever the umask
    finally:
        os.umask(old)
    assert (state / "public.pem").stat().st_mode & 0o777 == 0o644
    leftovers = [p.name for p in state.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_a_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    state = ensure_state_dir(tmp_path / "state")
    write_atomic(state / "key.pem", b"old")
    with pytest.raises(TypeError):
        write_atomic(state / "key.pem", "not bytes")  # type: ignore[arg-type]
    assert (state / "key.pem").read_bytes() == b"old"
    assert sorted(p.name for p in state.iterdir()) == ["key.pem"]
