"""Finding, loading and registering plugins.

Discovery is not loading: :func:`discover` only lists the ``authgw.plugins`` entry points;
:func:`build_plugin_manager` imports just the names ``conf.d`` enables and registers them so that
pluggy calls them in the operator's order (it calls the last-registered first).
"""

from __future__ import annotations

import difflib
import importlib.metadata as md
import inspect
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pluggy

from gateway import hookspecs
from gateway.config import Config, KeyPath
from gateway.config import did_you_mean
from gateway.errors import BackendUnavailable, ConfigError, PluginLoadError
from gateway.settings import GatewaySettings, PluginSettings
from gateway.yamlfiles import format_path

__all__ = ["ENTRY_POINT_GROUP", "Planned", "PluginContext", "PluginInfo", "PluginManager", "build_plugin_manager",
           "check_config", "discover", "hookimpl", "plugin_attribute", "plugin_places", "where_in_plugins"]

ENTRY_POINT_GROUP = "authgw.plugins"
PROJECT = "authgw"
hookimpl = pluggy.HookimplMarker(PROJECT)

log = logging.getLogger("authgw.plugins")


class PluginManager(pluggy.PluginManager):
    """pluggy's plugin manager, counting the changes to what it calls.

    ``generation`` goes up after every registration, unregistration, new hook specification and
    hook-call monitor (pluggy's tracing), once the change is made: the core works out how it
    calls its own hooks once per generation (:class:`Planned`) instead of on every attempt.
    ``monitored`` counts the monitors in place: while there is one, every call goes through
    pluggy, so that the monitor sees it.
    """

    def __init__(self, project_name: str) -> None:
        super().__init__(project_name)
        self.generation = 0
        self.monitored = 0

    def register(self, plugin: Any, name: str | None = None) -> str | None:
        try:
            return super().register(plugin, name)
        finally:
            self.generation += 1

    def unregister(self, plugin: Any = None, name: str | None = None) -> Any:
        try:
            return super().unregister(plugin, name)
        finally:
            self.generation += 1

    def add_hookspecs(self, module_or_class: Any) -> None:
        try:
            super().add_hookspecs(module_or_class)
        finally:
            self.generation += 1

    def add_hookcall_monitoring(self, before, after):
        undo = super().add_hookcall_monitoring(before, after)
        self.monitored += 1
        self.generation += 1

        def undo_and_count() -> None:
            undo()
            self.monitored -= 1
            self.generation += 1

        return undo_and_count


class Planned:
    """A value worked out from a plugin manager's registrations by ``make()``, and worked out
    again only when they change (:attr:`PluginManager.generation`); with another plugin manager,
    on every :meth:`get`. Safe across threads: the value and its generation are read and set as
    one tuple, and the generation is read before the registrations are."""

    __slots__ = ("_pm", "_make", "_known")

    def __init__(self, pm: pluggy.PluginManager, make: Callable[[], Any]) -> None:
        self._pm = pm
        self._make = make
        self._known: tuple[int | None, Any] = (None, None)

    def get(self) -> Any:
        generation = getattr(self._pm, "generation", None)
        known = self._known
        if generation is not None and known[0] == generation:
            return known[1]
        value = self._make()
        self._known = (generation, value)
        return value


@dataclass(frozen=True, slots=True)
class PluginInfo:
    """An installed plugin, as its entry point declares it (nothing imported yet)."""

    name: str
    value: str
    distribution: str
    version: str
    entry_point: md.EntryPoint

    def describe(self) -> str:
        return f"plugin {self.name!r} ({self.value}, distribution {self.distribution} {self.version})"


@dataclass(frozen=True, slots=True)
class PluginContext:
    """What the core hands a plugin besides its settings.

    :ivar name: the plugin's name in ``conf.d`` (use it as ``step=`` in decisions and notes).
    :ivar hook: the hook relay, to call other plugins' hooks (``hook.gateway_lookup_user``).
    :ivar state_dir: the gateway's state directory; create what you need below it, 0700/0600.
    """

    name: str
    config_dir: Path
    state_dir: Path
    gateway: GatewaySettings
    hook: pluggy.HookRelay
    log: logging.Logger


