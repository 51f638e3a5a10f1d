"""Documentation that is derived from code must match it."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

from gateway import hookspecs

ROOT = Path(__file__).resolve().parent.parent


def test_every_hook_spec_has_a_contract_docstring():
    specs = [(name, f) for name, f in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("gateway_")]
    assert len(specs) >= 10
    for name, func in specs:
        doc = inspect.getdoc(func) or ""
        assert len(doc) > 80, f"{name} needs a docstring that states its contract"
        assert "versionadded" in doc, f"{name} must say when it was added"


def test_every_hook_is_in_the_reference_and_the_reference_is_current():
    text = (ROOT / "docs" / "plugins.md").read_text()
    for name, _ in inspect.getmembers(hookspecs, inspect.isfunction):
        if name.startswith("gateway_"):
            assert f"### `{name}(" in text, f"{name} is missing from docs/plugins.md"
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "gen_docs.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_core_setting_is_in_the_configuration_reference():
    from gateway.settings import GatewaySettings

    text = (ROOT / "docs" / "config-reference.md").read_text()
    for name in GatewaySettings.model_fields:
        assert f"| `{name}` |" in text


def test_the_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "tools/test" in readme and "tools/test" in ci
