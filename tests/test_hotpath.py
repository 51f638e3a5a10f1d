"""Per-attempt bookkeeping (issue 15): audit lines written in batches without losing a line at a
clean stop and at most the last flush interval when a worker is killed; metrics kept as plain
in-process counters and published to prometheus_client with the same names, labels and values."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import stat
import threading
import time
import types

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway import audit as audit_module
from gateway import metrics as metrics_module
from gateway.audit import AuditLog
from gateway.metrics import _BUCKETS, Metrics
from gateway.model import Attempt, Decision, Identity, Outcome, PasswordCredential
from support.gateway import static_users, write_conf
from support.http import basic, request
from support.net import wait_for

PASSWORD = "Corr3ct-Horse-Battery"
WRONG = "Wr0ng-Horse-Battery"


def _attempt(username: str, front_door: str = "forward_auth", age: float = 0.0, password: str = PASSWORD) -> Attempt:
    return Attempt(request_id=f"r-{username}-{time.monotonic_ns()}", client=ipaddress.ip_address("192.0.2.7"),
                   front_door=front_door, deadline=time.monotonic() + 5,
                   password=PasswordCredential(username, password), started=time.monotonic() - age)


def _samples(text: bytes) -> dict:
    """name+labels -> value, without the ``_created`` timestamps (they differ between registries)."""
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            if not sample.name.endswith("_created"):
                out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_metrics_expose_what_prometheus_client_would(monkeypatch):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    metrics = Metrics()
    reference = CollectorRegistry()
    attempts = Counter("authgw_attempts", "x", ["outcome", "step", "front_door", "from_cache"], registry=reference)
    latency = Histogram("authgw_attempt_duration_seconds", "x", ["front_door"], buckets=_BUCKETS, registry=reference)
    in_flight = Gauge("authgw_attempts_in_flight", "x", registry=reference)
    identity = Identity(subject="uid=alice", username="alice", method="static")
    cases = [("forward_auth", 0.0004, Decision.allow(identity, step="static")),
             ("forward_auth", 0.004, Decision.allow(identity, step="cache", from_cache=True)),
             ("api", 0.04, Decision.deny(Outcome.INVALID_CREDENTIALS, step="static", reason="static.bad_password")),
             ("api", 0.4, Decision.deny(Outcome.NOT_APPLICABLE, step=None, reason="no_credentials")),
             ("forward_auth", 4.0, Decision.allow(identity, step="static")),
             ("forward_auth", 40.0, Decision.allow(identity, step="static"))]  # past the last bucket: +Inf
    # The metrics read the clock when an attempt finishes: pinned to each attempt's start + its
    # age + a microsecond (what an idle machine adds), so that a loaded machine's delay between
    # the two cannot move it into the next bucket.
    finished_at = [0.0]
    monkeypatch.setattr(metrics_module, "time", types.SimpleNamespace(monotonic=lambda: finished_at[0]))
    for round_ in range(3):
        for front_door, age, decision in cases:
            attempt = _attempt("alice", front_door, age)
            finished_at[0] = attempt.started + age + 1e-6
            metrics.gateway_auth_finished(attempt, decision)
            attempts.labels(decision.outcome.value, decision.step or "none", front_door,
                            "true" if decision.from_cache else "false").inc()
            latency.labels(front_door).observe(age)
        if round_ == 1:  # a scrape in between: what was published is not published again
            metrics.exposition()
    metrics.in_flight.inc(), metrics.in_flight.inc(), metrics.in_flight.dec()
    in_flight.inc()
    ours, theirs = _samples(metrics.exposition()), _samples(generate_latest(reference))
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        if key[0].endswith("_sum"):  # ours is the measured time: the age plus a few microseconds
            assert value <= ours[key] < value + 0.5, key
        else:
            assert ours[key] == value, key
    assert ours[("authgw_attempt_duration_seconds_bucket", (("front_door", "forward_auth"), ("le", "+Inf")))] == 12


def test_each_audit_line_is_in_the_file_when_the_attempt_is_told(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(str(path))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    identity = Identity(subject="uid=alice", username="alice", method="static")
    log.gateway_auth_finished(_attempt("first"), Decision.allow(identity, step="static"))
    # before the answer is written (the hook runs first): nothing waits for a batch or a thread
    assert json.loads(path.read_text())["username"] == "first"

    names = [f"user{i}" for i in range(2000)] + ["bad\udcffname"]  # a lone surrogate
    helpers = [threading.Thread(target=lambda part=part: [
        log.gateway_auth_finished(_attempt(name, password=WRONG),
                                  Decision.deny(Outcome.INVALID_CREDENTIALS, step="static", reason="static.bad_password"))
        for name in part]) for part in (names[:1000], names[1000:])]
    for helper in helpers:  # two threads at once: whole lines, none lost
        helper.start()
    for helper in helpers:
        helper.join()
    text = path.read_text()
    records = [json.loads(line) for line in text.splitlines()]
    assert records[0]["username"] == "first" and sorted(r["username"] for r in records[1:]) == sorted(names)
    assert list(records[0]) == ["time", "event", "request_id", "client", "front_door", "username", "method",
                                "outcome", "reason", "step", "from_cache", "subject", "latency_ms", "signed_in_as"]
    assert records[0]["signed_in_as"] == "alice"  # "first" signed in as alice
    assert all("signed_in_as" not in r for r in records[1:])  # refusals sign no one in
    assert WRONG not in text and PASSWORD not in text
    log.close()
    with pytest.raises(ValueError):  # a late line is refused loudly, not sent anywhere else
        log.gateway_auth_finished(_attempt("late"), Decision.allow(identity, step="static"))


def test_an_audit_line_and_a_json_log_line_stay_one_line_for_any_value(tmp_path):
    # U+0085, U+2028 and U+2029 are valid raw in JSON and line readers split on them: a subject
    # or display name from a directory made two lines of one record (review of what the gateway
    # writes). They are escaped; the values read back the same.
    import logging

    from gateway.logs import JsonFormatter

    path = tmp_path / "audit.jsonl"
    log = AuditLog(str(path))
    subject = "uid=eve\u2028,\u0085ou=x\u2029 Zoë"
    log.gateway_auth_finished(_attempt("eve"), Decision.allow(Identity(subject=subject, username="eve",
                                                                        method="static"), step="static"))
    log.close()
    text = path.read_text()
    assert len(text.splitlines()) == 1 and json.loads(text)["subject"] == subject
    record = logging.LogRecord("authgw", logging.WARNING, __file__, 1, "name %s", (subject,), None)
    line = JsonFormatter().format(record)
    assert len(line.splitlines()) == 1 and json.loads(line)["message"] == f"name {subject}"


def test_audit_lines_the_disk_refuses_are_kept_in_order_and_written_once_it_takes_them(tmp_path, caplog, monkeypatch):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(str(path))
    ok = Decision.allow(Identity(subject="uid=alice", username="alice", method="static"), step="static")

    def lines() -> list[str]:
        return [json.loads(line)["username"] for line in path.read_text().splitlines()]

    log.gateway_auth_finished(_attempt("before"), ok)
    writer = log._writer
    good_fd, writer._fd = writer._fd, os.open("/dev/full", os.O_WRONLY)  # the disk is full
    monkeypatch.setattr(audit_module, "MAX_PENDING", 3)
    for name in ("kept1", "kept2", "kept3", "kept4", "kept5"):
        log.gateway_auth_finished(_attempt(name), ok)
    assert lines() == ["before"]
    errors = [r.getMessage() for r in caplog.records if r.name == "authgw.audit"]
    assert len(errors) == 2  # when writes start failing, and when lines start being dropped: not per line
    assert "cannot write the audit log" in errors[0] and "dropping its oldest" in errors[1]
    os.close(writer._fd)
    writer._fd = good_fd  # space again: the kept lines go first, in order, with the next one
    log.gateway_auth_finished(_attempt("after"), ok)
    assert lines() == ["before", "kept3", "kept4", "kept5", "after"]
    assert "the 2 oldest of them were dropped" in caplog.records[-1].getMessage()
    log.close()


def test_audit_lines_still_refused_when_the_file_is_left_are_counted_in_the_log(tmp_path, caplog, monkeypatch):
    # Lines kept while the disk was full, and still refused at exit or reload, went without a
    # word (review of reliability): the service log is their one record.
    path = tmp_path / "audit.jsonl"
    log = AuditLog(str(path))
    ok = Decision.allow(Identity(subject="uid=alice", username="alice", method="static"), step="static")
    writer = log._writer
    good_fd, writer._fd = writer._fd, os.open("/dev/full", os.O_WRONLY)  # the disk is full
    monkeypatch.setattr(audit_module, "MAX_PENDING", 3)
    for name in ("kept1", "kept2", "kept3", "kept4", "kept5"):
        log.gateway_auth_finished(_attempt(name), ok)
    os.close(good_fd)
    log.close()
    assert "5 line(s) of answered attempts are lost" in caplog.records[-1].getMessage()  # 3 kept, 2 dropped


def _conf(conf_dir, password_hash, audit_path, workers_extra=""):
    return write_conf(conf_dir, {
        "gateway.yaml": f"chain: [static]\nthrottle:\n  enabled: false\naudit:\n  file: {audit_path}\n{workers_extra}",
        **static_users({"alice": password_hash}),
    })


@pytest.fixture(scope="module")
def alice_hash():
    from gateway.passwords import hash_password

    return hash_password(PASSWORD)


def _load(gw, stop: threading.Event, answered: list, threads: int = 6, limit: float = 20.0) -> list[threading.Thread]:
    """Threads logging in (one in ten with a wrong password, under a name of its own) until
    *stop* or *limit* seconds; *answered* gets (request id, monotonic time) per 200/401."""
    def run(tid: int) -> None:
        end = time.monotonic() + limit
        n = 0
        while not stop.is_set() and time.monotonic() < end:
            name = f"u{tid}x{n}" if n % 10 == 9 else "alice"  # failures are slowed down on purpose
            n += 1
            try:
                response = request(gw.url, "GET", "/auth",
                                   {"Authorization": basic(name, PASSWORD if name == "alice" else WRONG)}, timeout=5)
            except OSError:
                continue
            if response.status in (200, 401):
                answered.append((response.header("X-Request-Id"), time.monotonic()))
    workers = [threading.Thread(target=run, args=(tid,), daemon=True) for tid in range(threads)]
    for worker in workers:
        worker.start()
    return workers


def _audit_ids(path) -> set[str]:
    text = path.read_text()
    assert PASSWORD not in text and WRONG not in text
    return {json.loads(line)["request_id"] for line in text.splitlines()}


def test_sigterm_under_load_loses_no_audit_line(conf_dir, alice_hash, start_gateway, tmp_path):
    path = tmp_path / "audit.jsonl"
    gw = start_gateway(_conf(conf_dir, alice_hash, path), workers=2)
    stop, answered = threading.Event(), []
    threads = _load(gw, stop, answered)
    deadline = time.monotonic() + 20
    while len(answered) < 60 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gw.stop() == 0  # SIGTERM while the load runs
    stop.set()
    for thread in threads:
        thread.join(10)
    assert len(answered) >= 60
    missing = {rid for rid, _ in answered} - _audit_ids(path)
    assert not missing, f"{len(missing)} answered attempts without an audit line"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_killed_worker_has_lost_no_audit_line_of_an_attempt_it_answered(conf_dir, alice_hash, start_gateway, tmp_path):
    # SIGKILL (the OOM killer, the watchdog) under load: every attempt whose answer came has its
    # line in the file, to the last one (lines were batched for up to 100 ms before: a few of
    # each kill's last answers, accepted logins among them, had none)
    path = tmp_path / "audit.jsonl"
    gw = start_gateway(_conf(conf_dir, alice_hash, path))  # one process: it is the worker
    stop, answered = threading.Event(), []
    threads = _load(gw, stop, answered)
    started = time.monotonic()
    while (len(answered) < 60 or time.monotonic() < started + 2) and time.monotonic() < started + 20:
        time.sleep(0.05)
    os.kill(gw.proc.pid, signal.SIGKILL)
    gw.proc.wait(10)
    stop.set()
    for thread in threads:
        thread.join(10)
    assert len(answered) >= 60
    missing = {rid for rid, _ in answered} - _audit_ids(path)
    assert not missing, f"{len(missing)} answered attempts have no audit line"
