"""The ``authgw`` command.

Built-in sub-commands, plus the sub-commands of enabled plugins (``gateway_commands``); the
commands of installed plugins that are not enabled are listed too, and say how to enable them.
"""

from __future__ import annotations

import argparse
import getpass
import inspect
import hashlib
import json
import logging
import secrets
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor, TimeoutError as FutureTimeout
from pathlib import Path

import yaml

from gateway.checks import CheckResult, CheckStatus
from gateway.config import load_config
from gateway.errors import AuthgwError, ConfigError, PluginLoadError
from gateway.logs import authgw_version, setup_logging
from gateway.runtime import build_runtime, default_config_dir
from gateway.yamlfiles import format_path

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2
SELFTEST_TIMEOUT = 15.0


log = logging.getLogger("authgw")


version = authgw_version

def _setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    setup_logging(level, fmt)


def _config_dir(args: argparse.Namespace) -> Path:
    return Path(args.config) if args.config else default_config_dir()


# -- commands ---------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway.server import serve

    config = load_config(_config_dir(args))
    _setup_logging(config.core.log_level, config.core.log_format)
    log.info("authgw %s starting (Python %s); configuration %s", version(), sys.version.split()[0], config.directory)
    # `systemctl reload` sends SIGHUP, whose default action ends the process: say what a reload
    # does instead (workers inherit this handler).
    signal.signal(signal.SIGHUP, _on_sighup)
    return serve(_config_dir(args), state_dir=args.state_dir, workers=args.workers, listen=args.listen or None)


def _on_sighup(signum, frame) -> None:
    log.warning("SIGHUP: nothing to reload in place; the static users file is re-read when it changes, "
                "other configuration changes need a restart (systemctl restart authgw)")


def cmd_config_check(args: argparse.Namespace) -> int:
    runtime = build_runtime(_config_dir(args), state_dir=args.state_dir)
    config = runtime.config
    runtime.discard()
    print(f"configuration OK: {config.directory} ({len(config.files)} files); "
          f"chain: {' -> '.join(config.core.chain)}"
          + (f"; plugins: {', '.join(config.core.plugins)}" if config.core.plugins else ""))
    return EXIT_OK


def cmd_config_show(args: argparse.Namespace) -> int:
    runtime = build_runtime(_config_dir(args), state_dir=args.state_dir)
    shown = runtime.config.redacted()
    runtime.discard()
    print(f"# merged from: {', '.join(str(f) for f in runtime.config.files)} (secrets shown as references)")
    for path, variable in runtime.config.environment.items():
        print(f"# {format_path(path)}: from ${variable}")
    print(yaml.safe_dump(shown, sort_keys=False, default_flow_style=False).rstrip())
    return EXIT_OK


def cmd_config_schema(args: argparse.Namespace) -> int:
    """A JSON Schema of conf.d for editors: the core, every enabled plugin's section, and other
    installed plugins' sections as plain mappings (they are ignored with a warning)."""
    from pydantic.json_schema import models_json_schema

    from gateway.registry import discover, load
    from gateway.settings import GatewaySettings, PluginSettings

    discovered = discover()
    config = load_config(_config_dir(args), installed=set(discovered), defer=True)
    models: dict[str, type[PluginSettings]] = {}
    for name in config.enabled:
        if name in discovered:
            settings = getattr(load(discovered[name]), "Settings", None)
            if inspect.isclass(settings) and issubclass(settings, PluginSettings):
                models[name] = settings
    keys, schema = models_json_schema([(GatewaySettings, "validation"), *((m, "validation") for m in models.values())],
                                      ref_template="#/$defs/{model}")
    defs = schema.get("$defs", {})
    core = defs.pop(keys[(GatewaySettings, "validation")]["$ref"].rsplit("/", 1)[1])
    properties = dict(core["properties"])
    # `listen:` also takes one string (GatewaySettings._one_address): say so to editors too.
    properties["listen"] = {"anyOf": [{"type": "string"}, properties["listen"]],
                            "description": properties["listen"].get("description", "")}
    for name, model in models.items():
        properties[name] = {**keys[(model, "validation")], "description": f"settings of the {name} plugin"}
    for name in discovered:
        properties.setdefault(name, {"type": "object", "description": f"plugin {name} (not enabled: ignored)"})
    print(json.dumps({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "authgw conf.d (any file of it)",
        "description": f"generated by `authgw config schema` (authgw {version()}); files merge, so no key is "
                       "required in any one file",
        "type": "object",
        "properties": properties,
        "additionalProperties": False,
        "$defs": defs,
    }, indent=2))
    return EXIT_OK


