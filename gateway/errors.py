"""The exceptions of authgw's public API."""

from __future__ import annotations

__all__ = [
    "AuthgwError",
    "BackendUnavailable",
    "ConfigError",
    "PluginLoadError",
]


class AuthgwError(Exception):
    """Base class of every error authgw raises on purpose."""


class BackendUnavailable(AuthgwError):
    """A plugin's backend could not be reached or did not answer in time.

    Plugins may raise it from any hook; in ``gateway_authenticate`` they should rather note
    ``UNAVAILABLE`` on the attempt and return ``None`` so the chain goes on. ``reason`` is a
    stable code such as ``ldap.unreachable``.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class ConfigError(AuthgwError):
    """The configuration is wrong. ``problems`` holds one ``file:line: key.path: message`` each."""

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class PluginLoadError(AuthgwError):
    """An enabled plugin is missing, fails to import, or breaks the plugin contract."""
