"""Chain semantics (DESIGN.md section 3), in-process, with a fresh plugin manager per test."""

from __future__ import annotations

import json
import logging
import time

import pytest

from gateway.checks import CheckStatus
from gateway.errors import PluginLoadError
from gateway.model import Decision, Outcome
from gateway.registry import hookimpl
from support import testplugins
from support.chainhelp import attempt, build, decide


@pytest.fixture(autouse=True)
def _clear_calls():
    testplugins.CALLS.clear()
    yield
    testplugins.CALLS.clear()


def steps_called() -> list[str]:
    return [name for name, hook in testplugins.CALLS if hook == "gateway_authenticate"]


def test_chain_order_follows_config_not_installation(tmp_path):
    # Installed (discovered) in the order a, b, c; configured as c, a, b.
    runtime = build(tmp_path, {"chain": ["c", "a", "b"]})
    decide(runtime)
    assert steps_called() == ["c", "a", "b"]

    testplugins.CALLS.clear()
    runtime = build(tmp_path, {"chain": ["b", "c", "a"]})
    decide(runtime)
    assert steps_called() == ["b", "c", "a"]


@pytest.mark.parametrize("action, outcome, reason", [
    ("invalid", Outcome.INVALID_CREDENTIALS, "first.invalid"),
    ("account_state", Outcome.ACCOUNT_STATE, "first.locked"),
    ("success", Outcome.SUCCESS, ""),
])
def test_a_decision_stops_the_chain(tmp_path, action, outcome, reason):
    runtime = build(tmp_path, {"chain": ["first", "second"]},
                    {"first": {"action": action}, "second": {"action": "success"}})
    decision = decide(runtime)
    assert (decision.outcome, decision.reason, decision.step) == (outcome, reason, "first")
    assert steps_called() == ["first"]
    if outcome is Outcome.SUCCESS:
        assert decision.identity.username == "alice" and decision.identity.method == "first"


@pytest.mark.parametrize("action", ["abstain", "not_found", "unavailable"])
def test_passing_steps_let_the_next_one_decide(tmp_path, action):
    runtime = build(tmp_path, {"chain": ["first", "second"]},
                    {"first": {"action": action}, "second": {"action": "success"}})
    decision = decide(runtime)
    assert decision.outcome is Outcome.SUCCESS and decision.step == "second"
    assert steps_called() == ["first", "second"]


@pytest.mark.parametrize("actions, outcome, step, reason", [
    (["abstain", "abstain"], Outcome.NOT_APPLICABLE, "", "no_applicable_credentials"),
    (["not_found", "abstain"], Outcome.USER_NOT_FOUND, "a", "a.user_not_found"),
    (["abstain", "not_found"], Outcome.USER_NOT_FOUND, "b", "b.user_not_found"),
    (["unavailable", "abstain"], Outcome.UNAVAILABLE, "a", "a.unreachable"),
    # UNAVAILABLE wins over USER_NOT_FOUND whatever their order: a user missing from one
    # directory may exist in the one we could not ask.
    (["not_found", "unavailable"], Outcome.UNAVAILABLE, "b", "b.unreachable"),
    (["unavailable", "not_found"], Outcome.UNAVAILABLE, "a", "a.unreachable"),
])
def test_notes_fold_when_no_step_decides(tmp_path, actions, outcome, step, reason):
    runtime = build(tmp_path, {"chain": ["a", "b"]}, {"a": {"action": actions[0]}, "b": {"action": actions[1]}})
    decision = decide(runtime)
    assert (decision.outcome, decision.step, decision.reason) == (outcome, step, reason)


def test_a_raising_plugin_is_a_fail_closed_deny_naming_it(tmp_path, caplog):
    runtime = build(tmp_path, {"chain": ["ok", "broken", "after"]},
                    {"broken": {"action": "raise"}, "after": {"action": "success"}})
    with caplog.at_level(logging.ERROR, logger="authgw.chain"):
        decision = decide(runtime)
    assert (decision.outcome, decision.reason, decision.step) == (Outcome.ERROR, "internal_error", "broken")
    assert decision.identity is None
    assert steps_called() == ["ok", "broken"], "no later step may turn a crash into a success"
    assert any("'broken'" in r.getMessage() and "fail closed" in r.getMessage() for r in caplog.records)
    # The next attempt still works (the plugin manager is intact).
    assert decide(runtime).outcome is Outcome.ERROR


