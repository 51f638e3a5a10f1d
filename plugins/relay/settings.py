"""The ``relay:`` section of conf.d, as a typed model (see docs/connector.md)."""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from gateway import ConfigPath, PluginSettings, Secret
from gateway.settings import redis_url

__all__ = ["MAX_CERTIFICATE_LIFETIME", "MAX_TICKET_LIFETIME", "RedisSettings", "RelaySettings"]

DAY = 86400.0
#: The longest a ticket stays usable (``ticket_lifetime``, ``authgw relay ticket --lifetime``): a
#: ticket is a bearer secret for one enrolment, made when the connector is about to be set up.
MAX_TICKET_LIFETIME = 30 * DAY
#: The longest connector certificate (``certificate_lifetime``): a year, well inside the relay
#: CA's ten; connectors renew over the link at two thirds of it. Unbounded, ``1e9`` outlived the
#: CA and ``3e11`` overflowed the signing (after the ticket was used up; review of time).
MAX_CERTIFICATE_LIFETIME = 365 * DAY


class RedisSettings(PluginSettings):
    """State shared by several relay instances (tickets, registry, revocations, routing)."""

    url: str = Field(pattern=r"^rediss?://", description="`redis://HOST:PORT/DB` or `rediss://`; no password in it")
    password: Secret | None = Field(None, description="`{env: NAME}` or `{file: PATH}`")
    key_prefix: str = Field("authgw:relay:", min_length=1, max_length=100, description="prepended to every key")
    timeout: float = Field(2.0, gt=0, le=30, description="seconds for connecting and for each command")

    @field_validator("url")
    @classmethod
    def _no_inline_password(cls, value: str) -> str:
        return redis_url(value)


class RelaySettings(PluginSettings):
    """The relay: connectors enrol and hold their links here; the chain step `relay` forwards."""

    connection: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$",
                            description="the connection whose connectors the chain step `relay` asks")
    listen: str = Field(description="`HOST:PORT` of the TLS listener for enrolment (`/p/TOKEN`) and the link (`/link`)")
    public_url: str = Field(description="`https://HOST[:PORT]` connectors reach that listener at "
                            "(ticket URLs and the link URL start with it)")
    public_names: list[str] = Field([], description="names in the listener's certificate when the relay issues it "
                                    "itself; default: the host of `public_url`")
    certificate: ConfigPath | None = Field(None, description="listener certificate (PEM); default: issued by the relay CA")
    key: ConfigPath | None = Field(None, description="its private key (PEM, 0600)")
    ticket_lifetime: float = Field(86400.0, gt=0, le=MAX_TICKET_LIFETIME,
                                   description="seconds a ticket stays usable (at most 30 days)")
    certificate_lifetime: float = Field(90 * 86400.0, ge=1, le=MAX_CERTIFICATE_LIFETIME,
                                        description="seconds a connector certificate is valid (at most a year, and "
                                        "never past the relay CA's end); connectors renew at two thirds of it")
    ping_interval: float = Field(5.0, ge=0.1, le=60, description="seconds of silence on a link before the relay "
                               "pings it; a ping not answered within half as long closes the link")
    max_in_flight: int = Field(64, ge=1, description="requests one link carries at once")
    relink_wait: float = Field(3.0, ge=0, le=30, description="seconds after the relay loses a link during which "
                               "a login with no link to go to waits for its connector to dial again (0: none)")
    max_clock_skew: float = Field(30.0, ge=0, le=300, description="seconds of clock difference with a connector "
                                  "tolerated on the deadlines of its requests (hello, renew, drain)")
    redis: RedisSettings | None = Field(None, description="share state between relay instances (absent: SQLite "
                                        "in the state directory, one instance)")
    answered_names: Literal["same", "any"] = Field(
        "same", description="`same`: a connector's identity must name the user asked for (in any case; or "
        "`alice` for `alice@corp.example` or `CORP\\alice`, or `alice@corp.example` for `alice`), else the login "
        "is refused (`relay.identity_mismatch`); "
        "`any`: the connection's directory signs login names in as other account names (an e-mail address as "
        "`jsmith`), and its connectors' answers are taken as they come")

    @field_validator("public_url")
    @classmethod
    def _https(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme != "https" or not parts.hostname or parts.path not in ("", "/") or parts.query:
            raise ValueError("expected https://HOST[:PORT] (the link is TLS only)")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _key_with_certificate(self) -> RelaySettings:
        if (self.certificate is None) != (self.key is None):
            raise ValueError("`certificate` and `key` go together")
        return self

    @property
    def names(self) -> list[str]:
        return self.public_names or [urlsplit(self.public_url).hostname]
