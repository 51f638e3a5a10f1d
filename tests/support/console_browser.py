"""The console set-up walked in headless Chromium (Debian's ``/usr/bin/chromium`` through
Playwright), shared by ``tests/test_console_browser.py`` and ``tools/screenshots.py`` so that the
screenshots in docs/console.md come from the same run the test asserts on.

    with browser() as chromium:
        result = walk(chromium, link, slapd, service_password, shots=Path("docs/img/console"),
                      unreachable_ticket=..., ticket=relay.ticket(), ticket_ca=str(relay.ca_file))

With *ticket* (a ticket URL minted by a real relay, support/linkenv.py) the walk enrols the
connector through the ticket step after the unreachable one failed, and the configuration log
then includes test 4 (the cloud link).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
#: Milliseconds the page may take to show a finished configuration log.
RUN_TIMEOUT_MS = 60_000
#: Milliseconds any page may take: the ticket step runs `authgw link enroll` (bounded by the
#: console's 60 s ENROL_TIMEOUT), slow on a loaded two-core CI machine.
PAGE_TIMEOUT_MS = 90_000


@contextlib.contextmanager
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@dataclass
class Walk:
    failed_bind_hint: str = ""
    failed_statuses: dict[str, str] = field(default_factory=dict)
    green_statuses: dict[str, str] = field(default_factory=dict)
    green_summary: str = ""
    green_link_label: str = ""
    second_use: str = ""
    ticket_error: str = ""
    ticket_enrolled: str = ""
    ticket_enrolled_class: str = ""
    pages_html: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)


def _statuses(page) -> dict[str, str]:
    return {item.get_attribute("data-name").split("[", 1)[0]: item.get_attribute("class").split()[1]
            for item in page.locator("li.test").all()}


def _shot(page, shots: Path | None, name: str) -> None:
    if shots is not None:
        shots.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shots / name), full_page=True)


def _fill_directory(page, slapd, password: str) -> None:
    page.select_option("select[name=preset]", "openldap")
    page.fill("input[name=servers]", slapd.ldaps_url)
    page.fill("input[name=base_dn]", slapd.base_dn)
    page.fill("input[name=bind_dn]", slapd.service_dn)
    page.fill("input[name=password]", password)
    page.fill("input[name=ca_path]", str(slapd.ca_file))


def walk(chromium, link: str, slapd, service_password: str, *, unreachable_ticket: str,
         shots: Path | None = None, ticket: str | None = None, ticket_ca: str = "") -> Walk:
    result = Walk()
    context = chromium.new_context(viewport={"width": 1100, "height": 900})
    page = context.new_page()
    page.set_default_timeout(PAGE_TIMEOUT_MS)
    page.on("console", lambda message: result.console_errors.append(message.text)
            if message.type == "error" else None)
    page.goto(link)
    assert page.url.endswith("/setup"), page.url
    _shot(page, shots, "console-setup.png")

    # 1. The ticket: an unreachable relay gives one clear line and saves nothing.
    page.fill("input[name=ticket_url]", unreachable_ticket)
    page.click("#ticket button[type=submit]")
    result.ticket_error = page.inner_text("#ticket-result")
    _shot(page, shots, "console-ticket-error.png")

    # 1b. A real ticket: the connector enrols (as `authgw link enroll` does).
    if ticket is not None:
        page.fill("input[name=ticket_url]", ticket)
        page.fill("input[name=ticket_ca]", ticket_ca)
        page.click("#ticket button[type=submit]")
        result.ticket_enrolled = page.inner_text("#ticket-result")
        result.ticket_enrolled_class = page.get_attribute("#ticket-result", "class") or ""
        result.pages_html.append(page.content())
        _shot(page, shots, "console-ticket-enrolled.png")

    # 2. A wrong service password: test 2 turns red, with its hint; the search is skipped.
    _fill_directory(page, slapd, "not-the-password")
    page.click("#directory button[type=submit]")
    page.wait_for_selector("#summary[data-finished=yes]", timeout=RUN_TIMEOUT_MS)
    result.failed_statuses = _statuses(page)
    result.failed_bind_hint = page.inner_text("li.test[data-name='ldap.bind']")
    result.pages_html.append(page.content())
    _shot(page, shots, "console-log-failed.png")

    # 3. The right password: every test green.
    page.goto(link.split("/login/")[0] + "/setup")
    result.pages_html.append(page.content())
    _fill_directory(page, slapd, service_password)
    page.click("#directory button[type=submit]")
    page.wait_for_selector("#summary[data-finished=yes]", timeout=RUN_TIMEOUT_MS)
    result.green_statuses = _statuses(page)
    result.green_summary = page.inner_text("#summary")
    if ticket is not None:
        result.green_link_label = page.inner_text("li.test[data-name='link.link']")
    result.pages_html.append(page.content())
    _shot(page, shots, "console-log-green.png")

    page.goto(link.split("/login/")[0] + "/setup")
    result.pages_html.append(page.content())
    page.goto(link.split("/login/")[0] + "/status")
    result.pages_html.append(page.content())
    _shot(page, shots, "console-status.png")
    context.close()

    # 4. The one-time link, a second time (another browser profile): refused.
    other = chromium.new_context()
    second = other.new_page()
    second.goto(link)
    result.second_use = second.inner_text("main")
    _shot(second, shots, "console-link-used.png")
    other.close()
    return result


def status_shot(chromium, link: str, shots: Path, name: str = "console-status.png") -> str:
    """Sign in with *link* and photograph the status page; returns its HTML."""
    context = chromium.new_context(viewport={"width": 1100, "height": 900})
    page = context.new_page()
    page.goto(link)
    page.goto(link.split("/login/")[0] + "/status")
    _shot(page, shots, name)
    html = page.content()
    context.close()
    return html
