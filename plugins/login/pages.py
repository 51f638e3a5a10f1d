"""The HTML the login front door shows: the password form, the auto-submitting answer to a
service provider, and short messages. Jinja2 with autoescaping on; no page needs JavaScript.

Every user-visible string comes from :data:`MESSAGES`, replaceable per key through
``login.messages`` (localisation). Failure messages are generic: an unknown user and a wrong
password read the same; a locked account and an expired password are said, because the user
can act on them.
"""

from __future__ import annotations

import base64
import hashlib

import jinja2

__all__ = ["AUTOSUBMIT_HASH", "MESSAGES", "STYLE_HASH", "Pages"]

MESSAGES = {
    "lang": "en",
    "username": "Username",
    "password": "Password",
    "submit": "Sign in",
    "invalid": "The username or password is incorrect.",
    "locked": "Your account is locked. Contact your help desk.",
    "expired": "Your password has expired or must be changed. Change it, then sign in again.",
    "disabled": "Your account cannot sign in at the moment. Contact your help desk.",
    "throttled": "Too many failed attempts. Wait a few minutes, then try again.",
    "unavailable": "Sign-in is not available right now. Try again in a moment.",
    "csrf": "This form has expired. Please sign in again.",
    "signed_in": "You are signed in as {name}.",
    "sign_out": "Sign out",
    "signed_out": "You are signed out.",
    "signed_out_partial": "You are signed out here, but not every application could be told. Close your browser "
                          "to end your sessions with them.",
    "continue": "Continue",
    "continue_hint": "Your browser did not continue on its own. Press Continue.",
    "refused": "This sign-in request cannot be accepted. Start again from the application.",
    "reference": "Reference",
}

#: The one script any page has: submitting the answer form on load. It is allowed by its hash
#: in the Content-Security-Policy, so no other script can run; without JavaScript the user
#: presses the button.
AUTOSUBMIT_JS = "document.forms[0].submit();"
AUTOSUBMIT_HASH = "sha256-" + base64.b64encode(hashlib.sha256(AUTOSUBMIT_JS.encode()).digest()).decode()

STYLE = """body{font-family:system-ui,sans-serif;background:#f4f5f7;margin:0;display:flex;justify-content:center}
main{background:#fff;margin-top:10vh;padding:2em;border-radius:8px;box-shadow:0 1px 4px #0002;width:20em}
label{display:block;margin-top:1em;font-weight:600}input{width:100%;box-sizing:border-box;padding:.5em;font-size:1em}
button{margin-top:1.5em;padding:.6em 1.2em;font-size:1em;background:#1f5fbf;color:#fff;border:0;border-radius:4px}
[role=alert]{background:#fdecea;color:#7a1c14;padding:.6em;border-radius:4px}small{color:#666}
"""
STYLE_HASH = "sha256-" + base64.b64encode(hashlib.sha256(STYLE.encode()).digest()).decode()

_LAYOUT = """<!doctype html>
<html lang="{{ m.lang }}"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }}</title>
<style>""" + STYLE + """</style></head><body><main>
<h1>{{ title }}</h1>
{% block body %}{% endblock %}
</main></body></html>"""

_FORM = """{% extends "layout" %}{% block body %}
{% if error %}<p role="alert" id="error">{{ error }}</p>{% endif %}
<form method="post" action="{{ action }}">
<input type="hidden" name="csrf" value="{{ csrf }}">
{% if pending %}<input type="hidden" name="req" value="{{ pending }}">{% endif %}
<label for="username">{{ m.username }}</label>
<input id="username" name="username" autocomplete="username" required autofocus value="{{ username }}"
 {% if error %}aria-describedby="error"{% endif %}>
<label for="password">{{ m.password }}</label>
<input id="password" name="password" type="password" autocomplete="current-password" required>
<button type="submit">{{ m.submit }}</button>
</form>{% endblock %}"""

_POST = """{% extends "layout" %}{% block body %}
<form method="post" action="{{ url }}">
{% for name, value in fields %}<input type="hidden" name="{{ name }}" value="{{ value }}">
{% endfor %}<p><small>{{ m.continue_hint }}</small></p>
<button type="submit">{{ m.continue }}</button>
</form>
<script>""" + AUTOSUBMIT_JS + """</script>{% endblock %}"""

_MESSAGE = """{% extends "layout" %}{% block body %}
<p {% if alert %}role="alert"{% endif %} id="message">{{ text }}</p>
{% if reference %}<p><small>{{ m.reference }}: {{ reference }}</small></p>{% endif %}
{% if logout %}<form method="post" action="{{ logout }}"><input type="hidden" name="csrf" value="{{ csrf }}">
<button type="submit">{{ m.sign_out }}</button></form>{% endif %}{% endblock %}"""


class Pages:
    def __init__(self, title: str, overrides: dict[str, str]) -> None:
        unknown = set(overrides) - set(MESSAGES)
        if unknown:
            raise ValueError(f"unknown message keys: {', '.join(sorted(unknown))}; known: {', '.join(MESSAGES)}")
        self.messages = {**MESSAGES, **overrides}
        self.title = title
        env = jinja2.Environment(loader=jinja2.DictLoader({"layout": _LAYOUT, "form": _FORM, "post": _POST,
                                                          "message": _MESSAGE}),
                                 autoescape=True, undefined=jinja2.StrictUndefined)
        self._form, self._post, self._message = (env.get_template(n) for n in ("form", "post", "message"))

    def form(self, *, action: str, csrf: str, pending: str = "", username: str = "", error: str = "") -> str:
        return self._form.render(m=self.messages, title=self.title, action=action, csrf=csrf, pending=pending,
                                 username=username, error=self.messages[error] if error else "")

    def post(self, url: str, fields: list[tuple[str, str]]) -> str:
        return self._post.render(m=self.messages, title=self.messages["continue"], url=url, fields=fields)

    def message(self, key: str, *, alert: bool = False, reference: str = "", logout: str = "", csrf: str = "",
                **values: str) -> str:
        # Each ``{name}`` is replaced, and nothing else is read in the text: an operator's string
        # is not a format string (``signed_in: "Angemeldet als {benutzer}"`` or a lone ``}``
        # passed the configuration check and made every "signed in" page a 500).
        text = self.messages[key]
        for name, value in values.items():
            text = text.replace("{" + name + "}", value)
        return self._message.render(m=self.messages, title=self.title, text=text, alert=alert,
                                    reference=reference, logout=logout, csrf=csrf)
