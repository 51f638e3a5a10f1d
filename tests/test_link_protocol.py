"""The link protocol without sockets (gateway.plugins.linkproto): each check refuses exactly the
frame that breaks it, with its error code."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.plugins import linkproto as proto

NOW = 1_800_000_000.0


def _frame(**changes) -> str:
    data = {"v": 1, "id": "abc", "type": "authenticate", "deadline": NOW + 5, "nonce": "n" * 22, "body": {}}
    data.update(changes)
    return json.dumps({k: v for k, v in data.items() if v is not ...})


def test_a_request_round_trips():
    request_id, text = proto.request("lookup_user", {"username": "alice"}, now=NOW, timeout=3)
    message = proto.decode(text, now=NOW, guard=proto.ReplayGuard())
    assert (message.id, message.type, message.body, message.deadline) == (request_id, "lookup_user",
                                                                          {"username": "alice"}, NOW + 3)
    assert message.is_request
    answer = proto.decode(proto.answer(request_id, {"found": False}), now=NOW)
    assert (answer.type, answer.id, answer.is_request) == ("answer", request_id, False)


@pytest.mark.parametrize("changes, code", [
    ({"deadline": NOW - 0.001}, "expired"),
    ({"deadline": NOW + proto.MAX_AHEAD + 1}, "bad_request"),
    ({"deadline": "soon"}, "bad_request"),
    ({"deadline": True}, "bad_request"),
    ({"deadline": float("nan")}, "bad_request"),
    ({"nonce": "short"}, "bad_request"),
    ({"nonce": ...}, "bad_request"),
    ({"v": 2}, "bad_request"),
    ({"type": "format_disk"}, "unknown_type"),
    ({"body": []}, "bad_request"),
])
def test_each_check_refuses_its_frame(changes, code):
    with pytest.raises(proto.ProtocolError) as refused:
        proto.decode(_frame(**changes), now=NOW, guard=proto.ReplayGuard())
    assert refused.value.code == code
    assert refused.value.request_id in ("abc", None)


@pytest.mark.parametrize("text", ["not json", "[1]", json.dumps({"id": "", "v": 1}), "x" * (proto.MAX_FRAME + 1)])
def test_garbage_is_a_bad_request(text):
    with pytest.raises(proto.ProtocolError) as refused:
        proto.decode(text, now=NOW)
    assert refused.value.code == "bad_request"


def test_a_replayed_nonce_is_refused_even_under_another_id():
    guard = proto.ReplayGuard()
    proto.decode(_frame(), now=NOW, guard=guard)
    with pytest.raises(proto.ProtocolError) as refused:
        proto.decode(_frame(id="other"), now=NOW, guard=guard)
    assert refused.value.code == "replayed"


def test_the_replay_guard_forgets_only_expired_nonces():
    guard = proto.ReplayGuard(max_entries=2)
    assert guard.fresh("a" * 16, NOW + 1, NOW) and guard.fresh("b" * 16, NOW + 100, NOW)
    assert not guard.fresh("c" * 16, NOW + 1, NOW)  # full of live nonces: refuse, do not forget
    assert guard.fresh("c" * 16, NOW + 5, NOW + 2)  # "a" expired and is dropped
    assert not guard.fresh("b" * 16, NOW + 100, NOW + 2)


def test_a_sealed_password_opens_only_with_the_key_and_the_id():
    key = ec.generate_private_key(ec.SECP256R1())
    sealed = proto.seal_password(key.public_key(), "Corr3ct-horse", "id-1")
    assert "Corr3ct" not in sealed
    assert proto.open_password(key, sealed, "id-1") == "Corr3ct-horse"
    for other_key, other_id in ((ec.generate_private_key(ec.SECP256R1()), "id-1"), (key, "id-2")):
        with pytest.raises(proto.ProtocolError) as refused:
            proto.open_password(other_key, sealed, other_id)
        assert refused.value.code == "bad_request"
    with pytest.raises(proto.ProtocolError):
        proto.open_password(key, "!!not base64!!", "id-1")
    assert proto.seal_password(key.public_key(), "same", "id-1") != proto.seal_password(key.public_key(), "same", "id-1")


def test_back_off_grows_is_capped_and_jittered(tmp_path):
    from gateway.plugins.link.client import LinkClient
    from gateway.plugins.link.settings import LinkSettings

    client = LinkClient(LinkSettings(backoff_initial=0.5, backoff_max=30), tmp_path, None, None, "test")
    assert all(0.25 <= client.delay(0) < 0.5 for _ in range(50))
    assert all(2.0 <= client.delay(3) < 4.0 for _ in range(50))
    late = [client.delay(40) for _ in range(200)]  # capped, and spread over half the ceiling
    assert all(15.0 <= d < 30.0 for d in late)
    assert max(late) - min(late) > 10.0