def test_a_step_returning_garbage_is_denied(tmp_path):
    runtime = build(tmp_path, {"chain": ["odd", "after"]}, {"odd": {"action": "not_a_decision"},
                                                            "after": {"action": "success"}})
    decision = decide(runtime)
    assert decision.outcome is Outcome.ERROR and decision.reason == "internal_error"


def test_a_step_that_overruns_the_deadline_does_not_hold_the_attempt(tmp_path):
    runtime = build(tmp_path, {"chain": ["slow"], "deadline": 0.3}, {"slow": {"action": "sleep", "sleep": 3}})
    decision = decide(runtime, attempt(deadline=0.3))
    assert (decision.outcome, decision.reason) == (Outcome.UNAVAILABLE, "deadline_exceeded")
    # The step still sleeps on its thread; let it finish here rather than record its late calls
    # into the next test's list.
    give_up = time.monotonic() + 10
    while ("slow", "gateway_auth_finished") not in testplugins.CALLS and time.monotonic() < give_up:
        time.sleep(0.05)


def test_an_answer_after_the_deadline_is_not_audited_as_a_second_decision(tmp_path, caplog):
    # The client got deadline_exceeded; the chain thread goes on and `after` says yes a second
    # later. Before, that late success was audited and counted too, under the same request id.
    # The deadline leaves a chain thread time to take the attempt: work a thread takes after
    # its deadline is dropped unrun (gateway/pool.py), and then no late answer ever comes. With
    # 0.3 s, a loaded machine (two suites side by side) took longer once to start the pool's
    # first thread.
    audit = tmp_path / "audit.log"
    runtime = build(tmp_path, {"chain": ["slow", "after"], "deadline": 2, "audit": {"file": str(audit)}},
                    {"slow": {"action": "sleep", "sleep": 3}, "after": {"action": "success"}})
    with caplog.at_level(logging.INFO, logger="authgw"):
        decision = decide(runtime, attempt(deadline=2))
        assert (decision.outcome, decision.reason) == (Outcome.UNAVAILABLE, "deadline_exceeded")
        audit_log = runtime.gateway.pm.get_plugin("core.audit")
        late = "success (after) came after the attempt was answered unavailable (deadline_exceeded)"
        give_up = time.monotonic() + 10
        # until the late answer is either refused (logged) or told (a second audit line)
        while not any(late in r.getMessage() for r in caplog.records):
            audit_log.flush()
            if len(audit.read_text().splitlines()) > 1:
                break
            assert time.monotonic() < give_up, "the late answer never came"
            time.sleep(0.05)
    runtime.gateway.shutdown()
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [(line["outcome"], line["reason"]) for line in lines] == [("unavailable", "deadline_exceeded")]
    assert any(late in r.getMessage() for r in caplog.records)


def test_the_exact_order_of_hook_calls_for_one_attempt(tmp_path):
    runtime = build(tmp_path, {"chain": ["a", "b"], "plugins": ["wrap"]},
                    {"a": {"action": "not_found"}, "b": {"action": "invalid"}},
                    targets={"wrap": "support.testplugins:Wrapper"})
    decide(runtime)
    # Only this attempt's plugins: a thread left over from an earlier test must not count.
    assert [call for call in testplugins.CALLS if call[0] in ("a", "b", "wrap")] == [
        ("a", "gateway_precheck"),
        ("b", "gateway_precheck"),
        ("wrap", "gateway_authenticate:before"),
        ("a", "gateway_authenticate"),
        ("b", "gateway_authenticate"),
        ("wrap", "gateway_authenticate:after:invalid_credentials"),
        ("a", "gateway_auth_finished"),
        ("b", "gateway_auth_finished"),
    ]