class _NoSettings(PluginSettings):
    pass


def discover() -> dict[str, PluginInfo]:
    """List installed plugins by name. Two distributions offering one name is an error."""
    found: dict[str, PluginInfo] = {}
    for ep in md.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist
        info = PluginInfo(ep.name, ep.value, dist.metadata["Name"] if dist else "?", dist.version if dist else "?", ep)
        other = found.get(ep.name)
        if other is not None and (other.distribution, other.value) != (info.distribution, info.value):
            raise PluginLoadError(
                f"two installed distributions provide the plugin {ep.name!r}: "
                f"{other.distribution} ({other.value}) and {info.distribution} ({info.value}); uninstall one"
            )
        found[ep.name] = info
    return dict(sorted(found.items()))


def _extra_for(dist: md.Distribution | None, missing: str | None) -> str | None:
    """Which extra of *dist* would install the missing top-level module, if its requirements say."""
    if dist is None or not missing:
        return None
    wanted = re.sub(r"[-_.]+", "-", missing.split(".")[0]).lower()
    for requirement in dist.requires or ():
        name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
        extra = re.search(r"""extra\s*==\s*["']([^"']+)["']""", requirement)
        if name and extra and re.sub(r"[-_.]+", "-", name.group(1)).lower() == wanted:
            return extra.group(1)
    return None


def load(info: PluginInfo) -> Any:
    """Import one plugin's entry point, explaining failures in operator terms."""
    try:
        return info.entry_point.load()
    except ImportError as exc:
        extra = _extra_for(info.entry_point.dist, exc.name)
        hint = (f"; install the extra: pip install '{info.distribution}[{extra}]'" if extra
                else f"; is {info.distribution} installed completely?")
        raise PluginLoadError(f"{info.describe()} cannot be imported: {exc}{hint}") from exc
    except (Exception, SystemExit) as exc:  # a plugin's import-time bug must not look like ours
        # SystemExit too: a plugin that calls sys.exit() while importing ended `config check`
        # with status 0 and no word, and `authgw --help` with nothing (review of plugin loading).
        raise PluginLoadError(f"{info.describe()} failed while importing: {exc.__class__.__name__}: {exc}") from exc


def plugin_attribute(info: PluginInfo, obj: Any, attr: str) -> Any:
    """``getattr(obj, attr, None)`` of a plugin's class or object, a failure named as the plugin's.

    A ``__getattr__`` (or a metaclass's) that raises for every name, a hostile or broken plugin's,
    ended `config check`, `config schema` and `authgw --help` (for a plugin merely installed) in
    a traceback, and one that calls ``sys.exit()`` a reload in the serving gateway's exit
    (review of plugin loading)."""
    try:
        return getattr(obj, attr, None)
    except (Exception, SystemExit) as exc:
        raise PluginLoadError(f"{info.describe()}: reading its attribute {attr!r} raised "
                              f"{exc.__class__.__name__}: {exc}") from exc


#: The attributes the core reads from a built plugin when it has them (docs/plugins.md), and one no
#: plugin has: each must answer, or be missing (AttributeError), before the plugin is registered;
#: the core reads them later, at start-up and per attempt, without a plugin's name at hand.
_READ_ATTRIBUTES = ("credentials", "loop_capable", "passes_when_unavailable", "__authgw_absent__")
#: What a step's ``credentials`` may name (docs/plugins.md, "What a step checks").
_CREDENTIALS = ("password", "negotiate", "certificate")


def _check_attributes(info: PluginInfo, plugin: Any) -> None:
    """Refuse, naming the plugin, a plugin whose attributes cannot be read, or whose
    ``credentials`` is not a tuple of :data:`_CREDENTIALS` (``credentials = 5`` ended `config
    check` in "TypeError: argument of type 'int' is not iterable")."""
    values = {attr: plugin_attribute(info, plugin, attr) for attr in _READ_ATTRIBUTES}
    credentials = values["credentials"]
    if credentials is not None and not (isinstance(credentials, (tuple, list, set, frozenset))
                                        and all(isinstance(c, str) and c in _CREDENTIALS for c in credentials)):
        raise PluginLoadError(f"{info.describe()}: its `credentials` must be a tuple of "
                              f"{', '.join(repr(c) for c in _CREDENTIALS)}, not {credentials!r:.100}")


