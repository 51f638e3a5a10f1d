"""Review of the supervisor, its reloads and the reading of conf.d through real ``authgw serve
--workers 2`` processes: a conf.d file on a mount that does not answer (a FUSE file system of
this test that never answers a read, standing in for a dead network mount), a plugin start-up
that never returns at the very first start, the socket of a slot whose replacement is retried,
and descriptors across many reloads."""

from __future__ import annotations

import ctypes
import errno
import os
import re
import secrets
import signal
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from support.fakedist import make_dist
from support.gateway import GatewayProcess, static_users, write_conf
from support.net import wait_for, wait_for_port
from support.proc import children
from support.supervisorenv import TESTS_DIR, alice_hash, alive, gateway_yaml, master_pid, realm, serving  # noqa: F401
from support.supervisorenv import realms as _realms


def realms(gw, count: int = 30) -> set[str]:
    return _realms(gw, count, timeout=30)


# -- a file system that never answers a read --------------------------------------------------------

_IN = struct.Struct("=IIQQIIII")  # fuse_in_header
_OUT = struct.Struct("=IiQ")  # fuse_out_header
_ATTR = struct.Struct("=QQQQQQIIIIIIIIII")  # fuse_attr (ABI 7.9+)
_libc = ctypes.CDLL(None, use_errno=True)


class DeadMount:
    """A FUSE mount at *where* holding one regular file, ``stuck.yaml`` (root's, 0644, 20 bytes),
    whose every read waits for ever: what a file on a network mount whose server died is to the
    reader. Served by a thread of this process speaking the kernel's FUSE protocol; unmounted
    (lazily: the waiting reads fail) at :meth:`close`."""

    NAME = b"stuck.yaml"

    def __init__(self, where: Path) -> None:
        self.where = where
        self.fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        options = f"fd={self.fd},rootmode=40000,user_id=0,group_id=0,allow_other".encode()
        if _libc.mount(b"authgw-dead", str(where).encode(), b"fuse", 0, options) != 0:
            err = ctypes.get_errno()
            os.close(self.fd)
            raise OSError(err, os.strerror(err))
        self.reads: list[int] = []  # the reads waiting (their request ids)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _attr(self, node: int) -> bytes:
        if node == 1:
            return _ATTR.pack(1, 0, 0, 0, 0, 0, 0, 0, 0, 0o040755, 2, 0, 0, 0, 4096, 0)
        return _ATTR.pack(2, 20, 1, 0, 0, 0, 0, 0, 0, 0o100644, 1, 0, 0, 0, 4096, 0)

    def _reply(self, unique: int, error: int = 0, body: bytes = b"") -> None:
        try:
            os.write(self.fd, _OUT.pack(_OUT.size + len(body), -error, unique) + body)
        except OSError:
            pass  # the request was interrupted (its reader killed)

    def _serve(self) -> None:
        while True:
            try:
                data = os.read(self.fd, 1 << 20)
            except OSError as exc:
                if exc.errno in (errno.EINTR, errno.EAGAIN, errno.ENOENT):
                    continue
                return  # ENODEV: unmounted
            _length, opcode, unique, node, *_ = _IN.unpack_from(data)
            body = data[_IN.size:]
            if opcode == 26:  # INIT: ABI 7.31, nothing asked for
                self._reply(unique, body=struct.pack("=IIIIHHIIHHI7I", 7, 31, 0, 0, 0, 0, 4096, 1, 0, 0, 0,
                                                     *[0] * 7))
            elif opcode == 1:  # LOOKUP
                if node == 1 and body.rstrip(b"\0") == self.NAME:
                    self._reply(unique, body=struct.pack("=QQQQII", 2, 0, 0, 0, 0, 0) + self._attr(2))
                else:
                    self._reply(unique, errno.ENOENT)
            elif opcode == 3:  # GETATTR
                self._reply(unique, body=struct.pack("=QII", 0, 0, 0) + self._attr(node))
            elif opcode in (14, 27):  # OPEN, OPENDIR
                self._reply(unique, body=struct.pack("=QII", 0, 0, 0))
            elif opcode == 15:  # READ: never answered (until close)
                self.reads.append(unique)
            elif opcode in (18, 25, 29, 16):  # RELEASE, FLUSH, RELEASEDIR, FORGET
                if opcode != 16:
                    self._reply(unique)
            else:
                self._reply(unique, errno.ENOSYS)

    def close(self) -> None:
        if self.fd < 0:
            return
        for unique in self.reads:  # the server fails them at last: the readers go on
            self._reply(unique, errno.EIO)
        _libc.umount2(str(self.where).encode(), 2)  # MNT_DETACH
        os.close(self.fd)  # aborts the connection: the reads waiting fail
        self.fd = -1
        self.thread.join(10)


