"""Review of stop 46's stores (the throttle's Redis clock, the login door's shared budgets),
against real components: a two-worker ``authgw serve`` whose wall clock is stepped by the small
``LD_PRELOAD`` library of :mod:`test_throttle_left46`, in front of a real slapd, with its budgets in
a real SQLite file.

- The door's shared buckets (``plugins/login/sessions.py``, SQLite) were dated by the wall
  clock: a step of the host's clock forward handed every address a full budget at once (the
  per-worker buckets they replaced were dated by the monotonic clock), and one back left every
  spent budget empty for the step's length. They pass with the boot clock now, as the
  throttle's SQLite store does.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import time

import pytest

from support.login import LoginSite
from support.pki import CA
from support.slapd import Slapd
from test_throttle_left46 import _STEP_SOURCE

REDIRECT = "https://app.example.test/cb"
CLIENT = {"client_id": "app", "redirect_uri": REDIRECT, "response_type": "code",
          "scope": "openid", "code_challenge": "a" * 43, "code_challenge_method": "S256"}
BUDGET = 30  # sessions.requests_per_client: at once, then as many a minute
FLOOD = 200


@pytest.fixture(scope="module")
def step_library(tmp_path_factory):
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build the clock-stepping library")
    directory = tmp_path_factory.mktemp("clockstep46")
    (directory / "step.c").write_text(_STEP_SOURCE)
    subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-o", str(directory / "step.so"), str(directory / "step.c")],
                   check=True, timeout=120, capture_output=True)
    return directory / "step.so"


class StepFile:
    def __init__(self, path) -> None:
        self.path, self.stepped = path, 0.0
        path.write_bytes(struct.pack("<q", 0))

    def step(self, seconds: float) -> None:
        self.stepped += seconds
        with open(self.path, "r+b") as f:
            f.write(struct.pack("<q", int(self.stepped * 1000)))


@pytest.fixture(scope="module")
def stepped_door(tmp_path_factory, step_library):
    base = tmp_path_factory.mktemp("stop46stores")
    slapd = Slapd(base / "slapd").start()
    clock = StepFile(base / "clock-step")
    try:
        slapd.add_user("alice", "Alice-pw-1", mail="alice@example.com")
        site = LoginSite(base / "idp", slapd, CA.create(), gateway={"trusted_proxies": ["127.0.0.1/32"]},
                         login={"oidc": {"clients": [{"client_id": "app", "redirect_uris": [REDIRECT],
                                                      "client_secret": {"env": "APP_SECRET"}}]},
                                "sessions": {"requests_per_client": BUDGET}},
                         env={"APP_SECRET": "s3cret-s3cret-s3cret", "LD_PRELOAD": str(step_library),
                              "CLOCK_STEP_FILE": str(clock.path)})
        site.gw = site.start(workers=2)
        site.clock = clock
        try:
            yield site
        finally:
            site.stop()
    finally:
        slapd.stop()


def park(site, address: str, n: int) -> str:
    """One authorization request from *address*: ``"parked"`` or ``"refused"``."""
    browser = site.client()
    browser.headers["Connection"] = "close"
    answer = browser.get(f"{site.gw.url}/oidc/authorize", params={**CLIENT, "state": str(n)},
                         headers={"X-Forwarded-For": address}, allow_redirects=False, timeout=15)
    if answer.headers.get("Location", "").startswith("/login?req="):
        return "parked"
    assert answer.headers.get("X-Refused-Reason") == "login.too_many_requests", (answer.status_code, answer.headers)
    return "refused"


def spend_all(site, address: str) -> int:
    for n in range(FLOOD):
        if park(site, address, n) == "refused":
            return n
    pytest.fail("never refused")


def test_a_step_of_the_gateway_s_clock_forward_refills_no_shared_budget(stepped_door):
    address = "203.0.113.40"
    assert spend_all(stepped_door, address) <= BUDGET + 5
    stepped_door.clock.step(3600)  # NTP steps the host's clock an hour forward
    try:
        outcomes = [park(stepped_door, address, 1000 + n) for n in range(5)]
    finally:
        stepped_door.clock.step(-3600)
    assert outcomes.count("parked") <= 1, f"a step of the wall clock refilled the spent budget: {outcomes}"
    assert "Traceback" not in stepped_door.gw.output()


def test_a_step_of_the_gateway_s_clock_back_leaves_no_budget_empty(stepped_door):
    address = "203.0.113.41"
    assert spend_all(stepped_door, address) <= BUDGET + 5
    stepped_door.clock.step(-3600)  # an hour back
    try:
        time.sleep(60 / BUDGET * 2)  # two tokens' worth of time passes (on every clock but the wall's step)
        outcomes = [park(stepped_door, address, 2000 + n) for n in range(2)]
    finally:
        stepped_door.clock.step(3600)
    assert "parked" in outcomes, f"a step of the wall clock back froze the budget for an hour: {outcomes}"