def instantiate(name: str, obj: Any, config: Config, context: PluginContext, info: PluginInfo) -> Any:
    """Build the object to register: a plugin class gets its validated settings and the context."""
    section = config.section(name)
    if not inspect.isclass(obj):
        if section:
            raise ConfigError(config.locate((name,), f"{name}: this plugin takes no settings"))
        return obj
    settings_model = plugin_attribute(info, obj, "Settings") or _NoSettings
    if not (inspect.isclass(settings_model) and issubclass(settings_model, PluginSettings)):
        raise PluginLoadError(f"plugin {name!r}: {obj.__name__}.Settings must derive from gateway.PluginSettings")
    settings = config.validate(settings_model, section, (name,))
    try:
        return obj(settings, context)
    except ConfigError as exc:
        # Checks a plugin makes when it is built (a CA file that cannot be read, a filter that
        # does not compile, a timeout above the deadline) name their key: add its file:line.
        raise ConfigError([_locate_problem(config, name, problem) for problem in exc.problems]) from None


_KEY_PREFIX = re.compile(r"^(?P<path>[A-Za-z_][\w-]*(?:\.[A-Za-z_][\w-]*|\[\d+\])*): ")


def _locate_problem(config: Config, name: str, problem: str) -> str:
    """``ldap.ca_file: ...`` -> ``conf.d/ldap.yaml:7: ldap.ca_file: ...`` (a problem that starts
    with a key path of the plugin's section and has no location yet)."""
    match = _KEY_PREFIX.match(problem)
    if not match or not (match.group("path") + ".").startswith(name + "."):
        return config.locate((name,), problem) if not _has_location(problem) else problem
    path: KeyPath = tuple(int(part[1:-1]) if part.startswith("[") else part
                          for part in re.findall(r"\[\d+\]|[^.\[\]]+", match.group("path")))
    return config.locate(path, problem)


def _has_location(problem: str) -> bool:
    return bool(re.match(r"^\S+:\d+: ", problem))


def settings_problems(config: Config, discovered: dict[str, PluginInfo]) -> list[str]:
    """Validate the settings of every enabled, installed plugin without building it: used when
    the core's settings are wrong, so one run still reports the plugins' problems too."""
    problems = []
    for name in config.enabled:
        if name not in discovered:
            continue
        obj = load(discovered[name])
        settings_model = plugin_attribute(discovered[name], obj, "Settings") if inspect.isclass(obj) else None
        if not (inspect.isclass(settings_model) and issubclass(settings_model, PluginSettings)):
            continue
        try:
            config.validate(settings_model, config.section(name), (name,))
        except ConfigError as exc:
            problems.extend(exc.problems)
    return problems


def _not_installed(config: Config, names: list[str], discovered: dict[str, PluginInfo]) -> list[str]:
    """One located problem per enabled plugin that is not installed (at its `chain:` item)."""
    reserved = set(GatewaySettings.model_fields)
    problems = []
    for n in names:
        where: KeyPath = ("chain",)
        for key in ("chain", "plugins"):
            items = config.data.get(key)
            if isinstance(items, list) and n in items:
                where = (key, items.index(n))
                break
        message = (f"{format_path(where)}: plugin {n!r} is enabled in conf.d but not installed"
                   + (" (it is a gateway setting, not a plugin)" if n in reserved else
                      f"; installed plugins: {', '.join(discovered) or 'none'}"
                      + did_you_mean(n, set(discovered))))
        problems.append(config.locate(where, message))
    return problems


#: Hooks the core calls implementation by implementation, so that one that raises silences no
#: other (the audit log, the metrics and the cache are told of every attempt; every plugin shuts
#: down): pluggy's call ends at the first exception. A wrapper has nothing to wrap there, and is
#: refused at load.
ONE_BY_ONE = ("gateway_auth_finished", "gateway_challenges", "gateway_probe", "gateway_readiness",
              "gateway_selftests", "gateway_shutdown", "gateway_commands")


