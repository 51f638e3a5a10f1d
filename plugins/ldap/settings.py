"""Settings of the ``ldap`` plugin, and the presets that fill in what most operators never write.

A preset supplies the user filter, the attribute-to-claim mapping, the subject attribute and
the group strategy of a directory family; any key the operator sets wins over the preset.
:func:`resolve` merges both into one frozen :class:`Resolved` record at start-up, so the hot
path never looks at the preset again. :meth:`LdapSettings._check` collects every cross-field,
CA file and filter problem and raises them together (:class:`gateway.InvalidKeys`).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationInfo, field_validator, model_validator

from gateway import ConfigPath, PluginSettings, Secret
from gateway.plugins.ldap import wire
from gateway.plugins.ldap.escaping import fill
from gateway.settings import InvalidKey, InvalidKeys, shown_url

__all__ = ["GroupSettings", "LdapSettings", "PRESETS", "Preset", "Resolved", "TestLogin", "deadline_problems",
           "resolve"]

#: LDAP_MATCHING_RULE_IN_CHAIN (MS-ADTS 3.1.1.3.4.4.3): AD walks nested membership server-side.
IN_CHAIN = "1.2.840.113556.1.4.1941"


@dataclass(frozen=True, slots=True)
class Preset:
    user_filter: str
    username: str
    display_name: tuple[str, ...]
    email: str
    subject: str
    #: ``memberof``: the user's memberOf attribute; ``search``: a search for groups naming the user.
    group_source: str
    group_filter: str
    #: The query for the groups of a group (levels after the first); ``{dn}`` only.
    group_nested_filter: str
    group_object_filter: str
    #: AD resolves nesting itself with the in-chain rule; others are expanded level by level.
    in_chain: bool


PRESETS: dict[str, Preset] = {
    "active_directory": Preset(
        # objectCategory=person excludes computer accounts, which are objectClass=user too.
        user_filter="(&(objectCategory=person)(objectClass=user)"
                    "(|(sAMAccountName={username})(userPrincipalName={username})))",
        username="sAMAccountName",
        display_name=("displayName", "cn"),
        email="mail",
        subject="objectGUID",
        group_source="search",
        group_filter=f"(member:{IN_CHAIN}:={{dn}})",
        group_nested_filter="(member={dn})",
        group_object_filter="(objectClass=group)",
        in_chain=True,
    ),
    "openldap": Preset(
        user_filter="(&(objectClass=inetOrgPerson)(uid={username}))",
        username="uid",
        display_name=("displayName", "cn"),
        email="mail",
        subject="entryUUID",
        group_source="search",
        group_filter="(|(member={dn})(uniqueMember={dn})(memberUid={username}))",
        group_nested_filter="(|(member={dn})(uniqueMember={dn}))",
        group_object_filter="(|(objectClass=groupOfNames)(objectClass=groupOfUniqueNames)(objectClass=posixGroup))",
        in_chain=False,
    ),
    "freeipa": Preset(
        user_filter="(&(objectClass=person)(uid={username}))",
        username="uid",
        display_name=("displayName", "cn"),
        email="mail",
        subject="ipaUniqueID",
        # FreeIPA's memberOf already lists indirect memberships (its memberof plugin flattens).
        group_source="memberof",
        group_filter="(member={dn})",
        group_nested_filter="(member={dn})",
        group_object_filter="(objectClass=groupOfNames)",
        in_chain=False,
    ),
}


class GroupSettings(PluginSettings):
    """How the groups of a user are found (``ldap.groups`` in conf.d)."""

    source: Literal["memberof", "search", "none"] | None = Field(
        None, description="`memberof` (the user's memberOf), `search` (groups naming the user) or `none`; "
                          "default from the preset")
    nested: bool = Field(True, description="follow groups that are members of groups")
    max_depth: int = Field(8, ge=1, le=64, description="levels of nesting expanded when the server cannot "
                                                         "do it (not AD)")
    max_groups: int = Field(1000, ge=1, description="stop collecting after this many groups (logged once)")
    base_dn: str | None = Field(None, description="where groups live; default: `ldap.base_dn`")
    filter: str | None = Field(None, description="RFC 4515 filter with `{dn}` (the user's DN) and "
                                                 "`{username}`; default from the preset")
    nested_filter: str | None = Field(None, description="filter for the groups of a group (`{dn}`), used "
                                                        "level by level; default from the preset")
    object_filter: str | None = Field(None, description="what counts as a group, ANDed with the filters; "
                                                        "default from the preset")
    name_attribute: str = Field("cn", description="the attribute that names a group")
    cache_ttl: float = Field(300.0, ge=0, description="seconds a user's group list is reused; 0 disables")
    cache_size: int = Field(10000, ge=0, description="users the group cache holds at most (per worker)")
    page_size: int = Field(500, ge=1, le=100000, description="RFC 2696 page size of group searches")


class TestLogin(PluginSettings):
    """A real account that self-test 5 logs in with (``authgw check``)."""

    __test__ = False  # not a pytest class

    username: str = Field(min_length=1, description="an account that may log in")
    password: Secret = Field(description="its password, `{env: NAME}` or `{file: PATH}`")


class LdapSettings(PluginSettings):
    """``ldap:`` in conf.d. See docs/plugins/ldap.md for every key."""

    preset: Literal["active_directory", "openldap", "freeipa"] = Field(
        "openldap", description="defaults for the user filter, attribute mapping, subject and groups")
    servers: list[str] = Field(min_length=1, description="`ldaps://` or `ldap://` URLs, in order of "
                                                         "preference; the next one is used when one fails")
    start_tls: bool = Field(False, description="upgrade `ldap://` connections with StartTLS (RFC 4511 4.14)")
    insecure: bool = Field(False, description="allow plain `ldap://` without StartTLS (passwords cross the "
                                              "network readable); warned at start-up")
    ca_file: ConfigPath | None = Field(None, description="PEM bundle that verifies the servers' "
                                                         "certificates; default: the system store")
    bind_dn: str | None = Field(None, description="the service account that searches (AD: a DN or "
                                                  "`svc@corp.example.com`)")
    bind_password: Secret | None = Field(None, description="its password, `{env: NAME}` or `{file: PATH}`")
    base_dn: str = Field(min_length=1, description="where users are searched")
    user_filter: str | None = Field(None, description="RFC 4515 filter with `{username}` (escaped); default "
                                                      "from the preset")
    scope: Literal["subtree", "one"] = Field("subtree", description="search the whole subtree or one level")
    direct_bind: str | None = Field(None, description="bind without searching: a DN template "
                                                      "(`uid={username},ou=people,...`) or a UPN template "
                                                      "(`{username}@corp.example.com`)")
    attributes: dict[str, str | list[str]] = Field(
        {}, description="claim -> attribute (or list, first present wins); `username`, `display_name`, "
                        "`email`, `subject` fill the identity, other keys become claims; defaults from the preset")
    groups: GroupSettings = GroupSettings()
    connect_timeout: float = Field(1.5, gt=0, description="seconds to connect (TCP and TLS) to one server; "
                                                          "below `deadline`")
    receive_timeout: float = Field(2.5, gt=0, description="seconds one answer may take from its request, in all; "
                                   "below `deadline`")
    backoff: float = Field(30.0, ge=0, description="seconds a failed server is skipped (still tried when "
                                                   "no other server is left)")
    pool_size: int = Field(0, ge=0, description="idle connections kept per server and kind (service, bind); "
                                                "0: the gateway's `threads`")
    idle_timeout: float = Field(240.0, gt=0, description="idle connections older than this are closed, not "
                                                         "reused (AD drops them after 900 s)")
    allow_expired_password: bool = Field(False, description="AD 532: let a correct, expired password in "
                                                            "(claim `password_expired: true`); not ppolicy's "
                                                            "passwordExpired, a refusal by slapd")
    allow_must_change_password: bool = Field(False, description="AD 773, ppolicy changeAfterReset: let a correct "
                                                                "password that must be changed in (claim "
                                                                "`must_change_password: true`)")
    ppolicy_default: str | None = Field(None, min_length=1, description="OpenLDAP ppolicy: the DN of the overlay's default "
                                        "policy (slapd's `ppolicy_default`, `olcPPolicyDefault`): lookups judge the "
                                        "password age of users without `pwdPolicySubentry` by its `pwdMaxAge`")
    max_username_length: int = Field(256, ge=1, le=4096, description="longer usernames are not looked up")
    test_login: TestLogin | None = Field(None, description="an account for the optional login self-test")

    @field_validator("servers")
    @classmethod
    def _check_servers(cls, value: list[str]) -> list[str]:
        for url in value:
            # Never the URL as written in a message: it may hold a password (shown_url).
            parts = urlsplit(url)
            if "@" in parts.netloc:
                raise ValueError(f"{shown_url(url)}: no user name or password in the URL (it would be shown and "
                                 "logged); the service account is `bind_dn` and `bind_password`")
            if parts.scheme not in ("ldap", "ldaps") or not parts.hostname:
                raise ValueError(f"{shown_url(url)} is not an ldap:// or ldaps:// URL with a host")
            if parts.path not in ("", "/") or parts.query or parts.fragment:
                raise ValueError(f"{shown_url(url)}: give only scheme, host and port (base_dn is a setting of its own)")
            try:
                parts.port  # noqa: B018 - raises ValueError on a bad port
            except ValueError:
                raise ValueError(f"{shown_url(url)}: the port is not a number from 0 to 65535") from None
            try:
                # As the resolver will encode it: a label over 63 characters (or an empty one)
                # passed here and failed every connection with a UnicodeError, each login a
                # traceback and a refusal, the chain's later steps included (review of the console).
                if len(parts.hostname.encode("idna").rstrip(b".")) > 253:
                    raise UnicodeError("too long")
            except UnicodeError:
                raise ValueError(f"{shown_url(url)}: the host is not a valid DNS name (labels of 1 to 63 "
                                 "characters, 253 in all)") from None
        if len(set(value)) != len(value):
            raise ValueError("a server is listed twice")
        return value

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> LdapSettings:
        # Every independent problem is collected, so one run reports them all (issue 11 item 1).
        problems: list[ValueError] = []
        deadline = getattr(info.context, "deadline", None)
        if deadline is not None:
            problems += deadline_problems(self, deadline)
        plain = [u for u in self.servers if u.startswith("ldap://")]
        if plain and not self.start_tls and not self.insecure:
            problems.append(InvalidKey(f"servers.{self.servers.index(plain[0])}",
                                       f"{plain[0]} is plaintext: use ldaps://, set start_tls: true, or accept "
                                       "readable passwords on the network with insecure: true"))
        if self.start_tls and any(u.startswith("ldaps://") for u in self.servers):
            problems.append(InvalidKey("start_tls", "start_tls applies to ldap:// servers; ldaps:// is TLS already"))
        if (self.bind_dn is None) != (self.bind_password is None):
            problems.append(InvalidKey("bind_dn" if self.bind_dn is not None else "bind_password",
                                       "bind_dn and bind_password go together"))
        if self.direct_bind is not None and "{username}" not in self.direct_bind:
            problems.append(InvalidKey("direct_bind", "direct_bind must contain {username}"))
        if self.direct_bind is None and self.bind_dn is None:
            problems.append(ValueError("set bind_dn/bind_password (search, then bind) or direct_bind"))
        if self.user_filter is not None and "{username}" not in self.user_filter:
            problems.append(InvalidKey("user_filter", "user_filter must contain {username}"))
        # Checks that read a file or compile a filter run here too, not at start-up, so that they
        # are reported with the others above instead of only once those are fixed.
        uses_tls = self.start_tls or any(u.startswith("ldaps://") for u in self.servers)
        if uses_tls and self.ca_file is not None:
            try:
                ssl.create_default_context(cafile=str(self.ca_file))
            except (OSError, ssl.SSLError) as exc:
                problems.append(InvalidKey("ca_file", f"{self.ca_file} is not a readable PEM bundle "
                                                      f"({exc.__class__.__name__}: {exc})"))
        blamed = {p.key for p in problems if isinstance(p, InvalidKey)}
        problems.extend(p for p in filter_problems(resolve(self)) if p.key not in blamed)
        if problems:
            raise InvalidKeys(problems)
        return self


@dataclass(frozen=True, slots=True)
class Resolved:
    """Settings with the preset applied: what the hot path reads."""

    user_filter: str
    username_attr: str
    display_name_attrs: tuple[str, ...]
    email_attr: str
    subject_attr: str
    claims: tuple[tuple[str, tuple[str, ...]], ...]
    group_source: str
    group_filter: str
    group_nested_filter: str
    group_object_filter: str
    group_base: str
    in_chain: bool
    #: Attributes requested with the user search, computed once.
    user_attributes: tuple[str, ...]


def deadline_problems(settings: LdapSettings, deadline: float) -> list[InvalidKey]:
    """The timeouts that are not below the gateway's *deadline*: one LDAP operation would
    outlive the attempt waiting for it. Checked while validating (with every other problem) and
    again by the plugin for settings built without the gateway's deadline in their context."""
    return [InvalidKey(key, f"{getattr(settings, key)}s is not below the gateway's deadline ({deadline}s); "
                            "an attempt would end before the server could answer")
            for key in ("connect_timeout", "receive_timeout") if getattr(settings, key) >= deadline]


