"""``cache``: logins keep working when the directory is down, and repeat logins are fast.

Not a chain step: enabled with ``plugins: [cache]`` in ``gateway.yaml``. Two jobs.

Offline logins (a ``wrapper=True`` around the whole chain; it sees the folded decision)
    decides, only when the folded decision is ``UNAVAILABLE`` and the attempt carries a
    password: ``SUCCESS`` with ``from_cache`` (reason ``cache.offline``) for the right password
    of a cached user; ``INVALID_CREDENTIALS`` (``cache.invalid_password``) for a wrong one;
    ``ACCOUNT_STATE`` (``cache.too_many_failures``) after ``max_offline_failures`` wrong ones.
    Learns from live password successes of the steps in ``methods``, except a success whose
    identity carries a ``password_state`` (a ppolicy grace login: the directory counts each
    one), which forgets the user instead; forgets a user on a live
    ``INVALID_CREDENTIALS``, ``ACCOUNT_STATE`` or ``USER_NOT_FOUND``, under any name of the
    account: a refused name with no entry of its own (a mail never used to log in) reaches the
    account the refusing step named in the attempt's stash (``REFUSED_ACCOUNT_KEY``; the LDAP plugin
    names the entry its directory refused), else the one that step's ``gateway_lookup_user``
    finds.
Refused accounts on every path (a ``wrapper=True`` around ``gateway_lookup_user``)
    forgets a user's offline entry and this process's hot entries whenever the directory's
    answer reports the account refused (``Identity.refusal``), or when no plugin knows the user
    and the step that proved the entry was asked (a deleted account): Kerberos and certificate
    refusals carry no password username, and the cached password must die with the account.
    A plugin that cannot look anyone up (``looks_up_users = False``: the ldap plugin without a
    service account) is not counted among the directories that do not know the user.
Hot cache (``gateway_precheck``, before the chain; off by default)
    answers ``SUCCESS`` with ``from_cache`` (reason ``cache.hot``) for the exact credentials,
    client and front door of a live success less than ``hot.ttl`` seconds old. The answer
    stands in for the step that proved the identity only: the steps before it (policies such
    as a deny list) and every wrapper under ``plugins:`` still see the attempt.
Abstains
    (leaves the decision as it is) for attempts without a password, for Kerberos and
    certificate logins, for unknown, expired or unreadable entries, when the store is down,
    and for everything when ``enabled: false``.
Settings (``cache:`` in conf.d; docs/plugins/cache.md)
    ``enabled``, ``store`` (``sqlite``|``redis``), ``sqlite: {path, busy_timeout}``,
    ``redis: {url, username, password, key_prefix, timeout, ca_file}``, ``max_age``,
    ``max_offline_failures``, ``methods``, ``usernames`` (``exact``|``casefold``), ``pepper``,
    ``encryption_key``, ``refresh_after``, ``hash_concurrency``, ``argon2``,
    ``hot: {enabled, ttl, max_entries}``. From the core: ``health.probe_interval`` (a Redis store
    is pinged; while the store answers and holds entries it is a ``fallback`` that keeps
    ``/readyz`` true when the chain's steps are down).
Commands
    ``authgw cache list``, ``authgw cache show USER``, ``authgw cache purge [USER] [--expired]``.
"""

from __future__ import annotations

import os
import stat
import time

from gateway import (
    Attempt,
    BackendUnavailable,
    CheckResult,
    Command,
    ComponentState,
    Decision,
    Identity,
    Outcome,
    PluginContext,
    SelfTest,
    hookimpl,
    loop_safe,
)
from gateway.chain import PRECHECK_STEP
from gateway.model import address_text, canonical_username, folded_username
from gateway.plugins.cache.cli import cache_command
from gateway.plugins.cache.hot import HotCache
from gateway.plugins.cache.keys import KeyFileError, key_file_problem, sources
from gateway.plugins.cache.offline import ALIAS_HASH, OfflineCache, refused_account
from gateway.plugins.cache.settings import CacheSettings
from gateway.plugins.cache.store import SQLiteStore, StoreError
from gateway.plugins.cache.tally import EntryTally
from gateway.registry import answerer_revoked

__all__ = ["CachePlugin", "CacheSettings"]


