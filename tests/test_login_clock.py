"""The login door when the wall clock steps back (an NTP correction of a clock that ran fast;
review of time). Session ages, sign-in ages and account-check ages are wall-clock differences
(they cross processes and hosts); after a step back they were negative, and a session stayed
alive, a sign-in counted as fresh for ``max_age`` and an account went unchecked for as long as
the step. Real SessionManager over its SQLite store; the clock is the only thing stood in for."""

from __future__ import annotations

import time

import pytest

from gateway.model import Identity
from gateway.plugins.login.sessions import CLOCK_TOLERANCE, SessionManager, SqliteStore
from gateway.plugins.login.settings import SessionSettings
from gateway.plugins.login.web import LoginDoor


@pytest.fixture
def clock(monkeypatch):
    now = [time.time()]
    monkeypatch.setattr(time, "time", lambda: now[0])
    return now


def signed_in(tmp_path, clock):
    manager = SessionManager(SessionSettings(idle=1800, absolute=28800), SqliteStore(tmp_path / "s.sqlite3"), b"k" * 32)
    identity = Identity(subject="alice", username="alice", method="static", authenticated_at=clock[0])
    cookie, session = manager.create(identity)
    return manager, cookie, manager.rechecked(session, identity) or session


def test_a_step_back_makes_nothing_fresher(tmp_path, clock):
    manager, cookie, session = signed_in(tmp_path, clock)
    start = clock[0]
    clock[0] = start + 120  # two minutes on: the account is due a check, a max_age=60 request a sign-in
    assert manager.recheck_due(session) and not LoginDoor.reusable(session, {"max_age": 60})
    clock[0] = start - 3600 + 120  # the same two minutes, after the clock stepped back an hour
    assert manager.recheck_due(session)
    assert not LoginDoor.reusable(session, {"max_age": 60})
    assert manager.get(cookie) is None  # a session from the future: ended, the user signs in again


def test_a_clock_a_little_behind_another_hosts_keeps_the_session(tmp_path, clock):
    # hosts sharing a Redis store: one whose clock is a few seconds behind the one that signed
    # the user in must not end the session, nor ask for a sign-in at every request
    manager, cookie, session = signed_in(tmp_path, clock)
    clock[0] -= CLOCK_TOLERANCE / 2
    assert manager.get(cookie) is not None
    assert LoginDoor.reusable(session, {"max_age": 600}) and not manager.recheck_due(session)
