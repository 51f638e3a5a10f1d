"""The connector's answers to ``search_users`` and ``list_groups`` (docs/link-protocol.md).

Decides how a relay's directory question becomes a hook call here and what may go back: the
request is type-checked and bounded (query length, ``limit`` at most
:data:`~gateway.plugins.linkproto.MAX_SEARCH_LIMIT`, cursor length), the directory plugins
answer through ``gateway_search_users`` / ``gateway_list_groups`` on a worker thread within the
request's deadline, and a search answer carries the users' profile and account state but no
claims (a page must fit one frame; a relay wanting a user's claims asks ``lookup_user``).
Reads no settings.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Awaitable, Callable

from gateway.plugins import linkproto as proto

__all__ = ["list_groups", "search_users"]

_MAX_QUERY = 256
_MAX_CURSOR = 1024
_MAX_USERNAME = 256
#: What an answer body may take of a frame (the envelope needs the rest).
_BODY_BUDGET = proto.MAX_FRAME - 4096


def _user_json(identity) -> dict[str, Any]:
    return {"subject": identity.subject, "username": identity.username, "display_name": identity.display_name,
            "email": identity.email, "account_state": identity.account_state,
            "password_state": identity.password_state}


def _fits(body: dict[str, Any], message_id: str) -> dict[str, Any]:
    if len(json.dumps(body, ensure_ascii=False).encode()) > _BODY_BUDGET:
        raise proto.ProtocolError("unavailable", "the answer does not fit one frame; ask a smaller limit", message_id)
    return body


async def _run(fn, time_left: float):
    loop = asyncio.get_running_loop()
    return await asyncio.wait_for(loop.run_in_executor(None, fn), time_left)


Runner = Callable[[Callable[[], Any], float], Awaitable[Any]]


async def search_users(hook, body: dict[str, Any], message_id: str, time_left: float, *,
                       run: Runner = _run) -> dict[str, Any]:
    query, limit, cursor = body.get("query", ""), body.get("limit"), body.get("cursor")
    # Text: a lone surrogate (JSON can spell one) cannot be encoded for the directory, and failed
    # in the pool, costing its connection (review of the connector's side of the link). Other
    # characters, controls included, are matched literally (escaped, RFC 4515).
    if not isinstance(query, str) or len(query) > _MAX_QUERY or not proto.utf8(query):
        raise proto.ProtocolError("bad_request", f"`query` must be UTF-8 text of at most {_MAX_QUERY} characters",
                                  message_id)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= proto.MAX_SEARCH_LIMIT:
        raise proto.ProtocolError("bad_request", f"`limit` must be an integer 1-{proto.MAX_SEARCH_LIMIT}", message_id)
    if cursor is not None and (not isinstance(cursor, str) or not 0 < len(cursor) <= _MAX_CURSOR):
        raise proto.ProtocolError("bad_request", "`cursor` must be null or the `next_cursor` of a previous answer",
                                  message_id)
    try:
        page = await run(lambda: hook.gateway_search_users(query=query, limit=limit, cursor=cursor), time_left)
    except ValueError as exc:  # a cursor the directory plugin did not issue
        raise proto.ProtocolError("bad_request", str(exc)[:200], message_id) from None
    if page is None:
        return {"found": False, "users": [], "next_cursor": None}
    users = [_user_json(u) for u in page.users[:limit]]
    return _fits({"found": True, "users": users, "next_cursor": page.next_cursor}, message_id)


async def list_groups(hook, body: dict[str, Any], message_id: str, time_left: float, *,
                      run: Runner = _run) -> dict[str, Any]:
    username = body.get("username")
    if not isinstance(username, str) or not 0 < len(username) <= _MAX_USERNAME or not username.isprintable():
        raise proto.ProtocolError("bad_request", "`username` must be 1-256 printable characters", message_id)
    groups = await run(lambda: hook.gateway_list_groups(username=username), time_left)
    if groups is None:
        return {"found": False, "groups": []}
    return _fits({"found": True, "groups": sorted(str(g) for g in groups)}, message_id)