def test_a_raising_auth_finished_keeps_no_other_plugin_from_being_told(tmp_path, caplog):
    # Called by pluggy before the core's audit and metrics and before "terse": through pluggy,
    # its exception ended the call, and those were never told (this test, before the fix).
    audit = tmp_path / "audit.log"
    runtime = build(tmp_path, {"chain": ["a", "b"], "plugins": ["broken", "terse"], "audit": {"file": str(audit)}},
                    {"a": {"action": "abstain"}, "b": {"action": "success"}},
                    targets={"broken": "support.testplugins:BrokenNotify", "terse": "support.testplugins:DecisionOnly"})
    with caplog.at_level(logging.ERROR, logger="authgw"):
        decisions = [decide(runtime) for _ in range(3)]
        runtime.gateway.shutdown()  # its gateway_shutdown raises too: the others still shut down
    assert ("broken", "gateway_shutdown") in testplugins.CALLS and ("terse", "gateway_shutdown") in testplugins.CALLS
    assert any("the gateway_shutdown of plugin 'broken' raised" in r.getMessage() for r in caplog.records)
    assert all(d.outcome is Outcome.SUCCESS for d in decisions)  # the decision stands
    told = [call for call in testplugins.CALLS if call[1].startswith("gateway_auth_finished")]
    assert told.count(("broken", "gateway_auth_finished")) == 3
    assert told.count(("a", "gateway_auth_finished")) == told.count(("b", "gateway_auth_finished")) == 3
    assert told.count(("terse", "gateway_auth_finished:success")) == 3  # called with the one argument it takes
    assert len(audit.read_text().splitlines()) == 3  # every attempt audited
    failures = [r for r in caplog.records if "gateway_auth_finished of plugin 'broken' raised" in r.getMessage()]
    assert len(failures) == 3 and all(r.exc_info for r in failures)


def test_a_wrapper_sees_the_folded_decision(tmp_path):
    runtime = build(tmp_path, {"chain": ["a"], "plugins": ["wrap"]}, {"a": {"action": "unavailable"}},
                    targets={"wrap": "support.testplugins:Wrapper"})
    assert decide(runtime).outcome is Outcome.UNAVAILABLE
    assert ("wrap", "gateway_authenticate:after:unavailable") in testplugins.CALLS


def test_challenges_are_collected_in_chain_order_without_duplicates(tmp_path):
    runtime = build(tmp_path, {"chain": ["k", "p", "q"]},
                    {"k": {"challenge": "Negotiate"}, "p": {"challenge": 'Basic realm="x"'},
                     "q": {"challenge": 'Basic realm="x"'}})
    assert runtime.gateway.challenges(attempt()) == ["Negotiate", 'Basic realm="x"']


@pytest.mark.parametrize("target, message", [
    ("support.testplugins:Misspelled", "'gateway_authenticat', which is not an authgw hook; did you mean 'gateway_authenticate'?"),
    ("support.testplugins:Unmarked", "without @gateway.hookimpl"),
    ("support.testplugins:TryFirst", "tryfirst/trylast are not allowed on gateway_authenticate"),
    ("support.testplugins:NoAuthenticate", "does not implement gateway_authenticate"),
    ("support.testplugins:Wrapper", "is a chain step, but its gateway_authenticate is a wrapper"),
])
def test_plugins_breaking_the_contract_stop_start_up(tmp_path, target, message):
    with pytest.raises(PluginLoadError) as excinfo:
        build(tmp_path, {"chain": ["bad"]}, targets={"bad": target})
    assert message in str(excinfo.value)
    assert "plugin 'bad'" in str(excinfo.value)


def test_a_plugin_outside_the_chain_decides_no_login(tmp_path, caplog):
    """A plain gateway_authenticate on a plugin under `plugins:` was called after every step,
    a step the operator never listed: one that allows let anyone in while the log said
    `chain: a` (review of plugin loading). It is taken out of the hook, its other hooks kept
    (a directory listed there for lookups only); a wrapper there still wraps the chain."""
    caplog.set_level("INFO", logger="authgw.plugins")
    runtime = build(tmp_path, {"chain": ["a"], "plugins": ["yes"]},
                    {"a": {"action": "not_found"}, "yes": {"action": "success"}})
    assert decide(runtime).outcome is Outcome.USER_NOT_FOUND
    assert steps_called() == ["a"]
    assert [i for i in runtime.gateway.pm.hook.gateway_precheck.get_hookimpls() if i.plugin_name == "yes"]  # kept
    assert "plugin yes is under `plugins:`, not `chain:`: it decides no login" in caplog.text
    testplugins.CALLS.clear()
    runtime = build(tmp_path, {"chain": ["a"], "plugins": ["w"]}, {"a": {"action": "invalid"}},
                    targets={"w": "support.testplugins:Wrapper"})
    assert decide(runtime).outcome is Outcome.INVALID_CREDENTIALS
    assert ("w", "gateway_authenticate:after:invalid_credentials") in testplugins.CALLS