class CachePlugin:
    """Registered as ``cache`` (listed under ``plugins:``, never in ``chain:``)."""

    Settings = CacheSettings

    def __init__(self, settings: CacheSettings, context: PluginContext) -> None:
        self.settings = settings
        self.name = context.name
        self.log = context.log
        self.hook = context.hook
        self.state_dir = context.state_dir
        self.offline = OfflineCache(settings, context.state_dir, name=self.name, log=self.log,
                                    revoked=self.answerer_revoked, account_of=self.account_of)
        hot = settings.hot
        self.hot = HotCache(hot.ttl, hot.max_entries) if settings.enabled and hot.enabled else None
        self.tally = EntryTally(self._count_entries, self.log)
        unknown = [m for m in settings.methods if m not in context.gateway.chain]
        if settings.enabled and unknown:
            self.log.warning("cache.methods names %s, which %s not in `chain:`; nothing from %s is cached",
                             ", ".join(unknown), "is" if len(unknown) == 1 else "are",
                             "it" if len(unknown) == 1 else "them")

    # -- life cycle ----------------------------------------------------------------------------------

    @hookimpl
    def gateway_startup(self) -> None:
        if not self.settings.enabled:
            return
        self.offline.keys(create=True)  # a key file others can read stops start-up (KeyFileError)
        try:
            if isinstance(self.offline.store, SQLiteStore):
                self.offline.purge_expired()
            else:
                self.offline.store.probe()
        except StoreError as exc:
            # Live logins do not need the cache: serve, say so, and retry at each use.
            self.offline.store_error = str(exc)
            self.log.error("credential cache store unavailable at start-up (offline logins off until it "
                           "answers): %s", exc)
        kept = self.offline.resume_forgets()
        if kept:
            self.log.warning("credential cache: %d refusals the store had not taken before this start are retried "
                             "(those users are not answered offline here meanwhile)", kept)
        self.tally.start()

    @hookimpl
    def gateway_shutdown(self) -> None:
        self.tally.stop()
        self.offline.close()

    def _count_entries(self) -> int:
        store = self.offline.store
        # SQLite counts in one statement; Redis has no per-prefix count, so its entries are scanned.
        # Rows of another login name only point at an account's entry: not counted.
        if isinstance(store, SQLiteStore):
            return store.count(ALIAS_HASH)
        return sum(1 for entry in store.scan() if entry.password_hash != ALIAS_HASH)

    # -- per attempt -----------------------------------------------------------------------------------

    def _hot_token(self, attempt: Attempt) -> bytes:
        credential = attempt.password
        assert credential is not None and self.hot is not None
        return self.hot.token(f"{attempt.front_door}\0{address_text(attempt.client)}", credential.username,
                              credential.password)

    def _hot_eligible(self, attempt: Attempt) -> bool:
        # Only plain password attempts: with a certificate or a Negotiate token too, an earlier
        # step could decide differently from the one whose success was remembered.
        return (self.hot is not None and attempt.password is not None
                and attempt.negotiate is None and attempt.certificate is None)

    def precheck(self, attempt: Attempt) -> Decision | None:
        """The hot cache's answer before the chain: a success, or None to run the chain."""
        if not self._hot_eligible(attempt):
            return None
        token = self._hot_token(attempt)
        hit = self.hot.lookup(token)
        if hit is None:
            return None
        if hit.answered_by:
            revoked = self.answerer_revoked(hit.answered_by)
            if revoked is not False:  # revoked since (forgotten), or cannot tell: the chain answers live
                if revoked:
                    self.hot.discard(token)
                return None
        if hit.step:  # stand in for the step that decided (a relayed identity names the connector's)
            attempt.stash[PRECHECK_STEP] = hit.step
        return hit.answer or self._hot_answer(hit.identity)

    def _hot_answer(self, identity: Identity, answered_by: str = "") -> Decision:
        # answered_by: the backend whose live answer this one repeats (the audit line names it)
        return Decision.allow(identity, step=self.name, reason="cache.hot", from_cache=True, answered_by=answered_by)

    def answerer_revoked(self, answered_by: str) -> bool | None:
        """Whether the backend *answered_by*, on whose word an entry rests, was revoked since:
        True, False, or None when that cannot be told (the entry is then not answered, nor
        forgotten)."""
        return answerer_revoked(self.hook, answered_by, self.log)

    def account_of(self, step: str, username: str) -> str | None:
        """The directory's own username of the account that the chain step *step* finds under
        *username* (its own ``gateway_lookup_user``, not the first plugin's: a refusal is that
        step's), its hot entries forgotten; None when the step has no lookup, knows no such
        user or cannot tell. Called for a refusal under a name that may be another of the
        account's (:meth:`OfflineCache.forget_account`)."""
        impl = next((impl for impl in self.hook.gateway_lookup_user.get_hookimpls()
                     if impl.plugin_name == step and not (impl.wrapper or impl.hookwrapper)), None)
        if impl is None:
            return None
        try:
            identity = impl.function(username)
        except BackendUnavailable as exc:
            self.log.warning("credential cache: %s could not name the account of a refused login name (%s); the "
                             "entry of that account under its own name stays until max_age or its own refusal",
                             step, exc)
            return None
        except Exception:  # never turn the directory's refusal into an error
            self.log.exception("credential cache: looking up the account of a refused login name failed")
            return None
        if not isinstance(identity, Identity) or not identity.username:
            return None
        if self.hot is not None:
            self.hot.forget_user(folded_username(identity.username))
        return identity.username

    def pointed_account(self, attempt: Attempt, step: str) -> str | None:
        """The account whose other name the attempt's username is, by its pointer row that *step*
        proved (:meth:`OfflineCache.remember`), or None: no such row, or the store cannot tell.

        For a refusal for account state that names no account: with ``direct_bind`` and no
        service account, AD refuses a disabled account's bind outright (``data 533``), so the
        LDAP plugin reads no entry and cannot name it, and has no lookup. Refused under
        ``dana.jones`` (a UPN), Dana's hot entries under ``dana`` answered 200 for ``hot.ttl``
        (item left by the last stop); the offline row was forgotten through this pointer."""
        credential = attempt.password
        if credential is None or not credential.username:
            return None
        try:
            return self.offline.pointed_account(credential.username, step)
        except (StoreError, KeyFileError) as exc:
            self.log.warning("credential cache: the account of a name refused for account state could not be read "
                             "(%s); that account's hot entries under its own name stay until hot.ttl", exc)
            return None

    @hookimpl
    def gateway_precheck(self, attempt: Attempt) -> Decision | None:
        return self.precheck(attempt)

    # loop_safe: for a hot hit (its own from_cache answer, or an ERROR deny) nothing below
    # touches the store, so a hit needs no chain thread (gateway/chain.py).
    @loop_safe
    @hookimpl(wrapper=True)
    def gateway_authenticate(self, attempt: Attempt):
        decision = yield
        if not self.settings.enabled:
            return decision
        try:
            if decision.from_cache:  # a hot hit: nothing to learn or forget, the store untouched
                return decision
            if decision.success and decision.identity is not None and decision.identity.password_state:
                # A success with a password the directory reports expired: a grace login (slapd's
                # pwdGraceAuthNLimit), which the directory counts. Neither kept nor repeated, or an
                # expired password would sign in past the limit (hot) or until max_age (offline);
                # a row learned before it expired goes too, as a lookup's password state ends it.
                if attempt.password is not None and decision.step in self.settings.methods:
                    self.forget_refused(attempt.password.username, decision.identity.username)
                return decision
            if self._hot_eligible(attempt) and self.offline.cacheable(attempt, decision):
                # Forgotten under the directory's own username too: a refusal of the account seen
                # under it (another login name, a Kerberos or certificate lookup) ends this hit.
                account = decision.identity.username
                self.hot.put(self._hot_token(attempt), attempt.user_key, decision.identity, decision.step,
                             self._hot_answer(decision.identity, decision.answered_by), decision.answered_by,
                             also=(folded_username(account),) if account else ())
            account = refused_account(attempt, decision.step) if not decision.success else None
            if account is None and decision.outcome is Outcome.ACCOUNT_STATE and self.hot is not None:
                # read before after_chain forgets the typed name's row, the pointer included
                account = self.pointed_account(attempt, decision.step)
            if account is not None and self.hot is not None:
                # The account the step's directory refused, named by the step (another name of
                # it may have been typed) or by the typed name's pointer row: its hot entries end
                # with the refusal, as auth_finished ends the typed name's.
                self.hot.forget_user(folded_username(account))
            self.tally.changed()  # it may have learned or forgotten a user: recount on the tally's thread
            return self.offline.after_chain(attempt, decision)
        except Exception:  # the cache must never turn a live decision into an error
            self.log.exception("credential cache failed on attempt %s; the chain's decision stands",
                               attempt.request_id)
            return decision

    @hookimpl(wrapper=True)
    def gateway_lookup_user(self, username: str):
        # Kerberos and certificate logins learn the account's state only here, and their
        # refusal carries no password username for after_chain to forget. The directory's word
        # that an account may not log in (disabled, locked, expired, or its password expired)
        # is the moment the cached password stops being one the directory would accept, so
        # it is forgotten now, whichever path asked (docs/plugins/cache.md, "Forgetting").
        identity = yield  # BackendUnavailable (the directory cannot tell) passes through: nothing forgotten
        if not self.settings.enabled:
            return identity
        if identity is None:
            self.forget_unknown(username)
        elif identity.refusal(password_state_refuses=True):
            self.forget_refused(username, identity.username)
        return identity

    def forget_unknown(self, username: str) -> None:
        """Every directory answered the lookup and none knows *username* (``None`` from each,
        none unavailable): forget the user's entry if the step that proved it was among them,
        as a password attempt's ``USER_NOT_FOUND`` does. A deleted account's password must not
        keep working offline until ``max_age``."""
        asked = {impl.plugin_name for impl in self.hook.gateway_lookup_user.get_hookimpls()
                 if not (impl.wrapper or impl.hookwrapper) and _looks_up_users(impl.plugin)}
        try:
            step = self.offline.proved_by(canonical_username(username)) if username else None
        except Exception:  # never turn the directory's answer into an error
            self.log.exception("credential cache: reading the entry of a user no directory knows failed")
            return
        if step is None or step not in asked:
            return
        name = canonical_username(username)
        try:
            # the row may be another user's whose name only folds like this one (ß as ss): kept
            self.offline.forget_unknown(name)
        except Exception:  # never turn the directory's answer into an error
            self.log.exception("credential cache: forgetting an account no directory knows failed")
        if self.hot is not None:
            self.hot.forget_user(folded_username(name))
        self.tally.changed()

    def forget_refused(self, *names: str) -> None:
        """Forget the offline entry and this process's hot entries of every spelling given."""
        for name in dict.fromkeys(canonical_username(n) for n in names if n):
            try:
                self.offline.forget(name)
            except Exception:  # never turn the directory's answer into an error
                self.log.exception("credential cache: forgetting a refused account failed")
            if self.hot is not None:
                self.hot.forget_user(folded_username(name))
        self.tally.changed()

    @hookimpl
    def gateway_auth_finished(self, attempt: Attempt, decision: Decision) -> None:
        # Any failure for a user clears that user's hot entries, whatever password they hold and
        # however the name was spelled (Attempt.user_key folds case too).
        if self.hot is not None and not decision.success and attempt.user_key is not None:
            self.hot.forget_user(attempt.user_key)

    # -- operators -------------------------------------------------------------------------------------

    @hookimpl
    def gateway_commands(self) -> list[Command]:
        return [cache_command(self.offline)]

    @hookimpl
    def gateway_probe(self) -> None:
        """A Redis store is shared and remote: PING it every ``health.probe_interval`` so that
        ``/readyz`` knows it is down (or back) before an offline answer is needed. SQLite is a
        local file whose errors the next operation reports. Refusals the store did not take,
        kept in the state directory by any worker, are retried (:meth:`OfflineCache.resume_forgets`)."""
        if not self.settings.enabled:
            return
        self.offline.resume_forgets()
        if self.settings.store != "redis":
            return
        try:
            self.offline.store.ping()
        except StoreError as exc:
            self.offline.store_error = str(exc)
            return
        if self.offline.store_error is not None:
            self.offline.store_error = None
            self.tally.changed()  # a restarted Redis may have lost its entries: count again

    @hookimpl
    def gateway_readiness(self) -> list[ComponentState]:
        if not self.settings.enabled:
            return [ComponentState(f"{self.name}.store", True, "caching is off (enabled: false)")]
        where = self.offline.location
        error = self.offline.store_error
        hot = f"; hot cache {len(self.hot)} entries" if self.hot is not None else ""
        # Memory only (readiness does no I/O): the tally's last count and the last offline answer.
        counted = self.tally.last
        entries = (f"; {counted[0]} offline entries (counted {_utc(counted[1])})" if counted
                   else "; offline entries not counted yet")
        answered = self.offline.last_offline_answer
        pending = self.offline.pending_forgets()
        waiting = f"; {pending} refused users not yet deleted from the store (retried)" if pending else ""
        offline = f"; last offline answer {_utc(answered)} UTC" if answered is not None else "; no offline answer yet"
        # A fallback for the chain's steps (docs/design.md point 16) only while it holds users
        # whose offline answer it could give.
        # A store's errors name it already (StoreError: "sqlite:/path: ..."): not said twice.
        said = (error if error.startswith(f"{where}:") else f"{where}: {error}") if error else f"{where}: ok"
        return [ComponentState(f"{self.name}.store", error is None, said + entries + offline + waiting + hot,
                               fallback=error is None and counted is not None and counted[0] > 0)]

    @hookimpl
    def gateway_selftests(self) -> list[SelfTest]:
        if not self.settings.enabled:
            return []
        return [SelfTest(f"{self.name}.keys", self._test_keys, prerequisite=True),
                SelfTest(f"{self.name}.store", self._test_store, prerequisite=True),
                SelfTest(f"{self.name}.argon2", self._test_argon2)]

    def _test_keys(self) -> CheckResult:
        found = []
        for source in sources(self.state_dir, self.settings.pepper, self.settings.encryption_key):
            if source.secret is not None:
                found.append(source.describe())
                continue
            problem = key_file_problem(source.path)
            if problem == "missing":
                return CheckResult.warn(f"{source.path} does not exist yet",
                                        "it is created (0600) when the gateway starts")
            if problem:
                return CheckResult.fail(f"{source.path}: {problem}", f"chmod 600 {source.path}")
            found.append(source.describe())
        try:
            kid = self.offline.keys(create=False).kid
        except KeyFileError as exc:
            return CheckResult.fail(str(exc), "restore the key file from a backup, or purge the cache and delete it")
        return CheckResult.ok(f"{'; '.join(found)} (key id {kid})")

    def _test_store(self) -> CheckResult:
        try:
            detail = self.offline.store.probe()
        except StoreError as exc:
            hint = ("check redis.url, redis.password and that Redis answers from this host"
                    if self.settings.store == "redis" else "check that the state directory is writable")
            if getattr(self.offline.store, "unusable", None):
                hint = "CONFIG SET maxmemory-policy noeviction (and in redis.conf), or give this Redis no maxmemory"
            return CheckResult.fail(str(exc), hint)
        store = self.offline.store
        if isinstance(store, SQLiteStore):
            open_files = []
            for suffix in ("", "-wal", "-shm"):
                path = store.path.with_name(store.path.name + suffix)
                if path.exists() and stat.S_IMODE(os.stat(path).st_mode) & 0o077:
                    open_files.append(f"{path} ({stat.S_IMODE(os.stat(path).st_mode):o})")
            if open_files:
                return CheckResult.warn(f"{detail}; readable by others: {', '.join(open_files)}",
                                        f"chmod 600 {store.path}*")
        return CheckResult.ok(detail)

    def _test_argon2(self) -> CheckResult:
        a = self.settings.argon2
        started = time.perf_counter()
        encoded = self.offline.hasher.hash(b"authgw self-test")
        self.offline.hasher.verify(encoded, b"authgw self-test")
        per = (time.perf_counter() - started) / 2 * 1000
        return CheckResult.ok(f"argon2id m={a.memory_cost} KiB t={a.time_cost} p={a.parallelism}: "
                              f"{per:.0f} ms per hash (OWASP minimum m=19456 t=2 p=1)")


def _looks_up_users(plugin: object) -> bool:
    """Whether *plugin*'s ``None`` to a lookup means "no such user". A plugin that cannot look
    anyone up says ``looks_up_users = False`` (the ldap plugin with ``direct_bind`` and no
    service account): its ``None`` is no word that an account is gone, and a Kerberos login
    or a login session's recheck forgot the password that step had proved (review of the ldap
    plugin)."""
    try:
        return getattr(plugin, "looks_up_users", True) is not False
    except Exception:  # noqa: BLE001 - a plugin's property that raises says nothing: as before
        return True


def _utc(stamp: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(stamp))
