"""The connector's answer to the relay's self-test request (plugins/link/client.py), in-process:
the real LinkClient serving frames from a real core, the websocket replaced by a list of the
frames it would send. A self-test that hangs must not hold the link's request slots, which
logins need, nor pile up threads when the operator asks again."""

from __future__ import annotations

import asyncio
import json
import threading
import time

from gateway.checks import CheckResult, SelfTest
from gateway.http.app import FrontDoor
from gateway.plugins.link.client import LinkClient
from gateway.plugins.link.settings import LinkSettings
from gateway.plugins.linkproto import Message
from gateway.registry import hookimpl
from support.chainhelp import build

RELEASE = threading.Event()
STARTED: list[float] = []


class HangingTests:
    """A plugin whose self-test hangs until released (a backend without a connect timeout)."""

    def __init__(self, settings, context) -> None:
        pass

    @hookimpl
    def gateway_selftests(self):
        def run() -> CheckResult:
            STARTED.append(time.monotonic())
            RELEASE.wait(30)
            return CheckResult.ok("answered at last")
        return [SelfTest("hanging.backend", run)]


class Frames:
    closed = False

    def __init__(self) -> None:
        self.sent: list[dict] = []

    async def send_str(self, text: str) -> None:
        self.sent.append(json.loads(text))

    def by_id(self, message_id: str) -> dict | None:
        return next((f for f in self.sent if f.get("id") == message_id), None)


def test_a_hanging_self_test_holds_neither_the_link_nor_more_than_one_thread(tmp_path):
    runtime = build(tmp_path, {"chain": ["a"], "plugins": ["hanging"]}, {"a": {"action": "abstain"}},
                    targets={"hanging": "test_link_selftest:HangingTests"})
    client = LinkClient(LinkSettings(max_concurrent=4, max_clock_skew=0), tmp_path, FrontDoor(runtime.gateway), runtime.gateway.pm.hook,
                        "test")
    ws = Frames()
    RELEASE.clear()
    STARTED.clear()

    async def main():
        ask = lambda i, kind, seconds: asyncio.ensure_future(  # noqa: E731
            client._answer(ws, None, Message(f"{kind}{i}", kind, {}, time.time() + seconds)))
        runs = [ask(i, "selftest", 2) for i in range(6)]  # the operator presses "run" again and again
        await asyncio.sleep(0.3)
        ping = ask(0, "ping", 5)
        await asyncio.wait_for(ping, 2)  # answered at once: the slots are not held
        assert "answer" in json.dumps(ws.by_id("ping0"))
        refused = [ws.by_id(f"selftest{i}") for i in range(1, 6)]
        assert all(f is not None and f["type"] == "error" and f["body"]["code"] == "unavailable" for f in refused), refused
        await asyncio.wait(runs, timeout=5)
        first = ws.by_id("selftest0")  # answered when its deadline passed, not held for the test
        assert first["type"] == "error" and first["body"]["code"] == "unavailable", first
        assert len(STARTED) == 1  # one run, one thread, however often it was asked
        RELEASE.set()
        await asyncio.sleep(0.5)  # the hung test returns; its run ends
        again = ask(9, "selftest", 5)
        await asyncio.wait_for(again, 5)
        results = ws.by_id("selftest9")["body"]["results"]
        assert [(r["name"], r["status"]) for r in results] == [("hanging.backend", "pass")]

    try:
        asyncio.run(main())
    finally:
        RELEASE.set()
        client.close()
        runtime.discard()