def test_throttling_refuses_before_the_chain_after_repeated_failures(tmp_path):
    runtime = build(tmp_path, {"chain": ["a"], "throttle": {"user_failures": 3, "client_failures": 100}},
                    {"a": {"action": "invalid"}})
    outcomes = [decide(runtime).outcome for _ in range(4)]
    assert outcomes == [Outcome.INVALID_CREDENTIALS] * 3 + [Outcome.THROTTLED]
    assert steps_called() == ["a", "a", "a"], "a throttled attempt never reaches the directory"
    # Another user is not affected (the per-client limit is far higher).
    other = attempt(username="bob")
    assert decide(runtime, other).outcome is Outcome.INVALID_CREDENTIALS


def test_a_step_that_crashes_on_a_password_counts_as_a_guess(tmp_path):
    """A crash is answered as a refusal (401): one that happened only after a right password (a
    bug in a later lookup) would be a free oracle if it were not counted (review of the front
    door). It is throttled as a wrong password is."""
    runtime = build(tmp_path, {"chain": ["a"], "throttle": {"user_failures": 3, "client_failures": 100}},
                    {"a": {"action": "raise"}})
    outcomes = [decide(runtime).outcome for _ in range(4)]
    assert outcomes == [Outcome.ERROR] * 3 + [Outcome.THROTTLED]
    assert steps_called() == ["a", "a", "a"]


def test_a_step_that_crashes_on_a_password_is_answered_as_slowly_as_a_refusal(tmp_path):
    """The floor of failure timing holds for a crash too (the delay is a sleep: a lower bound)."""
    runtime = build(tmp_path, {"chain": ["a"], "throttle": {"enabled": False}, "failure_timing": {"floor": 0.3}},
                    {"a": {"action": "raise"}})
    started = time.monotonic()
    assert decide(runtime).outcome is Outcome.ERROR
    assert time.monotonic() - started >= 0.3


# -- a plugin that breaks its contract in a hook the core calls plugin by plugin ----------------


def test_a_wrapper_on_a_hook_called_plugin_by_plugin_is_refused_at_load(tmp_path):
    with pytest.raises(PluginLoadError, match="gateway_auth_finished may not be a wrapper"):
        build(tmp_path, {"chain": ["a"], "plugins": ["wraps"]}, targets={"wraps": "support.testplugins:WrapsNotify"})


@pytest.mark.parametrize("chain_on", ["pool", "loop"])
def test_system_exit_in_auth_finished_is_logged_and_the_decision_stands(tmp_path, caplog, chain_on):
    audit = tmp_path / "audit.log"
    runtime = build(tmp_path, {"chain": ["a"], "plugins": ["exits"], "audit": {"file": str(audit)}},
                    {"a": {"action": "success"}}, targets={"exits": "support.testplugins:ExitNotify"})
    if chain_on == "loop":  # as the ldap plugin's logins: the whole chain in a greenlet on the loop
        runtime.gateway.live_on_loop = lambda: True
    with caplog.at_level(logging.ERROR, logger="authgw"):
        decision = decide(runtime)
    runtime.gateway.shutdown()
    assert decision.outcome is Outcome.SUCCESS
    assert len(audit.read_text().splitlines()) == 1
    assert any("gateway_auth_finished of plugin 'exits' raised" in r.getMessage() for r in caplog.records)


def test_a_raising_property_of_another_plugin_does_not_hide_which_step_raised(tmp_path):
    runtime = build(tmp_path, {"chain": ["a"], "plugins": ["status"]}, {"a": {"action": "raise"}},
                    targets={"status": "support.testplugins:RaisingProperty"})
    testplugins.RaisingProperty.broken = True
    try:
        decision = decide(runtime)
    finally:
        testplugins.RaisingProperty.broken = False
    assert (decision.outcome, decision.step, decision.reason) == (Outcome.ERROR, "a", "internal_error")