def cmd_plugins(args: argparse.Namespace) -> int:
    from gateway.registry import discover

    from gateway.registry import discover, load

    found = discover()
    enabled: list[str] = []
    failed = False
    try:
        enabled = load_config(_config_dir(args), defer=True).enabled
    except ConfigError as exc:
        print(f"(configuration not read: {exc.problems[0]})", file=sys.stderr)
        failed = True
    print(f"{'NAME':<16} {'STATE':<14} {'DISTRIBUTION':<28} ENTRY POINT")
    broken = []
    for name, info in found.items():
        state = f"enabled #{enabled.index(name) + 1}" if name in enabled else "installed"
        if name in enabled:
            try:
                load(info)  # an enabled plugin that cannot be imported stops `serve`: say so here
            except PluginLoadError as exc:
                state, failed = "CANNOT LOAD", True
                broken.append(str(exc))
        print(f"{name:<16} {state:<14} {info.distribution + ' ' + info.version:<28} {info.value}")
    for name in enabled:
        if name not in found:
            failed = True
            print(f"{name:<16} {'MISSING':<14} {'-':<28} enabled in conf.d but not installed")
    for problem in broken:
        print(f"error: {problem}", file=sys.stderr)
    return EXIT_FAILED if failed else EXIT_OK


def _run_one(pool: ThreadPoolExecutor, test) -> CheckResult:
    try:
        return pool.submit(test.run).result(timeout=SELFTEST_TIMEOUT)
    except FutureTimeout:
        return CheckResult.fail(f"no answer within {SELFTEST_TIMEOUT:.0f}s", "a backend hangs or a timeout is too long")
    except Exception as exc:
        return CheckResult.fail(f"the test raised {exc.__class__.__name__}: {exc}")


def cmd_check(args: argparse.Namespace) -> int:
    config_dir = _config_dir(args)
    runtime = build_runtime(config_dir, state_dir=args.state_dir)
    config = runtime.config
    print(f"authgw configuration log  {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    print(f"  config    {config.directory} ({', '.join(f.name for f in config.files)})")
    print(f"  chain     {' -> '.join(config.core.chain)}")
    if config.core.plugins:
        print(f"  plugins   {', '.join(config.core.plugins)}")
    print(f"  listen    {', '.join(config.core.listen)}")
    failed = 0
    total = 0
    with ThreadPoolExecutor(max_workers=1) as pool:
        try:
            runtime.gateway.startup()
        except Exception as exc:
            print(f"FAIL  startup: {exc.__class__.__name__}: {exc}")
            failed += 1
        blocked: set[str] = set()
        for test in runtime.gateway.selftests():
            total += 1
            plugin = test.name.split(".", 1)[0]
            if plugin in blocked:
                print(f"SKIP  {test.name}: an earlier test of {plugin} failed")
                continue
            result = _run_one(pool, test)
            print(f"{result.status.value.upper():<5} {test.name}: {result.detail}")
            if result.hint and result.status is not CheckStatus.PASS:
                print(f"      hint: {result.hint}")
            if result.status is CheckStatus.FAIL:
                failed += 1
                if test.prerequisite:
                    blocked.add(plugin)
        ready, components = runtime.gateway.readiness()
        for component in components:
            print(f"{'READY' if component.ready else 'DOWN':<5} {component.name}: {component.detail}")
    runtime.close()
    print(f"{total} self-tests, {failed} failed" if total else "no plugin offers self-tests")
    return EXIT_FAILED if failed else EXIT_OK


def cmd_hash_password(args: argparse.Namespace) -> int:
    from gateway.passwords import hash_password

    if args.stdin or not sys.stdin.isatty():
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            print("the passwords differ", file=sys.stderr)
            return EXIT_FAILED
    if not password:
        print("refusing to hash an empty password", file=sys.stderr)
        return EXIT_FAILED
    print(hash_password(password))
    return EXIT_OK


def cmd_api_token(args: argparse.Namespace) -> int:
    token = "agw_" + secrets.token_urlsafe(32)
    digest = hashlib.sha256(token.encode()).hexdigest()
    print(f"token (give it to the client; it is not stored): {token}", file=sys.stderr)
    print(token)
    print("add to conf.d/gateway.yaml under api_tokens:", file=sys.stderr)
    print(json.dumps({"name": args.name, "sha256": digest}), file=sys.stderr)
    return EXIT_OK


# -- parser -----------------------------------------------------------------------------------


def _parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction, argparse.ArgumentParser]:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="DIR",
                        help="configuration directory (default: $AUTHGW_CONFIG, ./conf.d, /etc/authgw/conf.d)")
    common.add_argument("--state-dir", metavar="DIR", type=Path,
                        help="state directory (cache, keys); default: `state_dir:` in conf.d, else "
                             "$XDG_DATA_HOME/authgw (~/.local/share/authgw)")

    parser = argparse.ArgumentParser(prog="authgw", description="Plugin-based authentication gateway.")
    parser.add_argument("--version", action="version", version=f"authgw {version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", parents=[common], help="run the gateway in the foreground")
    serve.add_argument("--workers", type=int, metavar="N",
                       help="worker processes sharing the sockets (default: `workers:` in conf.d, which defaults to 1)")
    serve.add_argument("--listen", action="append", metavar="HOST:PORT", help="override `listen:` (repeatable)")
    serve.set_defaults(func=cmd_serve)

    config = commands.add_parser("config", help="validate or show the configuration")
    config_commands = config.add_subparsers(dest="config_command", required=True, metavar="COMMAND")
    config_commands.add_parser("check", parents=[common], help="validate without starting anything"
                               ).set_defaults(func=cmd_config_check)
    config_commands.add_parser("show", parents=[common], help="print the merged configuration, secrets redacted"
                               ).set_defaults(func=cmd_config_show)
    config_commands.add_parser("schema", parents=[common], help="print a JSON Schema of conf.d (core and enabled "
                               "plugins) for editors").set_defaults(func=cmd_config_schema)

    commands.add_parser("plugins", parents=[common], help="list installed and enabled plugins"
                        ).set_defaults(func=cmd_plugins)
    commands.add_parser("check", parents=[common], help="run every enabled plugin's self-tests"
                        ).set_defaults(func=cmd_check)

    hashing = commands.add_parser("hash-password", help="print an argon2id hash for a users file")
    hashing.add_argument("--stdin", action="store_true", help="read the password from standard input")
    hashing.set_defaults(func=cmd_hash_password)

    token = commands.add_parser("api-token", help="make an API token for POST /v1/authenticate")
    token.add_argument("name", help="a name for the client that will use it")
    token.set_defaults(func=cmd_api_token)
    return parser, commands, common


