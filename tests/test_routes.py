"""Plugin HTTP routes (``gateway_http_routes``) and listeners with routes of their own, through a
real ``authgw serve``."""

from __future__ import annotations

import pytest

from support.fakedist import make_dist
from support.gateway import authgw, write_conf
from support.http import request
from support.net import free_port

PASSWORD = "Corr3ct-Horse-Battery"

ROUTED = {"routed_plugin.py": '''
    from aiohttp import web
    from gateway import Listener, PasswordCredential, PluginSettings, Route, hookimpl

    class Settings(PluginSettings):
        console: str = ""
        stray: bool = False

    class Routed:
        Settings = Settings

        def __init__(self, settings, context):
            self.settings = settings

        @hookimpl
        def gateway_listeners(self):
            return [Listener("routed.console", self.settings.console, None, own_routes=True)]

        @hookimpl
        def gateway_http_routes(self, door):
            async def login(request):
                form = await request.post()
                attempt = door.attempt(request, "routed",
                                       password=PasswordCredential(form["username"], form["password"]))
                decision = await door.decide(attempt)
                who = decision.identity.username if decision.success else "-"
                return web.Response(text=f"{decision.outcome.value} {who} {attempt.front_door}")

            async def console(request):
                return web.Response(text="console")

            routes = [Route("POST", "/routed/login", login), Route("GET", "/console", console, "routed.console")]
            if self.settings.stray:
                routes.append(Route("GET", "/nowhere", console, "routed.missing"))
            return routes
'''}


@pytest.fixture
def routed(tmp_path, conf_dir, demo_hash):
    site = make_dist(tmp_path / "site", "routed-plugin", {"routed": "routed_plugin:Routed"}, ROUTED)
    port = free_port()
    write_conf(conf_dir, {
        "gateway.yaml": "chain: [static]\nplugins: [routed]\nthrottle:\n  enabled: false\n",
        "static.yaml": "static:\n  users_file: users/users.yaml\n",
        "routed.yaml": f"routed:\n  console: 127.0.0.1:{port}\n",
        "users/users.yaml": f'users:\n  alice:\n    password_hash: "{demo_hash}"\n',
    })
    return {"PYTHONPATH": str(site)}, f"http://127.0.0.1:{port}"


def test_a_plugin_route_authenticates_through_the_core(routed, conf_dir, start_gateway):
    env, _ = routed
    gw = start_gateway(conf_dir, env=env)
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    ok = gw.post("/routed/login", b"username=alice&password=demo-password", form)
    assert ok.text == "success alice routed"
    bad = gw.post("/routed/login", b"username=alice&password=nope", form)
    assert bad.text == "invalid_credentials - routed"
    audit = [(line["front_door"], line["outcome"]) for line in gw.audit()]
    assert audit == [("routed", "success"), ("routed", "invalid_credentials")]


def test_a_listener_with_own_routes_serves_only_them(routed, conf_dir, start_gateway):
    env, console_url = routed
    gw = start_gateway(conf_dir, env=env)
    assert request(console_url, "GET", "/console").text == "console"
    assert request(console_url, "GET", "/auth").status == 404  # no front doors there
    assert request(console_url, "GET", "/healthz").status == 404
    assert gw.get("/console").status == 404  # and its routes are not on the main listener
    assert gw.get("/healthz").status == 200


def test_a_route_for_a_listener_nobody_asked_for_stops_start_up(routed, conf_dir, tmp_path):
    env, console_url = routed
    (conf_dir / "routed.yaml").write_text(f"routed:\n  console: {console_url[7:]}\n  stray: true\n")
    result = authgw("serve", "--config", str(conf_dir), "--state-dir", str(tmp_path / "state"),
                    "--listen", f"127.0.0.1:{free_port()}", env=env, timeout=30)
    assert result.returncode != 0
    assert "routed.missing" in result.stderr + result.stdout