@pytest.mark.parametrize("action", ["raise", "bytes", "crlf"])
def test_a_bad_challenge_loses_only_its_own_offer(tmp_path, caplog, action):
    runtime = build(tmp_path, {"chain": ["a"], "plugins": ["offers"]},
                    {"a": {"action": "invalid", "challenge": 'Basic realm="test"'}, "offers": {"action": action}},
                    targets={"offers": "support.testplugins:BadOffers"})
    with caplog.at_level(logging.ERROR, logger="authgw"):
        assert runtime.gateway.challenges(attempt()) == ['Basic realm="test"']
    assert any("'offers'" in r.getMessage() for r in caplog.records)


def test_a_readiness_answer_that_is_not_component_states_is_a_not_ready_component(tmp_path):
    runtime = build(tmp_path, {"chain": ["a"], "plugins": ["offers"]}, {"offers": {"action": "strings"}},
                    targets={"offers": "support.testplugins:BadOffers"})
    health = runtime.gateway.health()
    (state,) = [c for c in health.components if c.name == "offers"]
    assert not state.ready and "raised TypeError" in state.detail


def test_a_raising_gateway_selftests_is_one_failed_test_and_the_others_still_run(tmp_path):
    runtime = build(tmp_path, {"chain": ["a"], "plugins": ["offers", "cache"]}, {"offers": {"action": "abstain"}},
                    targets={"offers": "support.testplugins:BadOffers", "cache": "gateway.plugins.cache:CachePlugin"})
    tests = {t.name: t for t in runtime.gateway.selftests()}
    assert "offers.selftests" in tests and any(name.startswith("cache.") for name in tests)
    result = tests["offers.selftests"].run()
    assert result.status is CheckStatus.FAIL and "boom from gateway_selftests" in result.detail


def test_a_raising_gateway_commands_loses_only_its_own_commands(tmp_path, capsys):
    from gateway.cli import _plugin_commands

    runtime = build(tmp_path, {"chain": ["a"], "plugins": ["offers", "cache"]}, {"offers": {"action": "abstain"}},
                    targets={"offers": "support.testplugins:BadOffers", "cache": "gateway.plugins.cache:CachePlugin"})
    names = [command.name for batch in _plugin_commands(runtime.gateway.pm) for command in batch]
    assert "cache" in names
    assert "plugin 'offers' could not list its commands" in capsys.readouterr().err


class _Prechecks:
    """gateway_precheck implementations registered by hand: an answer, a crash, a wrapper."""

    def __init__(self, name: str, answer=None, crash: bool = False) -> None:
        self.name, self.answer, self.crash = name, answer, crash

    @hookimpl
    def gateway_precheck(self, attempt):
        testplugins.CALLS.append((self.name, "gateway_precheck"))
        if self.crash:
            raise RuntimeError("a precheck that breaks")
        return self.answer


class _PrecheckWrapper:
    @hookimpl(wrapper=True)
    def gateway_precheck(self, attempt):
        testplugins.CALLS.append(("wrapper", "gateway_precheck:before"))
        answer = yield
        testplugins.CALLS.append(("wrapper", "gateway_precheck:after"))
        return answer


def prechecks_called() -> list[str]:
    return [name for name, hook in testplugins.CALLS if hook == "gateway_precheck"]


def test_prechecks_are_called_as_pluggy_calls_them_and_registrations_are_seen(tmp_path):
    # The core calls gateway_precheck's implementations itself (no wrapper, no monitor): last
    # registered first, the first answer wins, and a plugin (un)registered later is seen at once.
    runtime = build(tmp_path, {"chain": ["a", "b"]}, {"a": {"action": "invalid"}})
    gateway, pm = runtime.gateway, runtime.gateway.pm
    assert decide(runtime).reason == "a.invalid" and prechecks_called() == ["a", "b"]

    refused = Decision.deny(Outcome.INVALID_CREDENTIALS, step="late", reason="late.refused")
    pm.register(_Prechecks("quiet"), name="quiet")
    pm.register(_Prechecks("late", refused), name="late")
    for ask in (lambda: gateway.precheck(attempt()), lambda: pm.hook.gateway_precheck(attempt=attempt())):
        testplugins.CALLS.clear()
        assert ask() is refused
        assert prechecks_called() == ["late"]  # the first answer ends the hook, as pluggy's firstresult
    testplugins.CALLS.clear()
    decision = decide(runtime)
    assert (decision.reason, decision.step) == ("late.refused", "late")
    assert steps_called() == []  # a deny answer stands for the whole chain

    pm.unregister(name="late")
    testplugins.CALLS.clear()
    assert decide(runtime).reason == "a.invalid"
    assert prechecks_called() == ["quiet", "a", "b"]

    pm.register(_Prechecks("crash", crash=True), name="crash")
    decision = decide(runtime)
    assert (decision.outcome, decision.step, decision.reason) == (Outcome.ERROR, "crash", "internal_error")
    runtime.gateway.shutdown()


