"""Hot cache hits answered on the event loop, without a chain thread (issue 15).

A precheck answer whose chain has nothing blocking left to run (no step before the answered one,
every wrapper ``loop_safe``) is decided on the event loop; everything else still goes through
the pool. The pool's guarantees hold on the new path: a passed deadline and a client that hung
up are refused as a chain thread refuses them, and a full queue refuses live logins while hits
keep being answered. In-process, over the real core, the cache plugin and test chain steps.
"""

from __future__ import annotations

import asyncio
import threading

from gateway import Decision, Outcome, hookimpl
from gateway.chain import CLIENT_GONE
from support import testplugins
from support.chainhelp import attempt, build, decide

CACHE = "gateway.plugins.cache:CachePlugin"
HOT = {"hot": {"enabled": True, "ttl": 60}}
USER, PASSWORD = "alice-91b2", "correct horse 91b2"


def runtime(tmp_path, chain=("ldap",), plugins=("cache",), targets=None, actions=None, **core):
    tmp_path.mkdir(parents=True, exist_ok=True)
    sections = {name: {"action": (actions or {}).get(name, "success")} for name in chain}
    return build(tmp_path, {"chain": list(chain), "plugins": list(plugins), **core},
                 {**sections, "cache": HOT}, targets={"cache": CACHE, **(targets or {})})


def hit_decision(rt) -> Decision:
    assert decide(rt, attempt(USER, PASSWORD)).from_cache is False  # learnt from the live step
    answer = rt.gateway.precheck(attempt(USER, PASSWORD))
    assert answer is not None and answer.reason == "cache.hot"
    return answer


class ThreadSpy:
    """A ``gateway_auth_finished`` plugin noting the thread each attempt was decided on."""

    def __init__(self) -> None:
        self.threads: dict[str, str] = {}

    @hookimpl
    def gateway_auth_finished(self, attempt, decision) -> None:
        self.threads[attempt.request_id] = threading.current_thread().name


def test_a_hot_hit_is_decided_on_the_event_loop_and_told_to_every_listener(tmp_path):
    testplugins.CALLS.clear()
    rt = runtime(tmp_path)
    spy = ThreadSpy()
    rt.gateway.pm.register(spy, name="spy")
    live, hit = attempt(USER, PASSWORD), attempt(USER, PASSWORD)
    assert decide(rt, live).from_cache is False
    testplugins.CALLS.clear()
    decision = decide(rt, hit)
    assert (decision.outcome, decision.reason, decision.from_cache) == (Outcome.SUCCESS, "cache.hot", True)
    assert spy.threads[live.request_id].startswith("authgw-chain")  # the live login: a chain thread
    assert spy.threads[hit.request_id] == threading.main_thread().name  # the hit: the loop's thread
    assert ("ldap", "gateway_authenticate") not in testplugins.CALLS
    assert ("ldap", "gateway_auth_finished") in testplugins.CALLS


def test_hits_are_answered_while_the_queue_refuses_live_logins(tmp_path):
    rt = runtime(tmp_path, threads=1, limits={"queue": 1})
    hit_decision(rt)
    # the directory now hangs: one live login holds the only thread, one waits in the queue
    ldap = rt.gateway.plugins["ldap"]
    ldap.settings = type(ldap.settings)(action="sleep", sleep=3.0)

    async def scenario():
        holding = asyncio.ensure_future(rt.gateway.authenticate(attempt("bob", "pw-b")))
        await asyncio.sleep(0.2)
        queued = asyncio.ensure_future(rt.gateway.authenticate(attempt("carol", "pw-c")))
        await asyncio.sleep(0.05)
        refused = await rt.gateway.authenticate(attempt("dave", "pw-d"))
        hit = await rt.gateway.authenticate(attempt(USER, PASSWORD))
        thread_still_held = not holding.done()  # the hit did not wait for the only thread
        return refused, hit, thread_still_held, await holding, await queued

    refused, hit, thread_still_held, *_ = asyncio.run(scenario())
    assert (refused.outcome, refused.reason) == (Outcome.UNAVAILABLE, "overloaded")
    assert (hit.outcome, hit.reason) == (Outcome.SUCCESS, "cache.hot")
    assert thread_still_held


def test_a_hit_past_its_deadline_is_refused_as_on_the_pool(tmp_path):
    rt = runtime(tmp_path)
    hit_decision(rt)
    late = attempt(USER, PASSWORD, deadline=-0.01)
    decision = decide(rt, late)
    assert (decision.outcome, decision.reason) == (Outcome.UNAVAILABLE, "deadline_exceeded")


def test_a_hit_whose_client_hung_up_is_refused_as_on_the_pool(tmp_path):
    rt = runtime(tmp_path)
    hit_decision(rt)
    gone = attempt(USER, PASSWORD)
    gone.stash[CLIENT_GONE] = lambda: True
    decision = decide(rt, gone)
    assert (decision.outcome, decision.reason) == (Outcome.UNAVAILABLE, "client_gone")


def test_an_unmarked_wrapper_or_a_step_before_keeps_hits_on_the_pool(tmp_path):
    testplugins.CALLS.clear()
    plain = runtime(tmp_path / "plain")
    assert plain.gateway.runs_on_loop(hit_decision(plain))
    # a third-party wrapper (not loop_safe) may block: it runs on a chain thread, and sees the hit
    wrapped = runtime(tmp_path / "wrapped", plugins=("cache", "wrap"), targets={"wrap": "support.testplugins:Wrapper"})
    spy = ThreadSpy()
    wrapped.gateway.pm.register(spy, name="spy")
    answer = hit_decision(wrapped)
    assert not wrapped.gateway.runs_on_loop(answer)
    hit = attempt(USER, PASSWORD)
    assert decide(wrapped, hit).reason == "cache.hot"
    assert spy.threads[hit.request_id].startswith("authgw-chain")
    assert ("wrap", "gateway_authenticate:after:success") in testplugins.CALLS
    # a policy step before the directory is still asked, on a chain thread
    policy = runtime(tmp_path / "policy", chain=("policy", "ldap"), actions={"policy": "abstain"})
    answer = hit_decision(policy)
    assert answer.identity.method == "ldap" and not policy.gateway.runs_on_loop(answer)
    testplugins.CALLS.clear()
    assert decide(policy, attempt(USER, PASSWORD)).reason == "cache.hot"
    assert ("policy", "gateway_authenticate") in testplugins.CALLS
    assert ("ldap", "gateway_authenticate") not in testplugins.CALLS


def test_a_wrapper_registered_after_the_first_hit_sends_hits_back_to_the_pool(tmp_path):
    rt = runtime(tmp_path)
    answer = hit_decision(rt)
    assert rt.gateway.runs_on_loop(answer)
    testplugins.CALLS.clear()
    from support.testplugins import Wrapper

    rt.gateway.pm.register(Wrapper(None, type("Ctx", (), {"name": "late"})()), name="late")
    assert not rt.gateway.runs_on_loop(answer)
    assert decide(rt, attempt(USER, PASSWORD)).reason == "cache.hot"
    assert ("late", "gateway_authenticate:after:success") in testplugins.CALLS
