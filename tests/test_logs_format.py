"""The text format of the service log: one message, one line, whoever logged it."""

from __future__ import annotations

import io
import logging

from gateway.logs import MULTILINE, TextFormatter
from gateway.supervisor import explain
from gateway.errors import ConfigError


def _logged(*args, raised: bool = False, **kwargs) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(TextFormatter())
    log = logging.getLogger("authgw.test-format")
    log.addHandler(handler)
    log.propagate = False
    try:
        if not raised:
            log.warning(*args, **kwargs)
        else:
            try:
                raise ValueError("boom")
            except ValueError:
                log.exception(*args, **kwargs)
    finally:
        log.removeHandler(handler)
    return stream.getvalue()


def test_a_value_cannot_start_a_line_of_its_own():
    text = _logged("did not confirm: %s", "https://evil/\r\n2026-12-05 WARNING authgw.audit: FORGED\x1b[31m\u2028x")
    assert text.count("\n") == 1 and text.endswith("\n"), text  # one record, one line
    assert text.rstrip("\n").endswith("did not confirm: https://evil/\\r\\n2026-12-05 WARNING authgw.audit: "
                                       "FORGED\\x1b[31m\\u2028x"), text
    text = _logged("failed for %s", "eve\nFORGED", raised=True)
    assert "failed for eve\\nFORGED\nTraceback (most recent call last):" in text, text  # a traceback keeps its lines
    assert text.rstrip("\n").endswith("ValueError: boom"), text


def test_a_refused_configuration_keeps_one_problem_a_line_each_escaped():
    reason = explain(ConfigError(["gateway.yaml:3: chain: unknown plugin 'x\nFORGED'", "ldap.yaml:1: ldap.url: bad"]))
    lines = _logged("reload refused, the running configuration stays: %s", reason, extra=MULTILINE).splitlines()
    assert lines[1:] == ["  gateway.yaml:3: chain: unknown plugin 'x\\nFORGED'", "  ldap.yaml:1: ldap.url: bad"], lines


def test_a_users_file_refused_for_several_problems_says_each_on_its_line():
    from gateway.logs import problem_lines

    assert problem_lines(ConfigError(["u.yaml:3: users.a: bad\nFORGED"])) == "u.yaml:3: users.a: bad\\nFORGED"
    assert problem_lines(ConfigError(["u.yaml:3: a", "u.yaml:5: b"])) == "\n  u.yaml:3: a\n  u.yaml:5: b"
    assert problem_lines(OSError(2, "No such file")) == "[Errno 2] No such file"
