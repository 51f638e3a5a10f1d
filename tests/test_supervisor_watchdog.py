"""The master's watchdog (gateway/supervisor.py) through a real ``authgw serve --workers 2``: a
worker whose event loop no longer turns (SIGSTOP here; a plugin blocking the loop, a deadlock in
real life) held its share of new connections for ever, and the master, which only handled
exits, never replaced it. Now it is killed and replaced once silent for the timeout, which these
tests shorten (the ``worker_timeout`` setting, or ``AUTHGW_WORKER_TIMEOUT``, which overrides it);
a worker busy on its threads, its loop turning, is left alone."""

from __future__ import annotations

import os
import re
import signal
import threading

import pytest

from support.gateway import static_users, write_conf
from support.net import wait_for
from support.proc import children

PASSWORD = "Corr3ct-Horse-Battery"
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def alice_hash():
    from gateway.passwords import hash_password

    return hash_password(PASSWORD)


def conf(conf_dir, alice_hash, chain: str = "[static]", extra: dict[str, str] | None = None, core: str = ""):
    # A long deadline: a loaded CI machine can take seconds per login.
    return write_conf(conf_dir, {"gateway.yaml": f"chain: {chain}\nthrottle:\n  enabled: false\ndeadline: 60\n{core}",
                                 **static_users({"alice": alice_hash}), **(extra or {})})


def serving(gw) -> list[int]:
    return [int(pid) for pid in re.findall(r"authgw worker (\d+) serving", gw.output())]


def hung_lines(gw) -> list[str]:
    return re.findall(r"worker \d+ \(slot \d+\) is hung: .*", gw.output())


def alive(pid: int) -> bool:
    """*pid* exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_worker_whose_event_loop_is_stopped_is_killed_and_replaced(conf_dir, alice_hash, start_gateway):
    # Not shorter: on a machine running two suites at once, the healthy sibling's loop was once
    # found silent past 2 s, and once past 5 s (the second suite in a time namespace), and killed
    # too; its stacks had not reached the log yet when the test read it (an open bug, noted).
    timeout = 10.0
    gw = start_gateway(conf(conf_dir, alice_hash, core=f"worker_timeout: {timeout}\n"), workers=2)
    wait_for(lambda: len(serving(gw)) == 2, what="two workers serving", log=gw.output)
    master = gw.proc.pid
    before = set(children(master))
    assert len(before) == 2
    frozen = sorted(before)[0]
    os.kill(frozen, signal.SIGSTOP)  # it neither accepts nor can act on SIGTERM
    try:
        # Generous: the timeout, then a kill, a reap and a fork, on a machine running other tests.
        bound = 10 * timeout + 20
        replacement = wait_for(lambda: (set(children(master)) - before) or None, timeout=bound, interval=0.05,
                               what="a replacement worker", log=gw.output).pop()
        wait_for(lambda: frozen not in children(master) and not alive(frozen), timeout=bound, interval=0.05,
                 what="the stopped worker killed and reaped", log=gw.output)
        wait_for(lambda: replacement in serving(gw), timeout=bound, what="the replacement serving", log=gw.output)
        lines = hung_lines(gw)
        if len(lines) != 1:  # a sibling killed too: its stacks (written as it is killed) say why
            wait_for(lambda: gw.output().count("most recent call first") >= len(lines) - 1, timeout=10,
                     interval=0.1, what="the stacks of the workers killed", log=gw.output)
        assert len(lines) == 1 and lines[0].startswith(f"worker {frozen} "), gw.output()[-8000:]
        assert "then it is killed (SIGKILL)" in lines[0]
        # What the kernel says of its loop thread (what tells a lock from a starved CPU): stopped.
        assert re.search(r"its loop thread in the kernel: state [tT], wchan \S+, stack \[", lines[0]), lines[0]
        silent = float(re.search(r"has not turned for (\d+) s", lines[0]).group(1))
        assert silent >= timeout - 0.5  # rounded to whole seconds in the log
        assert set(children(master)) == (before - {frozen}) | {replacement}
        # Every new connection is answered again (reuse_port: before, a share of them hung: for
        # ever). Not within 10 s: on a machine running two suites at once a healthy worker's loop
        # has gone unrun past 5 s (above); a slot with no acceptor would still fail this.
        statuses = []
        for _ in range(20):
            try:
                statuses.append(gw.get("/healthz", timeout=60).status)
            except OSError as exc:
                statuses.append(repr(exc))
        assert statuses == [200] * 20, f"{statuses}; hung: {hung_lines(gw)}\n{gw.output()[-4000:]}"
        assert gw.auth("alice", PASSWORD, timeout=30).status == 200
        assert gw.proc.poll() is None
        assert "worker_timeout 10: a worker whose event loop does not turn for 10 s is killed" in gw.output()
        # The watchdog is the master's, set up at its start: a reload says a new value waits.
        conf(conf_dir, alice_hash, core="worker_timeout: 20\n")
        os.kill(master, signal.SIGHUP)
        wait_for(lambda: "reload: `worker_timeout` changed; it takes effect at the next restart" in gw.output(),
                 timeout=60, what="the reload's warning", log=gw.output)
    finally:
        if alive(frozen):
            os.kill(frozen, signal.SIGCONT)
    # The master still stops as before, exit code 0, nobody killed by the watchdog on the way.
    os.kill(master, signal.SIGTERM)
    assert gw.proc.wait(timeout=30) == 0, gw.output()[-3000:]
    assert len(hung_lines(gw)) == 1


SPINNER = """
import os
import time

