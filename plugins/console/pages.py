"""The console's pages: set-up (ticket, directory), the configuration log, status.

Server-rendered with Jinja2 (autoescape on for every template: a value typed into a field comes
back as text, never as markup); one small script (``static/console.js``) only makes the log
update itself, and every page works without it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from pathlib import Path

import jinja2
from aiohttp import web

from gateway.plugins.console import setup
from gateway.plugins.console.access import FORM_KEY, SESSION_KEY, Guard
from gateway.plugins.console.configlog import describe, start_run
from gateway.plugins.console.status import RecentEvents, collect
from gateway.plugins.console.store import ConsoleStore

__all__ = ["Pages"]

log = logging.getLogger("authgw.plugin.console")
HERE = Path(__file__).parent
STATIC = {"console.js": "application/javascript", "console.css": "text/css"}
OUTCOMES = ("success", "invalid_credentials", "user_not_found", "account_state", "unavailable",
            "throttled", "not_applicable", "error")


class Pages:
    def __init__(self, *, store: ConsoleStore, config_dir: Path, state_dir: Path, settings, recent: RecentEvents,
                 gateway, tls: bool) -> None:
        self.store = store
        self.config_dir = config_dir
        self.state_dir = state_dir
        self.settings = settings
        self.recent = recent
        self.gateway = gateway
        self.env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"),
                                      autoescape=True, undefined=jinja2.StrictUndefined)
        self.guard = Guard(store, settings.session_ttl, settings.hosts, tls, self.message)

    # -- rendering ------------------------------------------------------------------------------

    def render(self, request: web.Request, template: str, status: int = 200, **values) -> web.Response:
        session = request.get(SESSION_KEY)
        html = self.env.get_template(template).render(csrf=session.csrf if session else "",
                                                      signed_in=session is not None, page=template, **values)
        return web.Response(text=html, status=status, content_type="text/html", charset="utf-8")

    def message(self, request: web.Request, status: int, text: str) -> web.Response:
        return self.render(request, "message.html", status=status, title="authgw console", text=text)

    def routes(self) -> list[tuple[str, str, object]]:
        wrap = self.guard.wrap
        return [
            ("GET", "/", wrap(self.home)),
            ("GET", "/login/{token}", wrap(self.login, needs_session=False)),
            ("POST", "/logout", wrap(self.logout)),
            ("GET", "/setup", wrap(self.setup_page)),
            ("POST", "/setup/ticket", wrap(self.ticket)),
            ("POST", "/setup/directory", wrap(self.directory)),
            ("GET", "/log", wrap(self.latest_log)),
            ("POST", "/log", wrap(self.rerun)),
            ("GET", "/log/{run}", wrap(self.log_page)),
            ("GET", "/api/log/{run}", wrap(self.log_json)),
            ("GET", "/status", wrap(self.status_page)),
            ("GET", "/static/{name}", wrap(self.static, needs_session=False)),
        ]

    # -- access ---------------------------------------------------------------------------------

    async def home(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPSeeOther("/setup")

    async def login(self, request: web.Request) -> web.StreamResponse:
        token = request.match_info["token"]
        if len(token) > 128 or not self.store.redeem_login_token(token):
            return self.message(request, 403, "This login link is used or expired. Run `authgw console` "
                                              "for a new one.")
        session_id, _ = self.store.new_session(self.settings.session_ttl)
        response = web.HTTPSeeOther("/setup")
        self.guard.set_cookie(response, session_id)
        raise response

    async def logout(self, request: web.Request) -> web.StreamResponse:
        self.store.end_session(request[SESSION_KEY])
        response = self.message(request, 200, "Signed out.")
        response.del_cookie("authgw_console", path="/")
        return response

    async def static(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name not in STATIC:
            raise web.HTTPNotFound()
        return web.Response(body=(HERE / "static" / name).read_bytes(), content_type=STATIC[name])

    # -- set-up ---------------------------------------------------------------------------------

    def _setup(self, request, form=None, status=200, ticket_message="", ticket_ok=False, errors=(), ticket_url=""):
        form = form or setup.current_directory(self.config_dir)
        if form is not None and not form.password_set:
            form.password_set = setup.current_directory(self.config_dir).password_set
        return self.render(request, "setup.html", status=status, form=form, presets=setup.PRESETS,
                           ticket_message=ticket_message, ticket_ok=ticket_ok, errors=list(errors),
                           ticket_url=ticket_url,
                           config_dir=str(self.config_dir), console_file=setup.CONSOLE_FILE)

    async def setup_page(self, request: web.Request) -> web.StreamResponse:
        return self._setup(request)

    async def ticket(self, request: web.Request) -> web.StreamResponse:
        data = request[FORM_KEY]
        url = data.get("ticket_url", "")
        ca = data.get("ticket_ca", "")
        url = url.strip() if isinstance(url, str) else ""
        ca = ca.strip() if isinstance(ca, str) else ""
        settings = self.gateway.settings
        ok, line = await asyncio.get_running_loop().run_in_executor(None, functools.partial(
            setup.enrol, url, self.config_dir, self.state_dir, ca,
            link_enabled="link" in (*settings.chain, *settings.plugins)))
        if ok and setup.can_reload(self.state_dir):  # the running link plugin picks the enrolment up
            line = f"{line} ({setup.reload_gateway(self.state_dir)})"
        return self._setup(request, status=200 if ok else 400, ticket_message=line, ticket_ok=ok,
                           ticket_url="" if ok else url[:2048])

    async def directory(self, request: web.Request) -> web.StreamResponse:
        form = setup.DirectoryForm.from_post(request[FORM_KEY])
        loop = asyncio.get_running_loop()
        problems = await loop.run_in_executor(None, setup.save_directory, form, self.config_dir, self.state_dir)
        if problems:
            form.password = ""  # never echoed back
            return self._setup(request, form=form, status=400, errors=problems)
        reloads = setup.can_reload(self.state_dir)
        run = start_run(self.store, self.config_dir, self.state_dir,
                        after=(lambda: log.info("console: %s", setup.reload_gateway(self.state_dir))) if reloads else None)
        raise web.HTTPSeeOther(f"/log/{run}?saved={'reload' if reloads else 'restart'}")

    # -- the configuration log -------------------------------------------------------------------

    async def latest_log(self, request: web.Request) -> web.StreamResponse:
        run = self.store.latest_run()
        if run is None:
            return self.render(request, "log.html", run=None, rows=[], notice="")
        raise web.HTTPSeeOther(f"/log/{run}")

    async def rerun(self, request: web.Request) -> web.StreamResponse:
        run = start_run(self.store, self.config_dir, self.state_dir)
        raise web.HTTPSeeOther(f"/log/{run}")

    def _rows(self, results) -> list[dict]:
        rows = []
        for row in results:
            label, what, check = describe(row.name)
            rows.append({"seq": row.seq, "name": row.name, "status": row.status, "detail": row.detail,
                         "hint": row.hint, "label": label, "what": what, "check": check})
        return rows

    async def log_page(self, request: web.Request) -> web.StreamResponse:
        found = self.store.run(request.match_info["run"][:32])
        if found is None:
            return self.message(request, 404, "No such configuration-log run.")
        run, results = found
        saved = request.query.get("saved")
        notice = {"reload": "Saved; the gateway reloads its configuration when the tests have run.",
                  "restart": "Saved. This gateway cannot reload itself: restart authgw to use the new "
                             "settings."}.get(saved or "", "")
        return self.render(request, "log.html", run=run, rows=self._rows(results), notice=notice)

    async def log_json(self, request: web.Request) -> web.StreamResponse:
        found = self.store.run(request.match_info["run"][:32])
        if found is None:
            raise web.HTTPNotFound()
        run, results = found
        return web.json_response({"finished": run["finished"] is not None, "summary": run["summary"],
                                  "rows": self._rows(results)})

    # -- status ---------------------------------------------------------------------------------

    async def status_page(self, request: web.Request) -> web.StreamResponse:
        user = request.query.get("user", "")[:256]
        outcome = request.query.get("outcome", "")
        outcome = outcome if outcome in OUTCOMES else ""
        data = await asyncio.get_running_loop().run_in_executor(
            None, collect, self.gateway, self.recent, self.settings.audit_events, user, outcome,
            self.settings.certificate_warning_days)
        return self.render(request, "status.html", user=user, outcome=outcome, outcomes=OUTCOMES, **data)