def test_a_precheck_wrapper_or_a_monitor_gets_pluggys_own_call(tmp_path):
    runtime = build(tmp_path, {"chain": ["a"]}, {"a": {"action": "invalid"}})
    gateway, pm = runtime.gateway, runtime.gateway.pm
    pm.register(_PrecheckWrapper(), name="wrapper")
    decide(runtime)
    assert testplugins.CALLS[:3] == [("wrapper", "gateway_precheck:before"), ("a", "gateway_precheck"),
                                     ("wrapper", "gateway_precheck:after")]
    pm.unregister(name="wrapper")

    seen: list[str] = []
    undo = pm.add_hookcall_monitoring(lambda name, impls, kwargs: seen.append(name), lambda *args: None)
    decide(runtime)
    assert "gateway_precheck" in seen and "gateway_authenticate" in seen
    undo()
    seen.clear()
    testplugins.CALLS.clear()
    assert decide(runtime).reason == "a.invalid"
    assert seen == [] and prechecks_called() == ["a"]
    runtime.gateway.shutdown()


def test_the_plugin_manager_counts_every_change_to_what_it_calls():
    from gateway import hookspecs
    from gateway.registry import PROJECT, Planned, PluginManager

    pm = PluginManager(PROJECT)
    made: list[int] = []
    planned = Planned(pm, lambda: made.append(len(pm.get_plugins())) or len(made))
    pm.add_hookspecs(hookspecs)
    assert planned.get() == planned.get() == 1  # worked out once while nothing changes
    pm.register(_Prechecks("one"), name="one")
    assert planned.get() == 2 and made[-1] == 1
    undo = pm.add_hookcall_monitoring(lambda *args: None, lambda *args: None)
    assert pm.monitored == 1 and planned.get() == 3
    undo()
    assert pm.monitored == 0 and planned.get() == 4
    pm.set_blocked("one")  # unregisters
    assert planned.get() == 5 and made[-1] == 0
    assert planned.get() == 5


def test_a_username_no_header_can_carry_is_not_signed_in(tmp_path, caplog):
    # A directory (or a principal, a certificate) naming the user with a control character:
    # Remote-User could only go out empty or altered, and some proxies fill an empty one with the
    # client's own (review of this stop's diff). An error, with the step named; a name that is
    # merely not ASCII is signed in as it is.
    for name in ("bad", "good"):
        (tmp_path / name).mkdir()
    bad = build(tmp_path / "bad", {"chain": ["a"]}, {"a": {"action": "success", "success_as": "mal\x7flory"}})
    with caplog.at_level(logging.ERROR, logger="authgw"):
        decision = decide(bad)
    assert (decision.outcome, decision.step, decision.reason) == (Outcome.ERROR, "a", "unrepresentable_username")
    assert "control character" in caplog.text
    for other in ("mal\x85lory", "mal\u2028lory"):  # C1, a line separator: the same
        (tmp_path / other.encode("unicode_escape").decode()).mkdir()
        also = build(tmp_path / other.encode("unicode_escape").decode(), {"chain": ["a"]},
                     {"a": {"action": "success", "success_as": other}})
        assert decide(also).reason == "unrepresentable_username"
    good = build(tmp_path / "good", {"chain": ["a"]}, {"a": {"action": "success", "success_as": "zoë\u200ex"}})
    assert decide(good).identity.username == "zoë\u200ex"