def filter_problems(r: Resolved) -> list[InvalidKey]:
    """Compile every filter template once with sample values: a typo stops start-up instead
    of making every login fail."""
    templates = {"user_filter": r.user_filter, "groups.filter": f"(&{r.group_object_filter}{r.group_filter})",
                 "groups.nested_filter": f"(&{r.group_object_filter}{r.group_nested_filter})"}
    problems = []
    for key, template in templates.items():
        try:
            wire.compile_filter(fill(template, username="sample", dn="cn=sample,dc=example"))
        except wire.FilterError as exc:
            problems.append(InvalidKey(key, f"{template!r} is not a valid RFC 4515 filter: {exc}"))
    return problems


def _attrs(value: str | list[str]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


def resolve(settings: LdapSettings) -> Resolved:
    preset = PRESETS[settings.preset]
    mapping = dict(settings.attributes)
    username = _attrs(mapping.pop("username", preset.username))[0]
    display = _attrs(mapping.pop("display_name", list(preset.display_name)))
    email = _attrs(mapping.pop("email", preset.email))[0]
    subject = _attrs(mapping.pop("subject", preset.subject))[0]
    claims = tuple((name, _attrs(attr)) for name, attr in sorted(mapping.items()))
    source = settings.groups.source or preset.group_source
    group_filter = settings.groups.filter or preset.group_filter
    # An explicit filter means the operator chose the group query; the in-chain rule applies only
    # when it is the one in use.
    in_chain = preset.in_chain and IN_CHAIN in group_filter
    if not settings.groups.nested and settings.groups.filter is None and preset.in_chain:
        group_filter, in_chain = "(member={dn})", False
    wanted = [username, *display, email, subject]
    for _, attrs in claims:
        wanted.extend(attrs)
    if source == "memberof":
        wanted.append("memberOf")
    seen: list[str] = []
    for attr in wanted:
        if attr and attr.lower() not in (s.lower() for s in seen):
            seen.append(attr)
    return Resolved(
        user_filter=settings.user_filter or preset.user_filter,
        username_attr=username,
        display_name_attrs=display,
        email_attr=email,
        subject_attr=subject,
        claims=claims,
        group_source=source,
        group_filter=group_filter,
        group_nested_filter=settings.groups.nested_filter or preset.group_nested_filter,
        group_object_filter=settings.groups.object_filter or preset.group_object_filter,
        group_base=settings.groups.base_dn or settings.base_dn,
        in_chain=in_chain,
        user_attributes=tuple(seen),
    )
