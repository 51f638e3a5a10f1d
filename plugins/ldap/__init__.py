"""``ldap``: passwords checked against Active Directory or any LDAPv3 directory (ldap3).

Search, then bind: a service account finds exactly one entry for the username under
``base_dn``, then that entry's DN binds with the password on a pooled connection. Or, without a
service account, ``direct_bind`` binds a DN or UPN built from the username. Also answers
``gateway_lookup_user`` so Kerberos and certificate logins get the directory profile (and
``gateway_search_users``/``gateway_list_groups``, :mod:`~gateway.plugins.ldap.search`), with the
account state read from the entry (:mod:`~gateway.plugins.ldap.accountstate`: disabled, locked,
expired accounts are reported with the password path's reason codes, never as usable).

Decides
    password attempts whose user the directory holds: ``SUCCESS`` (identity with the mapped
    attributes and groups; a ppolicy grace login's with ``password_state``
    ``ldap.password_expired``, so the credential cache does not keep it),
    ``INVALID_CREDENTIALS`` (``ldap.invalid_password``, ``ldap.ambiguous_user``,
    ``ldap.bind_refused``; ``ldap.empty_password`` and
    ``ldap.nul_in_password`` before any network call: an empty simple bind is an anonymous
    bind, RFC 4513 section 5.1.2, and a server in C may take a NUL for the password's end),
    ``ACCOUNT_STATE`` from AD's bind sub-codes
    (``ldap.locked``, ``ldap.disabled``, ``ldap.password_expired``, ...; see
    :mod:`~gateway.plugins.ldap.adcodes`), or after a successful bind from the entry's state
    attributes (``ldap.disabled``, ``ldap.locked``, ``ldap.account_expired``), and
    ``ldap.account_state_unreadable`` when an AD entry came without ``userAccountControl`` and no
    bind vouched for the account (a lookup; a bind AD refused that ``allow_expired_password`` or
    ``allow_must_change_password`` lets through). A refusal of a found entry's bind or state
    names that account in the attempt's stash (``REFUSED_ACCOUNT_KEY``) for the credential cache.
Abstains
    when the attempt has no password; when the username is empty or longer than
    ``max_username_length``, noting ``USER_NOT_FOUND``; when no entry matches,
    noting ``USER_NOT_FOUND`` (``ldap.user_not_found``); when no server answers in time, noting
    ``UNAVAILABLE`` (``ldap.unavailable``, ``ldap.timeout``, ``ldap.service_bind_failed``).
Settings (``ldap:`` in conf.d)
    ``preset`` (active_directory, openldap, freeipa), ``servers``, ``start_tls``, ``insecure``,
    ``ca_file``, ``bind_dn``, ``bind_password``, ``base_dn``, ``user_filter``, ``scope``,
    ``direct_bind``, ``attributes``, ``groups`` (``source``, ``nested``, ``max_depth``,
    ``max_groups``, ``base_dn``, ``filter``, ``nested_filter``, ``object_filter``,
    ``name_attribute``, ``cache_ttl``, ``cache_size``, ``page_size``), ``connect_timeout``,
    ``receive_timeout``, ``backoff``, ``pool_size``, ``idle_timeout``, ``allow_expired_password``,
    ``allow_must_change_password``, ``ppolicy_default``, ``max_username_length``, ``test_login``. Reference:
    docs/plugins/ldap.md. From the core: ``health.probe_interval`` (every server is probed,
    service bind included, by ``gateway_probe`` on the core's health round at start-up and
    then periodically; the core logs state changes at WARNING and ``/readyz`` reflects them
    before any login fails).
"""

from __future__ import annotations

import ssl
import time

import ldap3

from gateway import (
    Attempt,
    BackendUnavailable,
    ComponentState,
    ConfigError,
    Decision,
    Identity,
    Outcome,
    PluginContext,
    REFUSED_ACCOUNT_KEY,
    SelfTest,
    UserPage,
    hookimpl,
)
from gateway.plugins.ldap.directory import Directory
from gateway.plugins.ldap.groups import GroupResolver
from gateway.plugins.ldap.pool import DirectoryUnavailable, Pool
from gateway.plugins.ldap.search import UserSearch
from gateway.plugins.ldap.selftests import selftests
from gateway.plugins.ldap.settings import LdapSettings, deadline_problems, resolve

__all__ = ["LdapPlugin"]


