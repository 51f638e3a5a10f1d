"""Gateways with ``chain: [ldap]`` and an API token, started on demand by a module's tests.

The LDAP account-state tests (AD sub-codes, ppolicy) each start one or more gateways against
their own slapd, with throttling off (they log the same users in many times) and the JSON API
on (its answer carries the reason code that the uniform 401 of ``/auth`` hides).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Iterator

from support.gateway import GatewayProcess, write_conf


def ldap_gateways(base: Path, token: str) -> Iterator[Callable[[dict], GatewayProcess]]:
    """For a module fixture (``yield from``): a function starting a gateway on the given
    ``ldap:`` settings (keyword arguments: core settings); every gateway it started is stopped
    at the end."""
    started: list[GatewayProcess] = []

    def run(ldap: dict, **settings) -> GatewayProcess:
        core = {"chain": ["ldap"], "throttle": {"enabled": False}, "health": {"probe_interval": 3600},
                "api_tokens": [{"name": "tests", "sha256": hashlib.sha256(token.encode()).hexdigest()}], **settings}
        conf = write_conf(base / f"conf{len(started)}", {"gateway.yaml": json.dumps(core),
                                                          "ldap.yaml": "ldap: " + json.dumps(ldap)})
        process = GatewayProcess(conf, base / f"state{len(started)}")
        started.append(process)
        return process.start()

    try:
        yield run
    finally:
        for process in started:
            process.stop()


def api_login(gateway: GatewayProcess, token: str, username: str, password: str) -> tuple[int, dict]:
    """``POST /v1/authenticate``: the status and the JSON answer (with its reason code)."""
    response = gateway.post("/v1/authenticate", json.dumps({"username": username, "password": password}).encode(),
                            {"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    return response.status, response.json()
