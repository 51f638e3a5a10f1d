"""What conf.d is made of (review of the core): who may write it, what a ``*.yaml`` entry must be,
and how large a file may be.

A. conf.d writable by others, or a users file another user owns, was accepted without a word,
   strict mode included: with conf.d 0777 and ``static.yaml`` 0666, user nobody pointed
   ``static.users_file`` at a file of its own and, after SIGHUP, logged in as its own admin.
B. A ``*.yaml`` entry that is not a regular file (a dangling symlink to a lockout policy, a
   directory, a FIFO) was skipped: ``config check`` said OK and a reload dropped the policy.
C. No size limit: a 28 MB conf.d file took 95 s and 1.4 GB to check.
"""

from __future__ import annotations

import logging
import os
import pwd
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gateway import yamlfiles
from gateway.errors import ConfigError
from gateway.settings import ValidationContext
from gateway.yamlfiles import load_directory, load_file
from support.gateway import write_conf
from support.net import wait_for

NOBODY = 65534
try:
    NOBODY_NAME = f"{pwd.getpwuid(NOBODY).pw_name} (uid {NOBODY})"  # as messages name an owner
except KeyError:
    NOBODY_NAME = f"uid {NOBODY}"
#: gateway.yamlfiles.MAX_CONFD_BYTES and MAX_FILE_BYTES, checked below.
MAX_CONFD_BYTES = 16 << 20
MAX_FILE_BYTES = 64 << 20
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")


