"""Assembling a working core from a configuration directory."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from gateway.audit import AuditLog
from gateway.chain import ChainFolder, Gateway
from gateway.config import Config, load_config
from gateway.errors import ConfigError
from gateway.metrics import Metrics
from gateway.passwords import set_hash_concurrency
from gateway.registry import PluginInfo, build_plugin_manager, check_config, discover
from gateway.steplimit import bound_steps

__all__ = ["Runtime", "build_runtime", "default_config_dir", "default_state_dir"]

SYSTEM_CONFIG_DIR = Path("/etc/authgw/conf.d")


def default_config_dir() -> Path:
    """``$AUTHGW_CONFIG``, else ``./conf.d`` when it exists, else ``/etc/authgw/conf.d``."""
    if os.environ.get("AUTHGW_CONFIG"):
        return Path(os.environ["AUTHGW_CONFIG"])
    local = Path("conf.d")
    return local if local.is_dir() else SYSTEM_CONFIG_DIR


def default_state_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "authgw"


def ensure_state_dir(path: Path) -> Path:
    """Create the state directory 0700, and refuse one that another user owns or that group or
    others can write to: they could plant names in it (a link where a key or the PID file is
    written) or read what it keeps."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.stat()
    mode = info.st_mode & 0o777
    if info.st_uid != os.geteuid():
        raise ConfigError(f"state directory {path} belongs to uid {info.st_uid}, not to this user (uid "
                          f"{os.geteuid()}); run authgw as its owner (e.g. sudo -u authgw) or chown it")
    if mode & 0o022:
        raise ConfigError(f"state directory {path} is writable by group or others (mode {mode:o}); chmod 700 it")
    return path


@dataclass
class Runtime:
    config: Config
    gateway: Gateway
    metrics: Metrics
    audit: AuditLog
    state_dir: Path | None = None

    def close(self) -> None:
        """Stop after serving: plugins get ``gateway_shutdown``."""
        self.gateway.shutdown()
        self.audit.close()

    def discard(self) -> None:
        """Drop a runtime that was built only to validate (its plugins never started)."""
        self.gateway.pool.shutdown()
        self.audit.close()


def build_runtime(config_dir: Path, *, state_dir: Path | None = None,
                  discovered: dict[str, PluginInfo] | None = None, metrics: Metrics | None = None,
                  config: Config | None = None, workers: int | None = None, serving: bool = True,
                  paths_from: Path | None = None) -> Runtime:
    """Load *config_dir*, build every enabled plugin and the core around them. A reload passes
    the running *metrics*, so counters go on across configurations. With *config* (one loaded
    before, such as the master's validated configuration) conf.d is not read again; files it
    refers to (users files, keys, ``{file:}`` secrets) are, by the plugins that use them.
    *workers*: the worker processes ``authgw serve`` runs (its ``--workers``), else ``workers:``.
    *serving*: False for commands that do not serve: the audit file is opened only if they
    write a line (:class:`~gateway.audit.AuditLog`). *paths_from*: the real conf.d when *config_dir*
    is a copy of it being checked (:func:`~gateway.config.load_config`)."""
    discovered = discover() if discovered is None else discovered
    config = config or load_config(config_dir, installed=set(discovered), defer=True, paths_from=paths_from)
    check_config(config, discovered)  # every problem of the core and the enabled plugins at once
    state = ensure_state_dir(state_dir or config.core.state_dir or default_state_dir())
    audit = AuditLog(config.core.audit.file, create=serving)
    metrics = metrics or Metrics()
    try:
        pm, plugins = build_plugin_manager(
            config, state_dir=state, discovered=discovered,
            core_plugins=[("core.audit", audit), ("core.metrics", metrics)],
        )
        folder = ChainFolder(pm)  # it names culprits from the plugin manager it is registered in
        pm.register(folder, name="core.chain")
        limits = config.core.limits
        bound_steps(pm, config.core.chain, limits.step_concurrency or max(1, config.core.threads // 2),
                    config.core.deadline)
        set_hash_concurrency(limits.hash_concurrency)
        gateway = Gateway(config.core, pm, plugins, folder, state_dir=state, workers=workers)
    except BaseException:
        audit.close()  # a reload refused here left its audit file open, one more at each (review)
        raise
    return Runtime(config, gateway, metrics, audit, state)
