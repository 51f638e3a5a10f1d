"""The console's pages: set-up (ticket, directory), the configuration log, status.

Blocking work (an enrolment, a save, the status page's reads) runs on the console's own few
threads (:func:`_console_pool`), never on the event loop's default executor, which the core
shares: its reload builds the new configuration there, and the link and the login door look
users up there. An enrolment waits up to a minute for a relay that does not answer; a few
presses of **Enrol** held every default thread, and a ``SIGHUP`` reload waited for them (34 s,
review of the console). One enrolment runs at a time in a worker; another press meanwhile is
told so at once.

Server-rendered with Jinja2 (autoescape on for every template: a value typed into a field comes
back as text, never as markup); one small script (``static/console.js``) makes the log update
itself and takes a signed-in browser from a page's plain address (``/setup``) to its session's
(``/s/<prefix>/setup``); every page works without it.

A session's pages all live under its secret prefix (``access.py`` says why): the links, forms
and redirects of a page name it; any other path is the sign-in page (401) or a 404.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jinja2
from aiohttp import web

from gateway.plugins.console import setup
from gateway.plugins.console.access import FORM_KEY, SESSION_KEY, SIGN_IN, Guard
from gateway.plugins.console.configlog import describe, start_run
from gateway.plugins.console.listening import listening_sockets
from gateway.plugins.console.settings import listen_address
from gateway.plugins.console.status import RecentEvents, collect
from gateway.plugins.console.store import PREFIX, ConsoleStore

__all__ = ["Pages"]

log = logging.getLogger("authgw.plugin.console")
HERE = Path(__file__).parent
STATIC = {"console.js": "application/javascript", "console.css": "text/css"}
#: Pages of a session (below its prefix) that the sign-in page, reached by their plain address
#: with GET, can send a signed-in browser on to (``console.js``).
_RESUMABLE = re.compile(r"(setup|log|status|log/[0-9a-f]{1,32})?")
#: Plain addresses of the console's pages: without a session prefix they are the sign-in page.
_PAGES = re.compile(r"/(setup(/ticket|/directory)?|log(/[^/]*)?|api/log/[^/]*|status|logout)?")
#: Threads of the console's blocking work in a worker: an enrolment, a save (waiting for the
#: save lock), the status page's reads.
_POOL_THREADS = 3
_pool: tuple[int, ThreadPoolExecutor] | None = None
_pool_lock = threading.Lock()
#: Held while an enrolment runs in this worker (released by its thread, when it ends).
_enrolling = threading.Lock()
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
        # The address the printed link names (listen: 127.0.0.2 is loopback too) is a host name of its own.
        hosts = [*settings.hosts, str(listen_address(settings.listen)[0])]
        self.guard = Guard(store, settings.session_ttl, settings.session_lifetime, hosts, tls, self.message)

    # -- rendering ------------------------------------------------------------------------------

    def render(self, request: web.Request, template: str, status: int = 200, *, signed_out: bool = False,
               resume: str | None = None, **values) -> web.Response:
        """*signed_out*: the sign-in page or the signed-out one (``console.js`` forgets the prefix
        it kept on a page under it); *resume*: the page, below a prefix, that the sign-in page of a
        plain address stands for."""
        session = None if signed_out else request.get(SESSION_KEY)
        html = self.env.get_template(template).render(
            csrf=session.csrf if session else "", base=session.prefix if session else "",
            signed_in=session is not None, signed_out=signed_out, resume=resume, page=template, **values)
        # A value that is not UTF-8 text (a lone surrogate in conf.d) is shown as "?", not a 500.
        return web.Response(body=html.encode("utf-8", "replace"), status=status, content_type="text/html",
                            charset="utf-8")

    def message(self, request: web.Request, status: int, text: str) -> web.Response:
        if status == 401:  # no session: the sign-in page
            return self.render(request, "message.html", status=status, title="authgw console", text=text,
                               signed_out=True, resume=_resume(request))
        return self.render(request, "message.html", status=status, title="authgw console", text=text)

    def routes(self) -> list[tuple[str, str, object]]:
        wrap, session = self.guard.wrap, f"{PREFIX}{{prefix}}"
        return [
            ("GET", "/login/{token}", wrap(self.login, needs_session=False)),
            ("GET", "/static/{name}", wrap(self.static, needs_session=False)),
            ("GET", f"{session}/", wrap(self.home)),
            ("POST", f"{session}/logout", wrap(self.logout)),
            ("GET", f"{session}/setup", wrap(self.setup_page)),
            ("POST", f"{session}/setup/ticket", wrap(self.ticket)),
            ("POST", f"{session}/setup/directory", wrap(self.directory)),
            ("GET", f"{session}/log", wrap(self.latest_log)),
            ("POST", f"{session}/log", wrap(self.rerun)),
            ("GET", f"{session}/log/{{run}}", wrap(self.log_page)),
            ("GET", f"{session}/api/log/{{run}}", wrap(self.log_json)),
            ("GET", f"{session}/status", wrap(self.status_page)),
            # Last: any other path, with its headers. Below a live session's prefix it is a 404;
            # elsewhere the sign-in page (the plain address of a page) or a 404, read without a
            # session or a form.
            ("*", f"{session}/{{tail:.*}}", wrap(self.not_found, reads_form=False)),
            ("*", "/{tail:.*}", wrap(self.outside, needs_session=False, reads_form=False)),
        ]

    # -- access ---------------------------------------------------------------------------------

    async def home(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPSeeOther(f"{request[SESSION_KEY].prefix}setup")

    async def not_found(self, request: web.Request) -> web.StreamResponse:
        return self.message(request, 404, "No such page.")

    async def outside(self, request: web.Request) -> web.StreamResponse:
        """A path outside every session: the plain address of a page is the sign-in page (a
        signed-in browser's script goes on to its session's page), anything else a 404."""
        if _PAGES.fullmatch(request.path):
            return self.message(request, 401, SIGN_IN)
        return self.message(request, 404, "No such page.")

    async def login(self, request: web.Request) -> web.StreamResponse:
        token = request.match_info["token"]
        tied = self.store.redeem_login_token(token) if len(token) <= 128 else None
        if tied is None:
            return self.message(request, 403, "This login link is used or expired. Run `authgw console` "
                                              "for a new one.")
        if tied and not self._listening_on(tied):
            # Printed for a console that has restarted since: while it was down, another local
            # user could bind its address and receive the token from the operator's browser
            # (listening.py). Spent, not honoured.
            log.warning("console: a login link printed before the console last started was refused (spent); "
                        "run `authgw console` for a new one")
            return self.message(request, 403, "This login link was printed for the console before it restarted. "
                                              "Run `authgw console` for a new one.")
        session_id, session = self.store.new_session(self.settings.session_ttl, self.settings.session_lifetime)
        response = web.HTTPSeeOther(f"{session.prefix}setup")
        self.guard.set_cookie(response, session_id, session)
        raise response

    def _listening_on(self, tied: frozenset[int]) -> bool:
        """Whether one of the sockets a link is tied to still listens on the console's address
        (a reload keeps them; a restart does not). Not Linux: nothing to compare, it does."""
        current = listening_sockets(*listen_address(self.settings.listen))
        return current is None or bool(tied & current.keys())

    async def logout(self, request: web.Request) -> web.StreamResponse:
        session = request[SESSION_KEY]
        self.store.end_session(session)  # server-side: the cookie and the prefix open nothing now
        response = self.render(request, "message.html", title="authgw console", text="Signed out.",
                               signed_out=True)
        self.guard.clear_cookie(response, session)
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
                           ticket_url=ticket_url, upload_kib=setup.UPLOAD_LIMIT // 1024,
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
        if not _enrolling.acquire(blocking=False):
            return self._setup(request, status=409, ticket_url=url[:2048], ticket_message=(
                "An enrolment is running already (it waits up to a minute for the relay): its result "
                "is shown where it was started. Try again when it has ended."))
        enrol = functools.partial(setup.enrol, url, self.config_dir, self.state_dir, ca,
                                  link_enabled="link" in (*settings.chain, *settings.plugins))
        ok, line = await _off_loop(_released_after(enrol, _enrolling), holding=_enrolling)
        if ok and setup.can_reload(self.state_dir):  # the running link plugin picks the enrolment up
            line = f"{line} ({setup.reload_gateway(self.state_dir)})"
        return self._setup(request, status=200 if ok else 400, ticket_message=line, ticket_ok=ok,
                           ticket_url="" if ok else url[:2048])

    async def directory(self, request: web.Request) -> web.StreamResponse:
        form = setup.DirectoryForm.from_post(request[FORM_KEY])
        problems = await _off_loop(setup.save_directory, form, self.config_dir, self.state_dir)
        if problems:
            form.password = ""  # never echoed back
            return self._setup(request, form=form, status=400, errors=problems)
        reloads = setup.can_reload(self.state_dir)
        run = start_run(self.store, self.config_dir, self.state_dir,
                        after=(lambda: log.info("console: %s", setup.reload_gateway(self.state_dir))) if reloads else None)
        saved = "reload" if reloads else "restart"
        raise web.HTTPSeeOther(f"{request[SESSION_KEY].prefix}log/{run}?saved={saved}")

    # -- the configuration log -------------------------------------------------------------------

    async def latest_log(self, request: web.Request) -> web.StreamResponse:
        run = self.store.latest_run()
        if run is None:
            return self.render(request, "log.html", run=None, rows=[], notice="")
        raise web.HTTPSeeOther(f"{request[SESSION_KEY].prefix}log/{run}")

    async def rerun(self, request: web.Request) -> web.StreamResponse:
        run = start_run(self.store, self.config_dir, self.state_dir)
        raise web.HTTPSeeOther(f"{request[SESSION_KEY].prefix}log/{run}")

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
        data = await _off_loop(
            collect, self.gateway, self.recent, self.settings.audit_events, user, outcome,
            self.settings.certificate_warning_days)
        return self.render(request, "status.html", user=user, outcome=outcome, outcomes=OUTCOMES, **data)


def _console_pool() -> ThreadPoolExecutor:
    """This process's console threads (made at the first use: a worker forked from a master that
    never used them gets its own)."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] != os.getpid():
            _pool = (os.getpid(), ThreadPoolExecutor(_POOL_THREADS, thread_name_prefix="authgw-console"))
        return _pool[1]


async def _off_loop(fn, *args, holding: threading.Lock | None = None):
    """``fn(*args)`` on the console's threads, waited for. *holding*: a lock *fn* releases when it
    ends, released here when it could not be started."""
    try:
        future = _console_pool().submit(fn, *args)
    except BaseException:
        if holding is not None:
            holding.release()
        raise
    # Shielded: a request cancelled meanwhile must not cancel work not started yet, which would
    # never release *holding* (every later enrolment refused until a restart).
    return await asyncio.shield(asyncio.wrap_future(future))


def _released_after(fn, lock: threading.Lock):
    """*fn*, releasing *lock* when it has run: in its thread, so that a request given up
    meanwhile (the browser closed) does not let a second enrolment start beside it."""
    def run():
        try:
            return fn()
        finally:
            lock.release()
    return run


def _resume(request: web.Request) -> str | None:
    """The page below a session prefix that a GET of *request*'s plain address stands for."""
    if request.method != "GET" or request.path.startswith(PREFIX):
        return None
    page = request.path[1:]
    return page if _RESUMABLE.fullmatch(page) else None