def check(conf: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``authgw config check`` run from the directory above *conf*, so files read ``conf.d/x.yaml``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AUTHGW_")}
    return subprocess.run([sys.executable, "-m", "gateway", "config", "check", "--config", conf.name,
                           "--state-dir", str(conf.parent / "state")],
                          capture_output=True, text=True, cwd=conf.parent, env={**clean, **(env or {})}, timeout=60)


def errors(result: subprocess.CompletedProcess) -> list[str]:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


def base(conf: Path, demo_hash: str, gateway: str = "chain: [static]\n") -> Path:
    conf.chmod(0o755)
    return write_conf(conf, {"gateway.yaml": gateway, "static.yaml": "static:\n  users_file: static/users.yaml\n",
                             "static/users.yaml": f'users:\n  alice:\n    password_hash: "{demo_hash}"\n'})


def hup_and_wait(gw, what: str) -> None:
    before = gw.output().count(what)
    os.kill(gw.proc.pid, signal.SIGHUP)
    wait_for(lambda: gw.output().count(what) > before, timeout=30, what=what, log=gw.output)


# -- B: every *.yaml entry is a regular file ------------------------------------------------------


def _make(kind: str, path: Path) -> None:
    if kind == "dangling symlink":
        path.symlink_to(path.parent.parent / "policy" / "throttle.yaml")
    elif kind == "directory":
        path.mkdir()
    elif kind == "FIFO":
        os.mkfifo(path)
    else:  # bound by a relative name from its directory: a temporary path can pass AF_UNIX's 107 bytes
        sock, cwd = socket.socket(socket.AF_UNIX), os.getcwd()
        try:
            os.chdir(path.parent)
            sock.bind(path.name)
        finally:
            os.chdir(cwd)
            sock.close()


@pytest.mark.parametrize("kind, shown", [
    ("dangling symlink", "not read: a symlink to "),
    ("directory", "not read: a directory, not a regular file"),
    ("FIFO", "not read: a FIFO, not a regular file"),  # stat only: opening it would block
    ("socket", "not read: a socket, not a regular file"),
])
def test_a_yaml_entry_that_is_not_a_regular_file_fails_config_check(conf_dir, demo_hash, kind, shown):
    base(conf_dir, demo_hash)
    _make(kind, conf_dir / "20-throttle.yaml")
    (found,) = errors(check(conf_dir))
    assert found.startswith(f"error: conf.d/20-throttle.yaml: {shown}"), found
    if kind == "dangling symlink":
        assert "policy/throttle.yaml, which cannot be reached (No such file or directory)" in found


def test_a_dangling_yml_link_is_an_error_like_a_yml_file(conf_dir, demo_hash):
    base(conf_dir, demo_hash)
    (conf_dir / "ldap.yml").symlink_to(conf_dir.parent / "gone.yml")
    assert errors(check(conf_dir)) == [
        "error: conf.d/ldap.yml: not read: configuration files end in `.yaml`; rename it to ldap.yaml"]


def test_a_reload_whose_policy_link_dangles_is_refused_and_the_policy_stays(conf_dir, demo_hash, tmp_path,
                                                                          start_gateway):
    """The review's case: a lockout policy kept outside conf.d (a secrets mount not there yet)."""
    base(conf_dir, demo_hash)
    policy = tmp_path / "policy"
    policy.mkdir()
    (policy / "throttle.yaml").write_text("throttle:\n  user_failures: 1\n  client_failures: 20\n")
    (conf_dir / "20-throttle.yaml").symlink_to(policy / "throttle.yaml")
    gw = start_gateway(conf_dir)
    assert [gw.auth("alice", f"wrong{i}").status for i in range(3)] == [401, 429, 429]
    policy.rename(tmp_path / "policy.gone")
    hup_and_wait(gw, "reload refused")
    assert "conf.d/20-throttle.yaml: not read: a symlink to" in gw.output()
    # The running configuration (one guess per user) stays; the defaults would allow three.
    assert [gw.auth("bob", f"wrong{i}").status for i in range(3)] == [401, 429, 429]


# -- A: conf.d and its files are writable by their owner alone, owned by root or us -----------------


def test_a_world_writable_conf_d_is_warned_about_and_an_error_when_strict(conf_dir, demo_hash):
    base(conf_dir, demo_hash)
    conf_dir.chmod(0o777)
    (conf_dir / "static.yaml").chmod(0o666)
    ok = check(conf_dir)
    assert ok.returncode == 0, ok.stderr
    assert ("conf.d: the configuration directory is writable by group or others (mode 777): whoever can write it "
            "decides who logs in; chmod go-w conf.d (an error with `strict: true`)") in ok.stderr
    assert "conf.d/static.yaml: a configuration file is writable by group or others (mode 666)" in ok.stderr
    assert "chmod go-w conf.d/static.yaml" in ok.stderr
    assert "gateway.yaml" not in ok.stderr  # 0644: fine

    write_conf(conf_dir, {"gateway.yaml": "chain: [static]\nstrict: true\n"})
    found = errors(check(conf_dir))
    assert found[0].startswith("error: conf.d: the configuration directory is writable by group or others"), found
    assert any(line.startswith("error: conf.d/static.yaml: a configuration file is writable") for line in found)
    # Strict from the environment too (AUTHGW_STRICT overrides conf.d as for any key).
    write_conf(conf_dir, {"gateway.yaml": "chain: [static]\n"})
    assert errors(check(conf_dir, {"AUTHGW_STRICT": "true"}))[0].startswith("error: conf.d: the configuration "
                                                                            "directory is writable")
    conf_dir.chmod(0o755)
    (conf_dir / "static.yaml").chmod(0o644)
    fixed = check(conf_dir, {"AUTHGW_STRICT": "true"})
    assert fixed.returncode == 0 and "writable" not in fixed.stderr, fixed.stderr


def test_a_strict_check_shows_permission_and_setting_problems_in_one_run(conf_dir, demo_hash):
    """Strict mode's permission errors were raised before anything was validated: an operator who
    fixed the modes learnt of a wrong key or value only at the next run (left from earlier
    stops). Both kinds now come in the one run, the permission problems first."""
    base(conf_dir, demo_hash, "chain: [static]\nstrict: true\ndeadline: soon\n")
    (conf_dir / "static.yaml").write_text("static:\n  users_file: static/users.yaml\n  colour: blue\n")
    (conf_dir / "static.yaml").chmod(0o666)
    found = errors(check(conf_dir))
    assert found[0].startswith("error: conf.d/static.yaml: a configuration file is writable by group or others"), found
    assert any(line.startswith("error: conf.d/gateway.yaml:3: deadline:") for line in found), found
    assert any(line.startswith("error: conf.d/static.yaml:3: static.colour:") for line in found), found
    # A file that does not read (bad YAML) still stops there: its settings are not known.
    (conf_dir / "gateway.yaml").write_text("chain: [static\nstrict: true\n")
    found = errors(check(conf_dir))
    assert any("conf.d/gateway.yaml" in line for line in found) and not any("colour" in line for line in found), found


@as_root
def test_conf_d_or_a_file_of_it_another_user_owns_is_warned_about_and_an_error_when_strict(conf_dir, demo_hash):
    base(conf_dir, demo_hash)
    os.chown(conf_dir / "static.yaml", NOBODY, NOBODY)
    ok = check(conf_dir)
    assert ok.returncode == 0, ok.stderr
    assert (f"conf.d/static.yaml: a configuration file belongs to {NOBODY_NAME}") in ok.stderr
    assert ", not to root, the user authgw runs as: its owner decides who logs in; chown root conf.d/static.yaml" \
        in ok.stderr
    os.chown(conf_dir, NOBODY, NOBODY)
    write_conf(conf_dir, {"gateway.yaml": "chain: [static]\nstrict: true\n"})
    found = errors(check(conf_dir))
    assert found[0].startswith(f"error: conf.d: the configuration directory belongs to {NOBODY_NAME}"), found
    assert found[1].startswith(f"error: conf.d/static.yaml: a configuration file belongs to {NOBODY_NAME}"), found


def test_a_symlinked_file_is_judged_by_its_target(conf_dir, demo_hash, tmp_path):
    """Config management links conf.d files elsewhere (and the console writes through links): a
    link to a file only its owner can write is fine; one to a world-writable file is named."""
    base(conf_dir, demo_hash)
    site = tmp_path / "site"
    site.mkdir()
    (site / "throttle.yaml").write_text("throttle:\n  user_failures: 2\n")
    (site / "throttle.yaml").chmod(0o644)
    (conf_dir / "20-throttle.yaml").symlink_to(site / "throttle.yaml")  # the link itself is 0777
    ok = check(conf_dir, {"AUTHGW_STRICT": "true"})
    assert ok.returncode == 0 and "writable" not in ok.stderr, ok.stderr
    (site / "throttle.yaml").chmod(0o646)
    warned = check(conf_dir)
    assert warned.returncode == 0, warned.stderr
    assert (f"conf.d/20-throttle.yaml: the file it links to, {site / 'throttle.yaml'}, is writable by group or "
            "others (mode 646)") in warned.stderr


def test_a_file_put_in_place_of_the_checked_one_before_it_is_read_is_refused(conf_dir, demo_hash, tmp_path,
                                                                             monkeypatch):
    """The permissions were judged on a ``stat`` of the path, and the file opened later by name:
    a link swapped (or a file renamed over it) in between had its settings read unjudged, a
    world-writable file's under ``strict`` too. The swap is made at the moment the loader opens
    the file (os.open wrapped: the attacker's move, exactly between the two)."""
    base(conf_dir, demo_hash)
    site = tmp_path / "site"
    site.mkdir()
    (site / "throttle.yaml").write_text("throttle:\n  user_failures: 2\n")
    (site / "throttle.yaml").chmod(0o644)
    (site / "planted.yaml").write_text("throttle:\n  enabled: false\n")
    (site / "planted.yaml").chmod(0o666)
    link = conf_dir / "20-throttle.yaml"
    link.symlink_to(site / "throttle.yaml")
    real_open = os.open

    def swapping_open(path, *args, **kwargs):
        if str(path) == str(link) and link.resolve() == site / "throttle.yaml":
            link.unlink()
            link.symlink_to(site / "planted.yaml")
        return real_open(path, *args, **kwargs)

    monkeypatch.setenv("AUTHGW_STRICT", "true")
    monkeypatch.setattr(yamlfiles.os, "open", swapping_open)
    with pytest.raises(ConfigError, match="20-throttle.yaml: not read: replaced by another file while it was checked"):
        load_directory(conf_dir)
    monkeypatch.setattr(yamlfiles.os, "open", real_open)
    # read again: the file now there is judged (and refused under strict) like any other
    with pytest.raises(ConfigError, match="planted.yaml, is writable by group or others"):
        load_directory(conf_dir)


def test_permission_warnings_are_logged_once_per_change_not_at_every_load(conf_dir, demo_hash, caplog):
    """A reload (or a console page) loading the same conf.d again does not repeat them."""
    base(conf_dir, demo_hash)
    conf_dir.chmod(0o775)

    def warnings() -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="authgw.config"):
            load_directory(conf_dir)
        return [r.getMessage() for r in caplog.records if "writable" in r.getMessage()]

    assert len(warnings()) == 1
    assert warnings() == []
    conf_dir.chmod(0o777)
    assert [w for w in warnings() if "mode 777" in w]
    conf_dir.chmod(0o755)
    assert warnings() == []
    conf_dir.chmod(0o777)
    assert len(warnings()) == 1  # fixed, then broken again: said again