from gateway import Attempt, PluginContext, PluginSettings, hookimpl


class SpinSettings(PluginSettings):
    seconds: float = 0.0
    record: str = ""


class Spin:
    '''A chain step that keeps a CPU busy in pure Python (it holds the GIL but for the switch
    interval) for `seconds`, and records its PID and how long it spun, then abstains.'''

    Settings = SpinSettings

    def __init__(self, settings, context: PluginContext) -> None:
        self.settings = settings

    @hookimpl
    def gateway_authenticate(self, attempt: Attempt):
        start = time.monotonic()
        total = 0
        while time.monotonic() - start < self.settings.seconds:
            total += sum(range(1000))
        with open(self.settings.record, "a") as f:
            f.write(f"{os.getpid()} {time.monotonic() - start:.3f}\\n")
        return None
"""


@pytest.fixture
def spin_env(tmp_path):
    from support.fakedist import make_dist

    site = make_dist(tmp_path / "site", "watchdog-test-plugins", {"spin": "watchdog_spin:Spin"},
                     {"watchdog_spin.py": SPINNER})
    return {"PYTHONPATH": os.pathsep.join([str(site), TESTS_DIR, os.environ.get("PYTHONPATH", "")])}


def test_a_worker_busy_on_its_threads_is_not_killed_while_its_loop_turns(
        conf_dir, alice_hash, start_gateway, spin_env, tmp_path):
    # 10 s, not 2 or 5: with another suite loading both cores, this worker's loop was once found
    # silent past 2 s, and once past 5 s, and killed. Not reproduced since (30 runs at 2 s beside
    # a full suite, or beside CPU and disk hogs); the watchdog now logs a killed worker's stacks
    # and its loop thread's state in the kernel, so a next time says what held the loop.
    timeout = 10.0
    spin = 2 * timeout + 2  # each request keeps a thread on the CPU for twice the timeout and more
    record = tmp_path / "spun"
    conf(conf_dir, alice_hash, "[spin, static]", {"spin.yaml": f"spin:\n  seconds: {spin}\n  record: {record}\n"})
    gw = start_gateway(conf_dir, workers=2, env={**spin_env, "AUTHGW_WORKER_TIMEOUT": str(timeout)})
    wait_for(lambda: len(serving(gw)) == 2, what="two workers serving", log=gw.output)
    master = gw.proc.pid
    before = set(children(master))
    statuses: list[object] = []

    def login() -> None:
        try:
            statuses.append(gw.auth("alice", PASSWORD, timeout=spin + 60).status)
        except OSError as exc:
            statuses.append(repr(exc))

    # Six logins on new connections: with a socket per worker (reuse_port) both workers get some
    # (all six on one: odds of 1 in 32), two or three CPU-bound threads each.
    threads = [threading.Thread(target=login) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(spin + 90)
    assert statuses == [200] * 6, f"{statuses}; hung: {hung_lines(gw)}\n{gw.output()[-2000:]}"
    spun = [line.split() for line in record.read_text().splitlines()]
    assert len(spun) == 6 and all(float(seconds) >= spin for _, seconds in spun)
    assert {int(pid) for pid, _ in spun} <= before  # the workers that were busy ...
    assert set(children(master)) == before  # ... are the ones still running
    assert hung_lines(gw) == [], gw.output()[-3000:]
    assert "exited" not in gw.output()


LOOP_STEPS = """
import time

