"""Signals and process lifecycle through a real ``authgw serve`` (issue 10 item 3): SIGHUP
reloads conf.d without dropping a request, an invalid configuration is refused and logged, the
PID file contract, and workers that die with their master."""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import threading

import pytest

from support.gateway import static_users, write_conf
from support.net import wait_for

PASSWORD = "Corr3ct-Horse-Battery"


@pytest.fixture(scope="module")
def alice_hash():
    from gateway.passwords import hash_password

    return hash_password(PASSWORD)


def gateway_yaml(realm: str, extra: str = "") -> str:
    # A long deadline: this is about reloads, and a loaded CI machine can take seconds per login.
    return f"chain: [static]\nthrottle:\n  enabled: false\ndeadline: 60\nrealm: {realm}\n{extra}"


def conf(conf_dir, alice_hash, realm: str):
    return write_conf(conf_dir, {
        "gateway.yaml": gateway_yaml(realm),
        **static_users({"alice": alice_hash}),
    })


def master_pid(gw) -> int:
    return int((gw.state_dir / "authgw.pid").read_text())


@pytest.mark.parametrize("workers", [1, 2])
def test_reloads_under_continuous_logins(conf_dir, alice_hash, start_gateway, workers):
    gw = start_gateway(conf(conf_dir, alice_hash, "r0"), workers=workers)
    failures: list[object] = []
    served = [0]
    stop = threading.Event()

    def login_loop() -> None:
        while not stop.is_set() and served[0] < 20_000:  # bounded by the reloads, and by count
            try:
                r = gw.auth("alice", PASSWORD, timeout=90)
                if r.status != 200:
                    failures.append(r.status)
            except OSError as exc:
                failures.append(repr(exc))
            served[0] += 1

    clients = [threading.Thread(target=login_loop) for _ in range(2)]
    for t in clients:
        t.start()
    try:
        valid = 0
        for i in range(1, 11):
            before = gw.output().count("reload refused")
            if i == 6:  # the invalid one: the running configuration must stay
                (conf_dir / "gateway.yaml").write_text(gateway_yaml(f"r{i}", "threads: lots\n"))
            else:
                (conf_dir / "gateway.yaml").write_text(gateway_yaml(f"r{i}"))
            os.kill(master_pid(gw), signal.SIGHUP)
            if i == 6:
                wait_for(lambda: gw.output().count("reload refused") > before, what="the refusal", log=gw.output)
                r = gw.auth("alice", "wrong")
                assert r.all("WWW-Authenticate") == [f'Basic realm="r{i - 1}", charset="UTF-8"'], (r.status, r.body)
                continue
            valid += 1
            wait_for(lambda: gw.output().count(" reloaded ") >= valid * workers, timeout=60, what=f"reload {i}", log=gw.output)
            for _ in range(4):  # the new settings take effect (in every worker)
                r = gw.auth("alice", "wrong")
                assert r.all("WWW-Authenticate") == [f'Basic realm="r{i}", charset="UTF-8"'], \
                    (r.status, r.body, gw.output()[-3000:])
    finally:
        stop.set()
        for t in clients:
            t.join(120)
    assert failures == []
    assert served[0] > 20
    log = gw.output()
    refusals = log.count("reload refused, the running configuration stays")
    assert refusals == 1
    assert re.search(r"gateway\.yaml:\d+.*threads", log), log
    assert gw.proc.poll() is None and "Traceback" not in log


def test_pid_file_contract(conf_dir, alice_hash, start_gateway):
    gw = start_gateway(conf(conf_dir, alice_hash, "r0"), workers=2)
    path = gw.state_dir / "authgw.pid"
    assert int(path.read_text()) == gw.proc.pid
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert gw.stop() == 0
    assert not path.exists()


def test_workers_die_with_their_master(conf_dir, alice_hash, start_gateway):
    gw = start_gateway(conf(conf_dir, alice_hash, "r0"), workers=2)
    wait_for(lambda: len(re.findall(r"authgw worker (\d+) serving", gw.output())) == 2, what="two workers")
    workers = [int(pid) for pid in re.findall(r"authgw worker (\d+) serving", gw.output())]
    os.kill(gw.proc.pid, signal.SIGKILL)
    gw.proc.wait(10)

    def gone(pid: int) -> bool:
        # Reaped, or a zombie waiting for its (dead) parent's reaper. Every thread is looked at:
        # a group leader shows Z as soon as it has exited itself, while its other threads may
        # still be exiting and holding the listening sockets (seen once on a loaded machine).
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except FileNotFoundError:
            return True
        for task in tasks:
            try:
                with open(f"/proc/{pid}/task/{task}/stat") as f:
                    if f.read().split(")")[-1].split()[0] not in ("Z", "X"):
                        return False
            except FileNotFoundError:
                pass
        return True

    wait_for(lambda: all(gone(pid) for pid in workers), timeout=20, what="orphaned workers to exit")
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", gw.port), timeout=2).close()


def test_sighup_before_anything_else_does_not_kill_a_single_worker(conf_dir, alice_hash, start_gateway):
    gw = start_gateway(conf(conf_dir, alice_hash, "r0"))
    os.kill(gw.proc.pid, signal.SIGHUP)
    wait_for(lambda: " reloaded " in gw.output(), what="the reload")
    assert gw.proc.poll() is None and gw.auth("alice", PASSWORD).status == 200


def test_a_reload_whose_start_up_fails_shuts_down_the_plugins_it_started(tmp_path, monkeypatch):
    # In-process, the worker's own reload: the new configuration adds a plugin whose
    # gateway_startup raises. The reload is refused and the running generation stays; the
    # plugins the refused one had already started (a refresher thread) are shut down, not left
    # running beside it, once per SIGHUP.
    import asyncio
    import functools

    import yaml

    import gateway.server as server
    from gateway.runtime import build_runtime
    from support import testplugins
    from support.chainhelp import plugin_info

    discovered = {"a": plugin_info("a", "support.testplugins:Step"),
                  "refresher": plugin_info("refresher", "support.testplugins:Refresher"),
                  "bad": plugin_info("bad", "support.testplugins:StartupRaises")}
    monkeypatch.setattr(server, "build_runtime", functools.partial(build_runtime, discovered=discovered))
    conf = tmp_path / "conf.d"
    conf.mkdir()

    def write(plugins):
        (conf / "gateway.yaml").write_text(yaml.safe_dump({"throttle": {"enabled": False}, "chain": ["a"],
                                                           "plugins": plugins}))

    async def main():
        write(["refresher"])
        worker = server._Worker(conf, tmp_path / "state", [], {})
        await worker.start(server.build_runtime(conf, state_dir=tmp_path / "state"))
        running = set(testplugins.Refresher.RUNNING)
        assert len(running) == 1
        write(["refresher", "bad"])
        assert [await worker.reload() for _ in range(3)] == [False] * 3
        wait_for(lambda: testplugins.Refresher.RUNNING == running, 10, interval=0.05,
                 what="the refused generations' refreshers stopped")
        await worker.stop()
        wait_for(lambda: not testplugins.Refresher.RUNNING, 10, interval=0.05, what="every refresher stopped")

    asyncio.run(main())