def one_by_one(impls: list) -> list:
    """The plain implementations of a :data:`ONE_BY_ONE` hook, in the order pluggy lists them
    (a wrapper cannot be loaded; one registered by hand is left out rather than called as a
    plain function)."""
    return [impl for impl in impls if not (impl.wrapper or impl.hookwrapper)]


def answerer_revoked(hook: Any, answered_by: str, caller: logging.Logger) -> bool | None:
    """``gateway_answerer_revoked`` as the keepers of successes need it: ``True`` (revoked
    since), ``False`` (it stands; also when no plugin claims the id), ``None`` when it cannot be
    told now: a plugin raised :class:`BackendUnavailable`, or failed (logged to *caller*), and
    nothing is answered on that backend's word."""
    try:
        return hook.gateway_answerer_revoked(answered_by=answered_by) is True
    except BackendUnavailable:
        return None
    except Exception:  # noqa: BLE001 - a plugin's bug: no answer on the word of a backend nobody can vouch for
        caller.exception("gateway_answerer_revoked raised for %r; nothing is answered on its word", answered_by[:100])
        return None


def _check_contract(pm: pluggy.PluginManager, name: str, plugin: Any, info: PluginInfo, is_step: bool) -> None:
    known = {n for n in dir(hookspecs) if n.startswith("gateway_")}
    for attr in dir(plugin):
        if not attr.startswith("gateway_"):
            continue
        marked = pm.parse_hookimpl_opts(plugin, attr) is not None
        if attr not in known:
            close = difflib.get_close_matches(attr, sorted(known), n=1)
            raise PluginLoadError(f"{info.describe()} defines {attr!r}, which is not an authgw hook"
                                  + (f"; did you mean {close[0]!r}?" if close else ""))
        if not marked:
            raise PluginLoadError(f"{info.describe()} defines {attr!r} without @gateway.hookimpl; "
                                  "it would never be called")
    for hook_name, caller in vars(pm.hook).items():
        # An implementation of a hook authgw does not have (a misspelt `specname=`) is never
        # called. pluggy's check_pending named the object, not the plugin, and with
        # `optionalhook=True` let it load without a word: a precheck meant to refuse was never asked.
        if hook_name.startswith("_") or caller.has_spec():
            continue
        if any(i.plugin_name == name for i in caller.get_hookimpls()):
            close = difflib.get_close_matches(hook_name, sorted(known), n=1)
            raise PluginLoadError(f"{info.describe()} implements {hook_name!r}, which is not an authgw hook; "
                                  "it would never be called" + (f"; did you mean {close[0]!r}?" if close else ""))
    for hook in ONE_BY_ONE:
        if any(i.wrapper or i.hookwrapper for i in getattr(pm.hook, hook).get_hookimpls() if i.plugin_name == name):
            raise PluginLoadError(f"{info.describe()}: {hook} may not be a wrapper; the core calls each plugin's "
                                  "on its own, so that one failing never keeps the others from being called")
    impls = [i for i in pm.hook.gateway_authenticate.get_hookimpls() if i.plugin_name == name]
    for impl in impls:
        if impl.tryfirst or impl.trylast:
            raise PluginLoadError(f"{info.describe()}: tryfirst/trylast are not allowed on gateway_authenticate; "
                                  "the order is the operator's `chain:`")
        if is_step and (impl.wrapper or impl.hookwrapper):
            raise PluginLoadError(f"{info.describe()} is a chain step, but its gateway_authenticate is a wrapper; "
                                  "list it under `plugins:` instead")
    if is_step and not impls:
        raise PluginLoadError(f"{info.describe()} is listed in `chain:` but does not implement gateway_authenticate")