@as_root
def test_a_secret_or_users_file_another_user_owns_is_named_and_refused_when_strict(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    secret.chmod(0o600)
    os.chown(secret, NOBODY, NOBODY)
    context = ValidationContext(config_dir=tmp_path)
    context.check_private(secret, "secret file")
    ((message, _),) = context.warnings
    assert message.startswith(f"secret file {secret} belongs to {NOBODY_NAME}"), message
    assert f"chown root {secret}" in message
    with pytest.raises(ValueError, match=re.escape(f"belongs to {NOBODY_NAME}")):
        ValidationContext(config_dir=tmp_path, strict=True).check_private(secret, "secret file")
    os.chown(secret, 0, 0)  # root's: fine
    quiet = ValidationContext(config_dir=tmp_path, strict=True)
    quiet.check_private(secret, "secret file")
    assert quiet.warnings == []


@as_root
def test_a_reload_onto_a_users_file_another_user_owns_is_refused_when_strict(conf_dir, demo_hash, tmp_path,
                                                                           start_gateway):
    """The review's case, strict: static.yaml is pointed at a users file user nobody owns (and so
    can fill with an admin of its own); the reload is refused and nobody's user never logs in."""
    base(conf_dir, demo_hash, "chain: [static]\nstrict: true\n")
    gw = start_gateway(conf_dir)
    assert gw.auth("alice", "demo-password").status == 200
    theirs = tmp_path / "theirs.yaml"
    theirs.write_text(f'users:\n  mallory:\n    password_hash: "{demo_hash}"\n    groups: [admins]\n')
    theirs.chmod(0o600)
    os.chown(theirs, NOBODY, NOBODY)
    write_conf(conf_dir, {"static.yaml": f"static:\n  users_file: {theirs}\n"})
    hup_and_wait(gw, "reload refused")
    assert f"users file {theirs} belongs to {NOBODY_NAME}" in gw.output()
    assert gw.auth("mallory", "demo-password").status == 401
    assert gw.auth("alice", "demo-password").status == 200
    # Not strict: it loads, and says so.
    os.chown(theirs, 0, 0)
    ok = check(conf_dir)
    assert ok.returncode == 0 and "belongs to" not in ok.stderr, ok.stderr
    os.chown(theirs, NOBODY, NOBODY)
    write_conf(conf_dir, {"gateway.yaml": "chain: [static]\n"})
    warned = check(conf_dir)
    assert warned.returncode == 0 and f"users file {theirs} belongs to {NOBODY_NAME}" in warned.stderr, warned.stderr


# -- A on a read-only mount: nobody can write there (review of the core) ------------------------------


@pytest.fixture
def read_only_mount():
    """``read_only_mount(source, target)``: *source* bind-mounted read-only at *target* (made if
    missing), unmounted at teardown; the test is skipped where mounting is not permitted."""
    mounted: list[Path] = []

    def mount(source: Path, target: Path) -> Path:
        if os.geteuid() != 0:
            pytest.skip("a read-only bind mount needs root")
        target.mkdir(exist_ok=True)
        bind = subprocess.run(["mount", "--bind", str(source), str(target)], capture_output=True, text=True)
        if bind.returncode:
            pytest.skip(f"mount --bind is not permitted here (a container without CAP_SYS_ADMIN?): "
                        f"{bind.stderr.strip()}")
        mounted.append(target)
        ro = subprocess.run(["mount", "-o", "remount,ro,bind", str(target)], capture_output=True, text=True)
        if ro.returncode:
            pytest.skip(f"remounting read-only is not permitted here: {ro.stderr.strip()}")
        assert os.statvfs(target).f_flag & os.ST_RDONLY
        return target

    yield mount
    for target in reversed(mounted):
        subprocess.run(["umount", str(target)], check=True)


def configmap(directory: Path, files: dict[str, str], mode: int = 0o644) -> Path:
    """*files* laid out as kubelet lays out a ConfigMap volume: a 0777 directory, the files (*mode*)
    in a version directory, ``..data`` linked to it and each name linked to ``..data/name``."""
    directory.mkdir()
    version = directory / "..2026_12_04_10_00_00.000000001"
    version.mkdir()
    for name, text in files.items():
        (version / name).write_text(text)
        (version / name).chmod(mode)
        (directory / name).symlink_to(f"..data/{name}")
    (directory / "..data").symlink_to(version.name)
    directory.chmod(0o777)
    return directory


def test_a_read_only_configmap_mount_is_neither_warned_about_nor_refused_when_strict(tmp_path, demo_hash,
                                                                                   read_only_mount):
    """The review's case: a Kubernetes ConfigMap volume (a 0777 directory, read-only) failed
    ``config check`` with strict ("chmod go-w", impossible there) and warned at every start."""
    users = tmp_path / "users.yaml"
    users.write_text(f'users:\n  alice:\n    password_hash: "{demo_hash}"\n')
    users.chmod(0o600)
    source = configmap(tmp_path / "configmap", {"gateway.yaml": "chain: [static]\n",
                                                "static.yaml": f"static:\n  users_file: {users}\n"})
    # Writable, the same tree is what it was: the checks apply.
    assert errors(check(source, {"AUTHGW_STRICT": "true"}))[0].startswith(
        "error: configmap: the configuration directory is writable by group or others (mode 777)")
    conf = read_only_mount(source, tmp_path / "conf.d")
    ok = check(conf)
    assert ok.returncode == 0 and "writable" not in ok.stderr and "WARNING" not in ok.stderr, ok.stderr
    strict = check(conf, {"AUTHGW_STRICT": "true"})
    assert strict.returncode == 0 and "writable" not in strict.stderr, strict.stderr


def test_a_link_to_a_file_on_a_read_only_mount_is_judged_by_its_owner_alone(conf_dir, demo_hash, tmp_path,
                                                                          read_only_mount):
    """Each ``*.yaml`` link's target is judged where it lives: group- or world-writable on a
    read-only mount is fine, another user's file is still named, and the writable source is not."""
    base(conf_dir, demo_hash)
    source = tmp_path / "secrets-source"
    source.mkdir()
    (source / "throttle.yaml").write_text("throttle:\n  user_failures: 2\n")
    (source / "throttle.yaml").chmod(0o666)
    secrets = read_only_mount(source, tmp_path / "secrets")
    (conf_dir / "20-throttle.yaml").symlink_to(secrets / "throttle.yaml")
    ok = check(conf_dir, {"AUTHGW_STRICT": "true"})
    assert ok.returncode == 0 and "writable" not in ok.stderr, ok.stderr
    (conf_dir / "20-throttle.yaml").unlink()
    (conf_dir / "20-throttle.yaml").symlink_to(source / "throttle.yaml")  # the same file, writable
    assert errors(check(conf_dir, {"AUTHGW_STRICT": "true"})) == [
        f"error: conf.d/20-throttle.yaml: the file it links to, {source / 'throttle.yaml'}, is writable by group "
        f"or others (mode 666): whoever can write it decides who logs in; chmod go-w conf.d/20-throttle.yaml"]
    (conf_dir / "20-throttle.yaml").unlink()
    (conf_dir / "20-throttle.yaml").symlink_to(secrets / "throttle.yaml")
    os.chown(source / "throttle.yaml", NOBODY, NOBODY)  # seen through the read-only mount too
    (found,) = errors(check(conf_dir, {"AUTHGW_STRICT": "true"}))
    assert found.startswith(f"error: conf.d/20-throttle.yaml: the file it links to, {secrets / 'throttle.yaml'}, "
                            f"belongs to {NOBODY_NAME}"), found


# -- C: file sizes ----------------------------------------------------------------------------------


def test_a_conf_d_file_over_16_mib_is_refused_unread(conf_dir, demo_hash):
    base(conf_dir, demo_hash)
    line = "# " + "x" * 1021 + "\n"  # valid YAML: only its size is wrong
    with open(conf_dir / "big.yaml", "w") as out:
        out.write("deadline: 4.0\n")
        out.writelines(line for _ in range(MAX_CONFD_BYTES // len(line) + 1))
    size = (conf_dir / "big.yaml").stat().st_size
    assert errors(check(conf_dir)) == [
        f"error: conf.d/big.yaml: not read: {size:,} bytes, more than the 16 MiB a file may have here"]
    assert yamlfiles.MAX_CONFD_BYTES == MAX_CONFD_BYTES


def test_a_users_file_over_64_mib_is_refused_unread(conf_dir, demo_hash):
    base(conf_dir, demo_hash)
    users = conf_dir / "static" / "users.yaml"
    os.truncate(users, MAX_FILE_BYTES + 1)  # sparse: no disk used, and never read
    found = errors(check(conf_dir))
    assert any(f"conf.d/static/users.yaml: not read: {MAX_FILE_BYTES + 1:,} bytes, more than the 64 MiB" in line
               for line in found), found
    assert yamlfiles.MAX_FILE_BYTES == MAX_FILE_BYTES


def test_load_file_reads_up_to_its_limit_and_no_further(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_bytes(b"a: 1\r\nb: 22\n")  # 12 bytes; newlines as Path.read_text gave them
    assert load_file(path, {}, max_bytes=12) == {"a": 1, "b": 22}
    with pytest.raises(ConfigError, match=r"x.yaml: not read: 12 bytes, more than the 11 bytes"):
        load_file(path, {}, max_bytes=11)
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="fifo.yaml: not read: a FIFO, not a regular file"):
        load_file(fifo, {})  # refused at once, not waited on
