"""The OpenAPI 3.1 document of ``POST /v1/authenticate``, served at ``/v1/openapi.json``.

It decides nothing; it describes what :meth:`gateway.http.app.FrontDoor.api_authenticate`
answers, and ``tests/test_openapi.py`` checks real answers against it. The outcomes come from
:class:`gateway.model.Outcome`, so a new outcome cannot be forgotten here. Reads no settings.
"""

from __future__ import annotations

from typing import Any

from gateway.model import Outcome

__all__ = ["CORE_REASONS", "openapi_document"]

#: Reason codes the core and the front door give (docs/reasons.md); plugins add their own,
#: prefixed with their name (``ldap.*``, ``kerberos.*``, ``cert.*``, ``cache.*``, ``static.*``).
CORE_REASONS = ["no_applicable_credentials", "empty_password", "password_too_long", "malformed_username",
                "malformed_encoding", "credentials_too_long", "internal_error", "deadline_exceeded", "throttled",
                "overloaded", "step_saturated", "client_gone"]


def _error(example: str, detail: str) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"},
                                             "example": {"error": example, "detail": detail}}}}


def openapi_document(version: str) -> dict[str, Any]:
    """The document for authgw *version*."""
    decision = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Decision"}}},
                "headers": {"Cache-Control": {"schema": {"type": "string", "const": "no-store"}}}}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "authgw authentication API",
            "version": version,
            "description": "Check a username and password against the gateway's chain, as a service acting "
                           "for a user. It is a password oracle: every caller needs an API token (`authgw "
                           "api-token NAME`, stored as its SHA-256 under `api_tokens:`), failures are throttled "
                           "per user, and a wrong password and an unknown user get the same answer shape. "
                           "Only the username and password are checked: the request's headers (a client "
                           "certificate a trusted proxy forwards, say) are the calling service's, and no "
                           "plugin reads them. Reason codes: docs/reasons.md and each plugin's page.",
        },
        "paths": {"/v1/authenticate": {"post": {
            "operationId": "authenticate",
            "summary": "Decide one username/password attempt",
            "security": [{"apiToken": []}],
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/Credentials"},
                "example": {"username": "alice", "password": "correct horse battery staple"}}}},
            "responses": {
                "200": {**decision, "description": "The chain decided. `outcome` says how: `success` with an "
                                                   "`identity`, or a denial (`invalid_credentials`, "
                                                   "`user_not_found`, `account_state`, `not_applicable`, "
                                                   "`error`) with `identity: null`. The API is for trusted "
                                                   "services holding a token: it tells an unknown user from a "
                                                   "wrong password (`/auth` does not), so a token holder can "
                                                   "tell which names exist."},
                "400": {**_error("bad_request", "expected an object with `username` and `password`"),
                        "description": "The body is not a JSON object of two strings (each key once) in UTF-8 "
                                       "without a byte order mark (RFC 8259; UTF-16 and UTF-32 are refused), is "
                                       "over 8 KiB, is nested deeper than 32, comes with a `Content-Encoding` "
                                       "(no request body is inflated: send it plain), or did not arrive within "
                                       "`limits.body_timeout`. `detail` is a fixed text, never a byte of the body."},
                "401": {**_error("unauthorized", "a valid API token is required"),
                        "description": "No valid API token (`Authorization: Bearer TOKEN`).",
                        "headers": {"WWW-Authenticate": {"schema": {"type": "string",
                                                                    "const": 'Bearer realm="authgw"'}}}},
                "429": {**decision, "description": "`outcome: throttled`: too many recent failures for this "
                                                   "user (`throttle:`); retry later."},
                "503": {**decision, "description": "`outcome: unavailable`: a backend did not answer (reason "
                                                   "`deadline_exceeded` or a plugin's `*.unreachable`), or "
                                                   "the gateway is overloaded (`overloaded`, with "
                                                   "`Retry-After`)."},
            },
        }}},
        "components": {
            "securitySchemes": {"apiToken": {"type": "http", "scheme": "bearer",
                                             "description": "a token made by `authgw api-token NAME`"}},
            "schemas": {
                "Credentials": {
                    "type": "object", "additionalProperties": False, "required": ["username", "password"],
                    "properties": {"username": {"type": "string", "description": "as the user types it"},
                                   "password": {"type": "string", "description": "never logged or stored"}},
                },
                "Decision": {
                    "type": "object", "additionalProperties": False,
                    "required": ["request_id", "outcome", "reason", "step", "from_cache", "identity"],
                    "properties": {
                        "request_id": {"type": "string", "pattern": "^[0-9a-f]{32}$",
                                       "description": "also in the audit log line of this attempt"},
                        "outcome": {"type": "string", "enum": [o.value for o in Outcome]},
                        "reason": {"type": "string", "examples": CORE_REASONS + ["ldap.invalid_credentials",
                                                                                 "static.invalid_password"],
                                   "description": "a stable machine code; empty for a plain success"},
                        "step": {"type": "string", "description": "the chain step (or `gateway`, `http`) that "
                                                                  "decided"},
                        "from_cache": {"type": "boolean", "description": "the credential cache answered"},
                        "identity": {"oneOf": [{"$ref": "#/components/schemas/Identity"}, {"type": "null"}]},
                    },
                },
                "Identity": {
                    "type": "object", "additionalProperties": False,
                    "required": ["subject", "username", "display_name", "email", "groups", "claims", "method",
                                 "authenticated_at"],
                    "properties": {
                        "subject": {"type": "string", "description": "stable id that survives renames"},
                        "username": {"type": "string", "description": "the directory's name for the user"},
                        "display_name": {"type": "string"},
                        "email": {"type": "string"},
                        "groups": {"type": "array", "items": {"type": "string"}},
                        "claims": {"type": "object", "description": "further attributes a plugin maps"},
                        "method": {"type": "string", "description": "the plugin that proved it"},
                        "authenticated_at": {"type": "number", "description": "Unix time of the proof"},
                    },
                },
                "Error": {
                    "type": "object", "additionalProperties": False, "required": ["error", "detail"],
                    "properties": {"error": {"type": "string", "enum": ["bad_request", "unauthorized"]},
                                   "detail": {"type": "string"}},
                },
            },
        },
    }
