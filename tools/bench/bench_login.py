#!/usr/bin/env python3
"""Complete SAML logins per second, next to the raw signing rate of the same key, same run.

Starts a throwaway slapd and ``authgw serve`` with ``plugins: [login]`` (plain HTTP on
loopback, ``secure_cookie: false``) and measures, each bounded by --seconds:

  1. reference: the IdP's own ResponseBuilder signing Responses (Response and Assertion
     signed: two RSA-2048 signatures) with the gateway's key from its state directory, one
     thread: the ceiling a single core puts on signed answers.
  2. complete logins: a fresh client per login sends an AuthnRequest (HTTP-Redirect), gets the
     form, posts the password (LDAP search + bind), receives the signed Response; the session
     is established.
  3. SSO round trip with a session: AuthnRequest in, signed Response out, no form, no LDAP.

Prints logins/s and p50, and the ratios 2/1 and 3/1. Loopback only; stops what it starts.

    python tools/bench/bench_login.py [--seconds 5] [--concurrency 8] [--workers 1]
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import re
import statistics
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path
from urllib.parse import urlencode

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
import requests  # noqa: E402

from support.gateway import GatewayProcess, write_conf  # noqa: E402
from support.slapd import Slapd  # noqa: E402

SP, ACS = "https://sp.bench.test/", "https://sp.bench.test/acs"


def authn_request(idp: str, n: int) -> str:
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    xml = (f'<samlp:AuthnRequest xmlns:samlp="urn:oasis:names:tc:SAML:2.0:protocol" '
           f'xmlns:saml="urn:oasis:names:tc:SAML:2.0:assertion" ID="_b{n}" Version="2.0" IssueInstant="{now}" '
           f'AssertionConsumerServiceURL="{ACS}"><saml:Issuer>{SP}</saml:Issuer></samlp:AuthnRequest>').encode()
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    return f"{idp}/saml/sso?" + urlencode({"SAMLRequest": base64.b64encode(packer.compress(xml) + packer.flush())})


def one_login(url: str, n: int, browser: requests.Session, *, with_form: bool = True) -> float:
    """One AuthnRequest to a signed Response; *with_form*: the client has no session yet."""
    started = time.perf_counter()
    page = browser.get(authn_request(url, n), timeout=30)
    if with_form:
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
        req = re.search(r'name="req" value="([^"]+)"', page.text).group(1)
        page = browser.post(f"{url}/login", data={"csrf": csrf, "req": req, "username": f"user{n % 20}",
                                                  "password": "bench-pw"}, timeout=30)
    if "SAMLResponse" not in page.text:
        raise RuntimeError(f"no SAMLResponse: {page.status_code} {page.text[:200]}")
    return time.perf_counter() - started


def load(seconds: float, concurrency: int, task) -> tuple[float, list[float]]:
    latencies: list[float] = []
    counter = [0]
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def worker(k: int) -> None:
        state = task.setup(k) if hasattr(task, "setup") else None
        while time.perf_counter() < stop_at:
            with lock:
                counter[0] += 1
                n = counter[0]
            spent = task(n, state)
            with lock:
                latencies.append(spent)

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(latencies) / (time.perf_counter() - started), latencies


def signing_rate(state_dir: Path, seconds: float) -> float:
    from gateway import Identity
    from gateway.plugins.login.keys import KeyStore
    from gateway.plugins.login.saml import ResponseBuilder
    from gateway.plugins.login.settings import LoginSettings, SamlServiceProvider

    current, _, _ = KeyStore(state_dir, "bench").ensure()
    settings = LoginSettings(base_url="http://127.0.0.1:1")
    builder = ResponseBuilder("http://127.0.0.1:1/saml/metadata", current, settings)
    sp = SamlServiceProvider(entity_id=SP, acs_urls=[ACS])
    identity = Identity(subject="s", username="user0", method="ldap")
    count, stop_at = 0, time.perf_counter() + seconds
    started = time.perf_counter()
    while time.perf_counter() < stop_at:
        builder.build(sp, ACS, identity, "_r", "_s", dt.datetime.now(dt.timezone.utc))
        count += 1
    return count / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-login-"))
    slapd = Slapd(tmp / "slapd").start()
    gateway = None
    try:
        slapd.add_users([(f"user{i}", "bench-pw") for i in range(20)])
        gateway = GatewayProcess(tmp / "conf.d", tmp / "state", workers=args.workers)
        write_conf(tmp / "conf.d", {
            "gateway.yaml": "chain: [ldap]\nplugins: [login]\nthrottle: {enabled: false}\nlog_level: ERROR\n"
                            "audit: {file: /dev/null}\n",
            "ldap.yaml": "ldap: " + json.dumps(slapd.plugin_settings("plain")),
            "login.yaml": "login: " + json.dumps({"base_url": gateway.url, "sessions": {"secure_cookie": False},
                                                  "saml": {"service_providers": [{"entity_id": SP, "acs_urls": [ACS]}]}}),
        })
        gateway.start()
        raw = signing_rate(tmp / "state", args.seconds)
        print(f"1. raw signing (Response + Assertion), 1 thread  {raw:8.1f} responses/s")
        full_rate, full = load(args.seconds, args.concurrency,
                               lambda n, _: one_login(gateway.url, n, requests.Session()))

        def sso(n, browser):
            return one_login(gateway.url, n, browser, with_form=False)

        def setup(k):  # each client signs in once, then rides on its session
            browser = requests.Session()
            one_login(gateway.url, 10_000 + k, browser)
            return browser

        sso.setup = setup
        sso_rate, sso_lat = load(args.seconds, args.concurrency, sso)
        print(f"2. complete SAML logins (form + LDAP)           {full_rate:8.1f} logins/s   "
              f"p50 {statistics.median(full) * 1000:7.1f} ms   ratio to 1: {full_rate / raw:.2f}")
        print(f"3. SSO round trip with a session                {sso_rate:8.1f} answers/s  "
              f"p50 {statistics.median(sso_lat) * 1000:7.1f} ms   ratio to 1: {sso_rate / raw:.2f}")
        print(f"(workers {args.workers}, concurrency {args.concurrency}, {args.seconds:.0f} s per phase)")
        return 0
    finally:
        if gateway is not None:
            gateway.stop()
        slapd.stop()


if __name__ == "__main__":
    sys.exit(main())