@pytest.fixture
def dead_mount(tmp_path):
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("needs root and /dev/fuse to mount a FUSE file system")
    where = tmp_path / "mnt"
    where.mkdir()
    try:
        mount = DeadMount(where)
    except OSError as exc:
        pytest.skip(f"cannot mount a FUSE file system here: {exc}")
    yield mount
    mount.close()


def builder_of(gw) -> int | None:
    """The master's child that is not a worker it logged (the process reading conf.d)."""
    known = set(serving(gw))
    others = [pid for pid in children(master_pid(gw)) if pid not in known]
    return others[0] if others else None


def test_a_conf_d_file_that_never_reads_is_named_given_up_and_the_next_reload_applies(
        conf_dir, alice_hash, start_gateway, dead_mount):
    """A `*.yaml` of conf.d on a mount whose reads never end (a dead NFS or FUSE server: the
    file's ``stat`` answers, its read does not) held the reload's reader for good: nothing was
    logged after `reload: reading`, every later SIGHUP waited behind it (`systemctl reload`
    changed nothing, and no error said why) until the gateway was restarted. Now a reading that
    makes no progress is named with the file it waits on and the kernel's view of the reader,
    given up after the start grace (the workers serve the configuration before), a SIGHUP
    meanwhile is said to wait for it, and the next one applies."""
    write_conf(conf_dir, {"gateway.yaml": gateway_yaml("r0"), **static_users({"alice": alice_hash})})
    gw = start_gateway(conf_dir, workers=2)
    wait_for(lambda: len(serving(gw)) == 2, what="two workers serving", log=gw.output)
    (conf_dir / "stuck.yaml").symlink_to(dead_mount.where / "stuck.yaml")
    (conf_dir / "gateway.yaml").write_text(gateway_yaml("r1"))
    os.kill(master_pid(gw), signal.SIGHUP)
    wait_for(lambda: dead_mount.reads, timeout=30, what="the reader waiting on the dead mount", log=gw.output)
    reader = builder_of(gw)
    os.kill(master_pid(gw), signal.SIGHUP)  # a second reload while the first still reads
    os.kill(master_pid(gw), signal.SIGHUP)
    wait_for(lambda: "still reading" in gw.output(), timeout=60, what="the stuck reading named", log=gw.output)
    line = re.search(r".*still reading.*", gw.output()).group(0)
    assert "stuck.yaml" in line, line  # which file it waits on
    assert realms(gw) == {realm("r0")}  # the workers serve the configuration before
    (conf_dir / "stuck.yaml").unlink()  # the operator takes the dead mount's file out
    line = wait_for(lambda: re.search(r".*reload refused.*given up.*", gw.output()), timeout=120,
                    what="the stuck reading given up", log=gw.output).group(0)
    assert "stuck.yaml" in line, line
    # The SIGHUPs sent meanwhile were one pending reload, said once, not a pile: read once the
    # stuck one was given up, and applied (the operator took the dead mount's file out).
    assert gw.output().count("waits for the reading under way") == 1, gw.output()[-4000:]
    wait_for(lambda: gw.output().count(" reloaded ") >= 2, timeout=60, what="the pending reload in both workers",
             log=gw.output)
    assert gw.output().count("reload: reading") == 2, gw.output()[-4000:]
    # The reader given up, killed, may be held in the kernel until the mount answers (a FUSE read
    # sent is waited out): the master went on without it, and reaps it once the mount goes.
    dead_mount.close()
    wait_for(lambda: not alive(reader), timeout=30, what="the reader given up reaped", log=gw.output)
    wait_for(lambda: f"given up (process {reader}) has ended" in gw.output(), timeout=30,
             what="the reader's end said", log=gw.output)
    assert sorted(children(master_pid(gw))) == sorted(serving(gw))
    assert realms(gw) == {realm("r1")}
    assert gw.proc.poll() is None and "Traceback" not in gw.output(), gw.output()[-4000:]