from gateway import Attempt, PluginContext, PluginSettings, hookimpl


class _OnTheLoop:
    # A chain step that runs on the event loop (loop_capable) and then breaks that promise for
    # the user it is named after, holding the loop in `hold`.

    Settings = PluginSettings
    loop_capable = True
    user = ""

    def __init__(self, settings, context: PluginContext) -> None:
        pass

    @hookimpl
    def gateway_authenticate(self, attempt: Attempt):
        if attempt.username == self.user:
            self.hold()
        return None


class Blocker(_OnTheLoop):
    # Sleeps there, as a plugin calling a blocking library would: the loop stops turning.
    user = "blocker"

    def hold(self):
        time.sleep(600)


class Poller(_OnTheLoop):
    # Polls for 4 s with 5 ms sleeps: the loop does not turn, while its thread wakes up 200 times
    # a second, as one waiting for the GIL does.
    user = "poller"

    def hold(self):
        end = time.monotonic() + 4.0
        while time.monotonic() < end:
            time.sleep(0.005)
"""


def loop_steps_env(tmp_path, timeout: float) -> dict[str, str]:
    """The environment of a gateway whose steps `blocker` and `poller` hold its event loop
    (:data:`LOOP_STEPS`), with the watchdog's timeout *timeout*."""
    from support.fakedist import make_dist

    site = make_dist(tmp_path / "site", "watchdog-test-loop-steps",
                     {"blocker": "watchdog_block:Blocker", "poller": "watchdog_block:Poller"},
                     {"watchdog_block.py": LOOP_STEPS})
    return {"PYTHONPATH": os.pathsep.join([str(site), TESTS_DIR, os.environ.get("PYTHONPATH", "")]),
            "AUTHGW_WORKER_TIMEOUT": str(timeout)}


def test_a_worker_whose_loop_a_plugin_blocks_is_killed_and_its_stacks_say_where(
        conf_dir, alice_hash, start_gateway, tmp_path):
    gw = start_gateway(conf(conf_dir, alice_hash, "[blocker]"), workers=2, env=loop_steps_env(tmp_path, 5))
    wait_for(lambda: len(serving(gw)) == 2, what="two workers serving", log=gw.output)
    master = gw.proc.pid
    before = set(children(master))
    answer: list[object] = []

    def login() -> None:
        try:
            answer.append(gw.auth("blocker", PASSWORD, timeout=120).status)
        except OSError as exc:  # the worker holding the connection was killed
            answer.append(type(exc).__name__)

    thread = threading.Thread(target=login)
    thread.start()
    lines = wait_for(lambda: hung_lines(gw) or None, timeout=120, interval=0.1, what="a hung worker",
                     log=gw.output)
    blocked = int(lines[0].split()[1])
    assert blocked in before
    # The kernel's view: asleep in the plugin's time.sleep, not waiting for the CPU or the GIL.
    assert re.search(r"in the kernel: state S, wchan \S*nanosleep", lines[0]), lines[0]
    wait_for(lambda: not alive(blocked), timeout=60, interval=0.05, what="the blocked worker killed",
             log=gw.output)
    thread.join(60)
    assert answer and answer[0] != 200, answer
    # Its stacks, written by faulthandler before the kill, name the plugin's call where the
    # loop thread waits.
    output = gw.output()
    stacks = output[output.index(lines[0]):]
    assert "most recent call first" in stacks, output[-3000:]
    assert re.search(r'File ".*watchdog_block\.py", line \d+ in gateway_authenticate', stacks), stacks[:3000]
    wait_for(lambda: len(set(children(master)) - before) == 1 and len(serving(gw)) == 3, timeout=60,
             what="a replacement serving", log=gw.output)
    assert gw.auth("alice", PASSWORD, timeout=30).status == 401  # the blocker abstains: no one vouches
    assert len(hung_lines(gw)) == 1


