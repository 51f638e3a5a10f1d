"""authgw: a plugin-based authentication gateway.

This module is the public plugin API; everything else in ``gateway`` is implementation.
A plugin is a class with a ``Settings`` model (deriving from :class:`PluginSettings`), built as
``Plugin(settings, context)`` and registered with pluggy; its hooks are methods marked
:data:`hookimpl`. See docs/plugins.md.
"""

from gateway.chain import loop_safe
from gateway.checks import CheckResult, CheckStatus, Command, ComponentState, Listener, Route, SelfTest
from gateway.errors import AuthgwError, BackendUnavailable, ConfigError, PluginLoadError
from gateway.model import (
    FORWARDED_CERTIFICATE_KEY,
    MUTUAL_AUTH_KEY,
    REFUSED_ACCOUNT_KEY,
    Attempt,
    CertificateCredential,
    Decision,
    Identity,
    NegotiateCredential,
    Note,
    Outcome,
    PasswordCredential,
    SessionCredential,
    UserPage,
)
from gateway.registry import PluginContext, hookimpl
from gateway.settings import ConfigPath, InvalidKey, InvalidKeys, PluginSettings, Secret
from gateway.stash import Stash, StashKey

__version__ = "0.1.0"

__all__ = [
    "FORWARDED_CERTIFICATE_KEY",
    "MUTUAL_AUTH_KEY",
    "REFUSED_ACCOUNT_KEY",
    "Attempt",
    "AuthgwError",
    "BackendUnavailable",
    "CertificateCredential",
    "CheckResult",
    "CheckStatus",
    "Command",
    "ComponentState",
    "ConfigError",
    "ConfigPath",
    "Decision",
    "Identity",
    "InvalidKey",
    "InvalidKeys",
    "Listener",
    "NegotiateCredential",
    "Note",
    "Outcome",
    "PasswordCredential",
    "PluginContext",
    "PluginLoadError",
    "PluginSettings",
    "Route",
    "Secret",
    "SelfTest",
    "SessionCredential",
    "Stash",
    "StashKey",
    "UserPage",
    "hookimpl",
    "loop_safe",
]