def _add_plugin_commands(argv: list[str], commands: argparse._SubParsersAction,
                         common: argparse.ArgumentParser, *, listing: bool = False) -> None:
    """Build the enabled plugins and let them add their sub-commands (``gateway_commands``).

    Installed plugins that are not enabled but offer commands get a placeholder named after the
    plugin that says how to enable it, so ``--help`` shows every command there is. With
    *listing* (``authgw --help``) a configuration that cannot be built only hides the real ones.
    """
    from gateway.registry import discover, load

    known, _ = common.parse_known_args(argv)
    discovered = discover()
    enabled: set[str] = set()
    try:
        runtime = build_runtime(_config_dir(known), state_dir=known.state_dir, discovered=discovered)
    except (ConfigError, PluginLoadError, OSError):
        if not listing:
            raise
    else:
        enabled = set(runtime.config.enabled)
        for batch in runtime.gateway.pm.hook.gateway_commands():
            for command in batch or ():
                if command.name in commands.choices:
                    raise PluginLoadError(f"plugin command {command.name!r} clashes with an existing command")
                sub = commands.add_parser(command.name, parents=[common], help=command.help)
                command.add_arguments(sub)
                sub.set_defaults(func=lambda args, run=command.run: run(args))
        runtime.discard()
    for name, info in discovered.items():
        if name in enabled or name in commands.choices:
            continue
        try:
            obj = load(info)
        except PluginLoadError:
            continue  # `authgw plugins` says why; --help still works
        offers = inspect.isclass(obj) and callable(getattr(obj, "gateway_commands", None))
        if offers:
            sub = commands.add_parser(name, help=f"commands of the {name} plugin (not enabled: add `{name}` to "
                                                 "`plugins:` or `chain:` in conf.d)", add_help=False)
            sub.add_argument("rest", nargs=argparse.REMAINDER)
            sub.set_defaults(func=lambda args, plugin=name: _not_enabled(plugin))


def _not_enabled(name: str) -> int:
    print(f"error: `authgw {name}` needs the {name} plugin enabled: add `{name}` to `plugins:` (or `chain:`) "
          f"in conf.d, then run `authgw config check`", file=sys.stderr)
    return EXIT_CONFIG


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser, commands, common = _parser()
    try:
        first = next((a for a in argv if not a.startswith("-")), None)
        if first is None and "--version" not in argv:  # `authgw --help`: list the plugins' commands too
            _setup_logging("ERROR")
            _add_plugin_commands(argv, commands, common, listing=True)
        elif first is not None and first not in commands.choices:
            _setup_logging("WARNING")
            _add_plugin_commands(argv, commands, common)
        args = parser.parse_args(argv)
        if args.func is not cmd_serve:
            _setup_logging("WARNING")
        return args.func(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    except (PluginLoadError, AuthgwError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