# -- plugin start-ups that never return -------------------------------------------------------------

_HANGS_AT_START = '''
import os
import time

from gateway import PluginSettings, hookimpl


class HangsAtStartSettings(PluginSettings):
    #: a file holding ``all`` while start-ups wait; the wait ends when it is gone
    pid_file: str


class HangsAtStart:
    """A ``gateway_startup`` that waits for a backend that does not answer (no timeout of its
    own) while ``pid_file`` exists."""

    Settings = HangsAtStartSettings

    def __init__(self, settings, context):
        self.pid_file = settings.pid_file

    @hookimpl
    def gateway_startup(self):
        if not os.path.exists(self.pid_file):
            return
        with open(self.pid_file + ".waiting", "a") as f:
            f.write(f"{os.getpid()}\\n")
        deadline = time.monotonic() + 600  # bounded, for a test run that goes wrong
        while os.path.exists(self.pid_file) and time.monotonic() < deadline:
            time.sleep(0.1)
'''


@pytest.fixture
def plugin_env(tmp_path):
    site = make_dist(tmp_path / "site", "supervisor-left46-plugins", {"hangsatstart": "left46_hangs:HangsAtStart"},
                     {"left46_hangs.py": _HANGS_AT_START})
    return {"PYTHONPATH": os.pathsep.join([str(site), TESTS_DIR, os.environ.get("PYTHONPATH", "")])}


