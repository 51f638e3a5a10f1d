"""A login door's SQLite session store with its write lock held, as an operator's ``sqlite3``
shell holds it mid-transaction, and requests sent meanwhile from threads: what the tests of the
store's calls made off the event loop share (test_login_left47*.py, test_login_oidc_left47.py).

A site here is a :class:`support.login.LoginSite` started with one worker, so that every request
shares its event loop, with ``site.db`` its store's file (:func:`one_worker`)."""

from __future__ import annotations

import sqlite3
import threading


def one_worker(site):
    """*site* started with one worker, ``site.gw`` its gateway and ``site.db`` its store's file."""
    site.gw = site.start(workers=1)
    site.db = site.dir / "state0" / "login" / "sessions.sqlite3"
    return site


class Pending:
    """A request sent from a thread; its answer (or exception) once :attr:`done` is set."""

    def __init__(self, send) -> None:
        self.done = threading.Event()
        self.answer = self.error = None

        def run():
            try:
                self.answer = send()
            except Exception as exc:  # noqa: BLE001 - reported by the test
                self.error = exc
            finally:
                self.done.set()

        threading.Thread(target=run, daemon=True).start()

    def result(self):
        assert self.done.wait(30), "the request was never answered"
        assert self.error is None, self.error
        return self.answer


def healthz(site):
    """``GET /healthz`` of *site*'s worker, on a connection of its own."""
    browser = site.client()
    browser.headers["Connection"] = "close"
    return browser.get(f"{site.gw.url}/healthz", timeout=25)


def held_lock(site) -> sqlite3.Connection:
    """The session store's write lock, held as an operator's ``sqlite3`` shell holds it: end it
    with ``ROLLBACK`` and ``close()``."""
    holder = sqlite3.connect(site.db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    return holder
