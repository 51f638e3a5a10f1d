"""The configuration log: every enabled plugin's self-tests (``gateway_selftests``, the same
tests ``authgw check`` runs, in the same order and with the same skip rule) run against the
saved conf.d in a background thread, each result written to the shared store as it finishes,
so that whichever worker serves the page sees it turn green or red.

Each test is labelled as the seeds' set-up story numbers them (1 TCP, 2 bind, 3 search, 4 the
cloud link) and carries that story's troubleshooting advice next to the plugin's own hint.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Callable

from gateway.checks import CheckStatus, run_selftest
from gateway.plugins.console.store import ConsoleStore

__all__ = ["TROUBLESHOOTING", "describe", "start_run"]

log = logging.getLogger("authgw.plugin.console")

# (name prefix after the plugin, label, what the test does, what to check when it fails)
TROUBLESHOOTING: list[tuple[str, str, str, str]] = [
    ("ldap.tcp", "Test 1: TCP", "Opens a TCP connection to the directory server and port.",
     "Check basic network connectivity and firewall settings that might prevent the connection: "
     "the host name and port in the connection string (LDAPS is usually 636, LDAP 389) and that "
     "the directory is running."),
    ("ldap.tls", "Test 1b: TLS", "Completes the TLS handshake (LDAPS or StartTLS) and verifies the "
     "server certificate.",
     "Give the CA certificate that issued the directory's certificate (path or upload), and use a "
     "host name the certificate names."),
    ("ldap.bind", "Test 2: bind", "Binds to the directory with the service account and password.",
     "Check the connection string, the base DN, the service account (its full DN, or user@domain "
     "for Active Directory) and its password; is the account locked, disabled or expired?"),
    ("ldap.search", "Test 3: search", "Searches the directory for users, checking the privileges "
     "of the service account.",
     "Check the privileges of the service account in the directory: it must be able to search "
     "under the base DN and read the users' attributes (not their password hashes)."),
    ("ldap.login", "Test 3b: login", "Logs in with the configured test account.",
     "Check the test account's name and password, and the user filter."),
    ("link", "Test 4: cloud link", "Connects to the cloud service (the relay) with this connector's "
     "enrolment.",
     "Check network connectivity and firewall settings that might prevent an outgoing HTTPS "
     "connection to the relay, and that the ticket was enrolled."),
    ("kerberos", "Kerberos", "Checks the keytab and the service principal.",
     "See docs/plugins/kerberos.md: the keytab path and permissions, the principal's key version."),
    ("client_cert", "Certificates", "Checks the client-certificate CA bundle and revocation sources.",
     "See docs/plugins/client_cert.md: the CA file, CRL and OCSP reachability."),
]


def describe(name: str) -> tuple[str, str, str]:
    """(label, what the test does, what to check) for a self-test name like ``ldap.bind``."""
    base = name.split("[", 1)[0]
    for prefix, label, what, check in TROUBLESHOOTING:
        if base == prefix or base.startswith(prefix + ".") or base.split(".", 1)[0] == prefix:
            return label, what, check
    return base.split(".", 1)[0], "", ""


def start_run(store: ConsoleStore, config_dir: Path, state_dir: Path,
              after: Callable[[], object] | None = None) -> str:
    """Start the self-tests of *config_dir* in a thread; returns the run id at once. *after* is
    called when the run has finished (the reload: a reload may replace the worker running it)."""
    run = store.new_run()
    thread = threading.Thread(target=_run, args=(store, run, config_dir, state_dir, after),
                              name=f"console-run-{run}", daemon=True)
    thread.start()
    return run


def _run(store: ConsoleStore, run: str, config_dir: Path, state_dir: Path,
         after: Callable[[], object] | None = None) -> None:
    try:
        _tests(store, run, config_dir, state_dir)
    finally:
        if after is not None:
            try:
                after()
            except Exception:
                log.exception("after the self-test run %s", run)


def _tests(store: ConsoleStore, run: str, config_dir: Path, state_dir: Path) -> None:
    from gateway.errors import AuthgwError, ConfigError
    from gateway.runtime import build_runtime

    try:
        runtime = build_runtime(config_dir, state_dir=state_dir, serving=False)
    except ConfigError as exc:
        store.finish(run, "configuration error: " + "; ".join(exc.problems))
        return
    except (AuthgwError, OSError) as exc:
        store.finish(run, f"configuration error: {exc}")
        return
    failed = 0
    try:
        tests = list(runtime.gateway.selftests())
        store.plan(run, [t.name for t in tests])
        try:
            runtime.gateway.startup()
        except Exception as exc:  # the tests below show which backend; say it once here too
            log.warning("console self-tests: start-up failed: %s: %s", exc.__class__.__name__, exc)
        blocked: set[str] = set()
        for seq, test in enumerate(tests):
            plugin = test.name.split(".", 1)[0]
            if plugin in blocked:
                store.record(run, seq, "skip", f"an earlier test of {plugin} failed")
                continue
            store.record(run, seq, "running")
            result = run_selftest(test)
            hint = result.hint if result.status is not CheckStatus.PASS else ""
            store.record(run, seq, result.status.value, result.detail, hint)
            if result.status is CheckStatus.FAIL:
                failed += 1
                if test.prerequisite:
                    blocked.add(plugin)
        summary = (f"{len(tests)} tests, {failed} failed" if tests else "no enabled plugin offers self-tests")
    except Exception as exc:
        log.exception("console self-test run %s failed", run)
        summary = f"the run failed: {exc.__class__.__name__}: {exc}"
    finally:
        try:
            runtime.close()
        except Exception:
            log.exception("closing the self-test runtime")
    store.finish(run, summary)