def test_a_first_start_whose_plugin_start_up_never_returns_fails_saying_why(conf_dir, alice_hash, plugin_env,
                                                                            tmp_path):
    """At the very first start, nothing bounded a plugin's start-up: with every worker waiting
    in it (a backend that does not answer), the master sat there for good, its sockets taking
    connections nobody answered, and the log said nothing after `running 2 workers` (under
    systemd the unit was `active`, READY=1 said). Now, once the start grace has passed with no
    worker serving, the master names each worker that has not started, has its stacks written
    (where it waits: the plugin's gateway_startup), and the start fails (exit 3), as any other
    failed first start does: systemd's Restart= tries again, and the journal says why. Nor is
    READY=1 said to systemd (``Type=notify``) before a worker serves: said at the fork,
    `systemctl start` succeeded for a gateway that never served."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"authgw-test-{secrets.token_hex(6)}"
    notify.bind("\0" + name)  # the abstract namespace, as systemd's `@...` addresses
    notify.setblocking(False)
    plugin_env = {**plugin_env, "NOTIFY_SOCKET": "@" + name}
    waiting = tmp_path / "waiting"
    waiting.write_text("all\n")
    write_conf(conf_dir, {"gateway.yaml": gateway_yaml("r0", "plugins: [hangsatstart]\n"),
                          "hangsatstart.yaml": f"hangsatstart:\n  pid_file: {waiting}\n",
                          **static_users({"alice": alice_hash})})
    gw = GatewayProcess(conf_dir, tmp_path / "state", workers=2, env=plugin_env)
    gw._log = open(gw.log_path, "ab")
    gw.proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(conf_dir), "--state-dir", str(gw.state_dir),
         "--workers", "2", "--listen", f"127.0.0.1:{gw.port}"], stdout=gw._log, stderr=subprocess.STDOUT, env=gw.env)
    try:
        wait_for_port("127.0.0.1", gw.port, timeout=60, proc=gw.proc)
        wait_for(lambda: Path(f"{waiting}.waiting").exists() and
                 len(Path(f"{waiting}.waiting").read_text().split()) == 2,
                 timeout=60, what="both workers waiting in the start-up", log=gw.output)
        try:
            code = gw.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            code = None
        assert code == 3, gw.output()[-4000:]
        out = gw.output()
        assert re.search(r"worker \d+ \(slot \d\) has not started serving \d+ s after its fork.*no worker serving "
                         r"yet, the start fails", out), out[-4000:]
        assert "in gateway_startup" in out, out[-6000:]  # its stacks say where it waits
        assert "failed to start; stopping" in out, out[-4000:]
        with pytest.raises(BlockingIOError):
            notify.recv(4096)  # no READY=1 from a gateway that never served
    finally:
        notify.close()
        waiting.unlink(missing_ok=True)
        gw.stop()


def test_a_lone_gateways_first_start_whose_plugin_start_up_never_returns_fails_saying_why(
        conf_dir, alice_hash, plugin_env, tmp_path):
    """With one worker there is no master to watch the start: a plugin's start-up that never
    returned kept `authgw serve --workers 1` starting for good, its socket taking connections no
    one answered and nothing logged. It is bounded by the same grace, and the start fails."""
    waiting = tmp_path / "waiting"
    waiting.write_text("all\n")
    write_conf(conf_dir, {"gateway.yaml": gateway_yaml("r0", "plugins: [hangsatstart]\n"),
                          "hangsatstart.yaml": f"hangsatstart:\n  pid_file: {waiting}\n",
                          **static_users({"alice": alice_hash})})
    gw = GatewayProcess(conf_dir, tmp_path / "state", workers=1, env=plugin_env)
    gw._log = open(gw.log_path, "ab")
    gw.proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(conf_dir), "--state-dir", str(gw.state_dir),
         "--workers", "1", "--listen", f"127.0.0.1:{gw.port}"], stdout=gw._log, stderr=subprocess.STDOUT, env=gw.env)
    try:
        wait_for(lambda: Path(f"{waiting}.waiting").exists(), timeout=60, what="the start-up waiting",
                 log=gw.output)
        try:
            code = gw.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            code = None
        assert code == 3, gw.output()[-4000:]  # before: still starting when the wait ran out
        assert re.search(r"gateway_startup has not returned after \d+ s", gw.output()), gw.output()[-4000:]
    finally:
        waiting.unlink(missing_ok=True)
        gw.stop()


def test_the_socket_of_a_slot_whose_replacement_is_retried_takes_no_connections_before_it_serves(
        conf_dir, alice_hash, start_gateway, plugin_env, tmp_path):
    """A slot whose replacement failed to start has its socket closed until the next try; the
    next try bound it again, listening, at the fork: while that try's start-up waited (up to the
    start grace, 30 s a try), the kernel queued that slot's share of new connections for no one
    to accept, then reset them when the try was killed. Now the retried slot's socket is bound
    without listening (out of the SO_REUSEPORT group's choice) until its worker serves on it:
    every new connection meanwhile goes to the worker that serves."""
    waiting = tmp_path / "waiting"
    write_conf(conf_dir, {"gateway.yaml": gateway_yaml("r0", "plugins: [hangsatstart]\n"),
                          "hangsatstart.yaml": f"hangsatstart:\n  pid_file: {waiting}\n",
                          **static_users({"alice": alice_hash})})
    gw = start_gateway(conf_dir, workers=2, env=plugin_env)
    wait_for(lambda: len(serving(gw)) == 2, what="two workers serving", log=gw.output)
    waiting.write_text("all\n")
    master_fds = _fds(master_pid(gw))
    victim = serving(gw)[0]
    os.kill(victim, signal.SIGKILL)
    # The first replacement waits the grace, is killed as a failed start; the second try rebinds
    # the slot and waits again.
    wait_for(lambda: "has not started serving" in gw.output(), timeout=120, what="the first try given up",
             log=gw.output)
    wait_for(lambda: len(Path(f"{waiting}.waiting").read_text().split()) >= 2, timeout=60,
             what="the second try waiting in its start-up", log=gw.output)
    second = int(Path(f"{waiting}.waiting").read_text().split()[1])
    assert alive(second)
    # Every new connection now is answered by the worker that serves, none left in the queue of
    # a worker that is still starting.
    answered = []
    for _ in range(40):
        try:
            with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as conn:
                conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                conn.settimeout(5)
                answered.append(conn.recv(100).startswith(b"HTTP/1.1 200"))
        except OSError:  # waited for no one (a timeout), or reset as the try was killed
            answered.append(False)
    assert all(answered), f"{answered.count(False)} of 40 connections waited for a worker still starting"
    waiting.unlink()  # the backend answers: that try serves on its slot's socket
    wait_for(lambda: second in serving(gw), timeout=60, what="the retried worker serving", log=gw.output)
    # Both slots listen again, and the master holds the descriptors it held before: none is
    # left from the tries (a socket, a link, a page each).
    wait_for(lambda: _listening_sockets(gw.port) == 2, timeout=30, what="both slots listening", log=gw.output)
    assert [gw.get("/healthz", timeout=10).status for _ in range(20)] == [200] * 20
    assert _fds(master_pid(gw)) == master_fds
    assert gw.proc.poll() is None and "Traceback" not in gw.output(), gw.output()[-4000:]


def _listening_sockets(port: int) -> int:
    """Sockets listening on 127.0.0.1:*port* (``/proc/net/tcp``, state 0A)."""
    count = 0
    with open("/proc/net/tcp") as table:
        for line in list(table)[1:]:
            fields = line.split()
            if fields[1] == f"0100007F:{port:04X}" and fields[3] == "0A":
                count += 1
    return count


# -- descriptors and processes across reloads --------------------------------------------------------

def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_twenty_reloads_and_a_sighup_storm_leave_no_descriptor_or_process_behind(conf_dir, alice_hash,
                                                                                 start_gateway):
    """The master's descriptors and children, and each worker's descriptors, are where they
    were after 20 reloads and a storm of 200 SIGHUPs: each reload's reader is reaped, its link
    closed, and the storm is one or two reloads, not 200."""
    write_conf(conf_dir, {"gateway.yaml": gateway_yaml("r0"), **static_users({"alice": alice_hash})})
    gw = start_gateway(conf_dir, workers=2)
    wait_for(lambda: len(serving(gw)) == 2, what="two workers serving", log=gw.output)
    master = master_pid(gw)
    workers = serving(gw)
    assert realms(gw) == {realm("r0")}  # each worker's metrics files are opened at its first answers
    before = _fds(master), {pid: _fds(pid) for pid in workers}
    for number in range(1, 21):
        (conf_dir / "gateway.yaml").write_text(gateway_yaml(f"r{number}"))
        os.kill(master, signal.SIGHUP)
        wait_for(lambda: gw.output().count(" reloaded ") >= 2 * number, timeout=60,
                 what=f"reload {number} in both workers", log=gw.output)
    for _ in range(200):
        os.kill(master, signal.SIGHUP)
    wait_for(lambda: gw.output().count("reload: reading") > 20, timeout=30, what="the storm's reload", log=gw.output)
    wait_for(lambda: sorted(children(master)) == sorted(workers) and "reload: reading" in gw.output()
             and gw.output().count("reload: reading") == gw.output().count("is valid"), timeout=60,
             what="the storm's reloads done", log=gw.output)
    storm = gw.output().count("reload: reading") - 20
    assert 1 <= storm <= 3, storm
    wait_for(lambda: gw.output().count(" reloaded ") >= 2 * (20 + storm), timeout=60, what="the storm applied",
             log=gw.output)
    assert realms(gw) == {realm("r20")}
    after = _fds(master), {pid: _fds(pid) for pid in workers}
    assert after[0] == before[0], (before, after)
    for pid in workers:  # a retired generation's sockets and audit file are closed within the graces
        wait_for(lambda: _fds(pid) <= before[1][pid], timeout=30, what=f"worker {pid}'s descriptors back",
                 log=gw.output)
    assert sorted(children(master)) == sorted(workers)  # no reader left, no zombie