class LdapPlugin:
    """Registered as ``ldap``."""

    Settings = LdapSettings
    #: What this step checks (readiness: which steps can serve password logins).
    credentials = ("password",)
    #: Down or hung, this step notes UNAVAILABLE and the chain goes on (gateway/steplimit.py).
    passes_when_unavailable = True
    #: Its waits for the directory go through gateway.aio (link.py, and ldap3's connecting on a
    #: thread), bounded by the attempt's deadline, and it holds no lock across one: a chain of
    #: such steps runs on the event loop, without a thread hand-off per login.
    loop_capable = True

    def __init__(self, settings: LdapSettings, context: PluginContext) -> None:
        self.settings = settings
        self.name = context.name
        self.log = context.log
        self.context_deadline = context.gateway.deadline
        self.challenge = f'Basic realm="{context.gateway.realm}", charset="UTF-8"'
        # LdapSettings._check reports this with every other problem when the configuration is
        # validated; settings built without that context (an embedding program) are checked here.
        problems = deadline_problems(settings, context.gateway.deadline)
        if problems:
            raise ConfigError([f"{self.name}.{problem.key}: {problem}" for problem in problems])
        self.resolved = resolve(settings)
        tls = None
        if settings.start_tls or any(u.startswith("ldaps://") for u in settings.servers):
            # ldap3 verifies nothing unless told (DESIGN.md section 9): chain and host name.
            tls = ldap3.Tls(validate=ssl.CERT_REQUIRED,
                            ca_certs_file=str(settings.ca_file) if settings.ca_file else None)
        service = (settings.bind_dn, settings.bind_password.reveal()) if settings.bind_dn and settings.bind_password else None
        self.pool = Pool(settings.servers, tls=tls, start_tls=settings.start_tls,
                         connect_timeout=settings.connect_timeout, receive_timeout=settings.receive_timeout,
                         backoff=settings.backoff, pool_size=settings.pool_size or context.gateway.threads,
                         idle_timeout=settings.idle_timeout, service=service, log=self.log)
        self.groups = GroupResolver(self.resolved, settings.groups, self.log)
        self.directory = Directory(self.name, settings, self.resolved, self.pool, self.groups, self.log)
        #: Without a service account nobody searches: every lookup answers None, which says
        #: nothing of the user (the credential cache must not take it for a deleted account).
        self.looks_up_users = settings.bind_dn is not None
        self.search = UserSearch(self.directory)
        plain = [u for u in settings.servers if u.startswith("ldap://")] if not settings.start_tls else []
        if plain:
            self.log.warning("%s: plaintext LDAP to %s (insecure: true): passwords cross the network readable",
                             self.name, ", ".join(plain))

    # -- hooks -----------------------------------------------------------------------------------

    @hookimpl
    def gateway_authenticate(self, attempt: Attempt) -> Decision | None:
        credential = attempt.password
        if credential is None:
            return None
        username = credential.username
        # RFC 4513 section 5.1.2: a simple bind with an empty password is an unauthenticated
        # bind that servers report as success. Refuse it here, before any network traffic.
        if not credential.password:
            return Decision.deny(Outcome.INVALID_CREDENTIALS, step=self.name, reason="ldap.empty_password")
        # A server written in C may read the password as a NUL-terminated string: "\0" would be
        # the unauthenticated bind above, and "right\0anything" the right password.
        if "\x00" in credential.password:
            return Decision.deny(Outcome.INVALID_CREDENTIALS, step=self.name, reason="ldap.nul_in_password")
        if not username or len(username) > self.settings.max_username_length:
            # A code of its own: refused at once, it must not share the samples of a search's
            # user_not_found, or it would pull that kind's failure floor down (gateway/failtiming.py).
            attempt.note(Outcome.USER_NOT_FOUND, step=self.name, reason="ldap.username_too_long")
            return None
        try:
            verdict = self.directory.login(username, credential.password, attempt.deadline)
        except DirectoryUnavailable as exc:
            self.log.debug("directory unavailable for %r (attempt %s): %s", username, attempt.request_id, exc)
            attempt.note(Outcome.UNAVAILABLE, step=self.name, reason=exc.reason)
            return None
        if verdict.outcome is Outcome.SUCCESS:
            assert verdict.identity is not None
            return Decision.allow(verdict.identity, step=self.name)
        if verdict.outcome is Outcome.USER_NOT_FOUND:
            attempt.note(Outcome.USER_NOT_FOUND, step=self.name, reason=verdict.reason)
            return None
        # The account whose bind or state the directory refused (never one only searched for):
        # the credential cache forgets its rows under its own name, asking no second search.
        if verdict.account:
            attempt.stash.setdefault(REFUSED_ACCOUNT_KEY, {})[self.name] = verdict.account
        return Decision.deny(verdict.outcome, step=self.name, reason=verdict.reason)

    @hookimpl
    def gateway_lookup_user(self, username: str) -> Identity | None:
        if self.settings.bind_dn is None or not username or len(username) > self.settings.max_username_length:
            return None  # without a service account there is nobody to search as
        try:
            return self.directory.lookup(username, time.monotonic() + self.context_deadline)
        except DirectoryUnavailable as exc:
            raise BackendUnavailable(exc.reason, exc.detail) from None

    @hookimpl
    def gateway_search_users(self, query: str, limit: int, cursor: str | None) -> UserPage | None:
        if self.settings.bind_dn is None:
            return None  # without a service account there is nobody to search as
        try:
            return self.search.search(query, limit, cursor, time.monotonic() + self.context_deadline)
        except DirectoryUnavailable as exc:
            raise BackendUnavailable(exc.reason, exc.detail) from None

    @hookimpl
    def gateway_list_groups(self, username: str) -> list[str] | None:
        if self.settings.bind_dn is None or not username or len(username) > self.settings.max_username_length:
            return None
        try:
            return self.search.list_groups(username, time.monotonic() + self.context_deadline)
        except DirectoryUnavailable as exc:
            raise BackendUnavailable(exc.reason, exc.detail) from None

    @hookimpl
    def gateway_challenges(self, attempt: Attempt) -> str:
        return self.challenge

    @hookimpl
    def gateway_readiness(self) -> list[ComponentState]:
        return [ComponentState(f"{self.name}.server[{server.url}]", ready, state)
                for server, state, ready in self.pool.snapshot()]

    @hookimpl
    def gateway_selftests(self) -> list[SelfTest]:
        return selftests(self)

    @hookimpl
    def gateway_probe(self) -> None:
        """Every server, service bind included (the core's health round logs the changes)."""
        self.pool.probe()

    @hookimpl
    def gateway_shutdown(self) -> None:
        self.pool.close()