def test_a_worker_whose_loop_thread_keeps_waking_gets_more_time_than_a_blocked_one(
        conf_dir, alice_hash, start_gateway, tmp_path):
    """A loop silent past the timeout while its thread keeps waking up (voluntary context
    switches: what a thread starved of the GIL by the worker's busy threads does) is not blocked:
    it has _STARVED_TIMEOUTS timeouts, where a blocked one (the test above) is killed after one.
    A worker with CPU-bound chain threads on a loaded machine was killed while it answered (two
    suites on two cores, a 10 s timeout)."""
    gw = start_gateway(conf(conf_dir, alice_hash, "[poller]"), workers=2,  # on the loop: alone in the chain
                       env=loop_steps_env(tmp_path, 2))
    wait_for(lambda: len(serving(gw)) == 2, what="two workers serving", log=gw.output)
    before = set(children(gw.proc.pid))
    assert gw.auth("poller", PASSWORD, timeout=60).status == 401  # answered (the poller abstains)
    assert "its event loop has not turned for" in gw.output() and "keeps waking up" in gw.output()
    assert hung_lines(gw) == [] and set(children(gw.proc.pid)) == before, gw.output()[-3000:]


def test_a_hung_worker_is_killed_only_once_it_has_taken_the_stacks_signal():
    """On a machine starved of CPU a hung worker was not run within the grace: the SIGKILL sent
    beside the still pending stacks signal was taken first, and the stacks were lost (seen twice
    in CI-like runs). The watchdog waits, up to _STACKS_MAX_WAIT, for the signal to be taken;
    not for a stopped process, which will not take it."""
    import signal
    import subprocess
    import sys

    from gateway.supervisor import _signal_pending

    child = subprocess.Popen([sys.executable, "-c", "import signal, time\n"
                              "signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR2])\n"
                              "print('ready', flush=True)\ntime.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "ready\n"
        assert not _signal_pending(child.pid, signal.SIGUSR2)
        child.send_signal(signal.SIGUSR2)  # blocked: it stays pending, as for a process not run
        wait_for(lambda: _signal_pending(child.pid, signal.SIGUSR2), timeout=10, what="the signal pending")
        child.send_signal(signal.SIGSTOP)
        wait_for(lambda: not _signal_pending(child.pid, signal.SIGUSR2), timeout=10, what="stopped: not waited for")
    finally:
        child.kill()
        child.wait(10)


def test_the_kernel_state_the_watchdog_reads_tells_runnable_from_asleep_and_stopped():
    """A loop thread woken but given no CPU since (two suites on two cores, a virtual CPU the
    host does not run) changes none of the wake-up counts, which the kernel keeps as a thread
    gets on a CPU: the watchdog takes a runnable one (R) for waking, not blocked. What it reads,
    for real processes: one computing is R, one sleeping is S, one stopped is T."""
    import subprocess
    import sys
    import time

    from gateway.supervisor import _thread_state

    spinning = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    sleeping = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        wait_for(lambda: _thread_state(sleeping.pid) == "S", timeout=30, interval=0.05, what="a sleeping process")
        # A computing process is R whenever it is looked at (running, or runnable between slices).
        assert {_thread_state(spinning.pid) for _ in range(20)} == {"R"}
        os.kill(sleeping.pid, signal.SIGSTOP)
        wait_for(lambda: _thread_state(sleeping.pid) == "T", timeout=10, interval=0.05, what="a stopped process")
        os.kill(sleeping.pid, signal.SIGCONT)
        time.sleep(0.05)
    finally:
        for proc in (spinning, sleeping):
            proc.kill()
            proc.wait()
    assert _thread_state(spinning.pid) == "?"  # gone: /proc does not say