def _one_object_one_name(names: list[str], plugins: dict[str, Any], discovered: dict[str, PluginInfo]) -> None:
    """A module or object plugin is one object, whatever entry point names it: enabled under
    two names it ended `config check` and `serve` in pluggy's ValueError and a traceback."""
    first: dict[int, str] = {}
    for name in names:
        other = first.setdefault(id(plugins[name]), name)
        if other != name:
            raise PluginLoadError(f"{discovered[name].describe()} is the same object as plugin {other!r} "
                                  f"({discovered[other].value}); enable it under one name only")


def _decides_no_login(pm: pluggy.PluginManager, name: str, plugin: Any) -> None:
    """A plugin under ``plugins:`` (not a chain step) decides no login: a ``gateway_authenticate``
    of its that is not a wrapper is taken out of the hook (its other hooks, lookups and groups,
    serve). Left in, pluggy called it after every step, a step the operator never put in
    ``chain:``: one that always allows let anyone in while the log said ``chain: static``
    (review of plugin loading). A directory plugin listed there for lookups only (``plugins:
    [ldap]`` beside ``chain: [kerberos]``) keeps working, and now checks no password."""
    caller = pm.hook.gateway_authenticate
    if any(i.plugin_name == name and not (i.wrapper or i.hookwrapper) for i in caller.get_hookimpls()):
        caller._remove_plugin(plugin)  # pluggy's own unregister does this, hook by hook
        log.info("plugin %s is under `plugins:`, not `chain:`: it decides no login (its lookups and groups "
                 "serve); list it in `chain:` where it should check credentials", name)


def check_config(config: Config, discovered: dict[str, PluginInfo]) -> None:
    """Raise every problem found so far at once: the core's (deferred by ``load_config``),
    enabled plugins that are not installed, and, then, every enabled plugin's settings."""
    missing = [n for n in config.enabled if n not in discovered]
    if config.problems or missing:
        raise ConfigError(config.problems + _not_installed(config, missing, discovered)
                          + settings_problems(config, discovered))


def build_plugin_manager(config: Config, *, state_dir: Path, core_plugins: list[tuple[str, Any]] = (),
                         discovered: dict[str, PluginInfo] | None = None) -> tuple[PluginManager, dict[str, Any]]:
    """Load, build and register the enabled plugins.

    :param core_plugins: ``(name, object)`` pairs of the core's own plugins, registered first.
    :return: the plugin manager and the registered plugin objects by name, in chain order.
    """
    discovered = discover() if discovered is None else discovered
    check_config(config, discovered)

    pm = PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    for core_name, core_plugin in core_plugins:
        pm.register(core_plugin, name=core_name)

    classes = {name: load(discovered[name]) for name in config.enabled}
    plugins: dict[str, Any] = {}
    problems: list[str] = []  # every plugin's settings problems, reported together
    for name in config.enabled:
        context = PluginContext(name=name, config_dir=config.directory, state_dir=state_dir,
                                gateway=config.core, hook=pm.hook, log=logging.getLogger(f"authgw.plugin.{name}"))
        try:
            plugins[name] = instantiate(name, classes[name], config, context, discovered[name])
        except ConfigError as exc:
            problems.extend(exc.problems)
        except PluginLoadError:
            raise
        except (Exception, SystemExit) as exc:
            # SystemExit too: from a plugin's constructor it ended `config check` and `serve` with
            # status 0 and no word, and a reload onto it stopped the serving gateway.
            raise PluginLoadError(f"{discovered[name].describe()} failed to start: "
                                  f"{exc.__class__.__name__}: {exc}") from exc
    if problems:
        raise ConfigError(problems)
    for name in config.enabled:
        _check_attributes(discovered[name], plugins[name])
    _one_object_one_name(config.enabled, plugins, discovered)

    # pluggy calls the last-registered implementation first: register in reverse so the first
    # step of `chain:` is asked first, and `plugins:` come after the chain steps.
    for name in reversed(config.enabled):
        try:
            pm.register(plugins[name], name=name)
            _check_contract(pm, name, plugins[name], discovered[name], is_step=name in config.core.chain)
        except pluggy.PluginValidationError as exc:
            raise PluginLoadError(f"{discovered[name].describe()}: {exc}") from exc
        except PluginLoadError:
            raise
        except Exception as exc:  # noqa: BLE001 - reading its attributes raised (a property): name it
            raise PluginLoadError(f"{discovered[name].describe()} cannot be registered: "
                                  f"{exc.__class__.__name__}: {exc}") from exc
        if name not in config.core.chain:
            _decides_no_login(pm, name, plugins[name])
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginLoadError(str(exc)) from exc
    return pm, plugins


# -- which plugin a thread is in --------------------------------------------------------------------

#: The core's own code (this package), for naming where a stack that is in no plugin waits.
_CORE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _place_of(module: Any) -> str | None:
    """Where *module*'s code is: a package's directory (its submodules too) or the module's file."""
    file = getattr(module, "__file__", None)
    if not isinstance(file, str):
        return None
    file = os.path.abspath(file)
    return os.path.dirname(file) + os.sep if os.path.basename(file) == "__init__.py" else file


def plugin_places(discovered: dict[str, PluginInfo], pm: pluggy.PluginManager | None = None) -> list[tuple[str, str]]:
    """``(place, description)`` of every plugin whose code is loaded, the most specific place
    first: its entry point's module and, once registered in *pm*, the module of the object it
    registered (which may be another: an entry point that imports its class from elsewhere).
    A place is a package's directory or a module's file (:func:`_place_of`). Nothing is
    imported: a plugin whose module is not loaded yet runs no code."""
    places: dict[str, list[str]] = {}

    def add(name: str, module: Any) -> None:
        info = discovered[name]
        place = _place_of(module)
        if place and place != _CORE:  # a plugin object of the core's package itself is no place of its own
            described = (f"plugin {name!r} (module {getattr(module, '__name__', '?')}, distribution "
                         f"{info.distribution} {info.version})")
            if described not in places.setdefault(place, []):
                places[place].append(described)

    for name, info in discovered.items():
        module = sys.modules.get(info.value.split(":")[0].strip())
        if module is not None:
            add(name, module)
    for name, plugin in (pm.list_name_plugin() if pm is not None else []):
        if name in discovered and plugin is not None:
            add(name, inspect.getmodule(plugin))
    # Two plugins of one module (entry points to two classes of it) are both named: the module
    # alone cannot tell which (a frame's locals could, and they are not read: secrets).
    return sorted(((place, " or ".join(named)) for place, named in places.items()), key=lambda p: -len(p[0]))


def _frame_text(frame: Any) -> str:
    """``function (module, line N)``: no locals, no arguments (a password may be one). The
    module's name says which library a frame is in (``ldap3.strategy.sync``), where its file's
    name may not (``strategy/sync.py``)."""
    code = frame.f_code
    module = frame.f_globals.get("__name__")
    if not isinstance(module, str):
        module = os.sep.join(os.path.abspath(code.co_filename).split(os.sep)[-2:])
    return f"{getattr(code, 'co_qualname', code.co_name)} ({module}, line {frame.f_lineno})"


def where_in_plugins(frame: Any, places: list[tuple[str, str]]) -> str:
    """Where a thread whose innermost frame is *frame* is, for the log (``it is ...``): in the
    innermost plugin on its stack (a library the plugin called, ldap3 or a socket read, is
    further in), at the plugin's frame and, when it differs, waiting in the innermost one; else
    not inside a plugin, at the core's innermost frame. Code names and line numbers only: no
    locals, no arguments (a password may be one)."""
    if frame is None:
        return "not running: the thread has ended"
    innermost, core = frame, None
    while frame is not None:
        file = os.path.abspath(frame.f_code.co_filename)
        for place, described in places:
            if file == place or place.endswith(os.sep) and file.startswith(place):
                return f"in {described}, at {_frame_text(frame)}{_waiting(frame, innermost)}"
        if core is None and file.startswith(_CORE):
            core = frame
        frame = frame.f_back
    if core is None:
        return f"not inside a plugin, at {_frame_text(innermost)}"
    return f"not inside a plugin, at the core's {_frame_text(core)}{_waiting(core, innermost)}"


def _waiting(frame: Any, innermost: Any) -> str:
    return "" if frame is innermost else f", waiting in {_frame_text(innermost)}"
