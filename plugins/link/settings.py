"""The ``link:`` section of conf.d, as a typed model (see docs/connector.md)."""

from __future__ import annotations

from pydantic import Field, model_validator

from gateway import PluginSettings, Secret

__all__ = ["LinkSettings"]


class LinkSettings(PluginSettings):
    """The connector's outbound link to a relay. Where to connect comes from enrolment
    (``authgw link enroll TICKET_URL``), kept in the state directory, not here."""

    ping_interval: float = Field(5.0, ge=0.1, le=60, description="seconds between WebSocket pings; a ping "
                                 "not answered within half as long closes the link, which is dialled again")
    backoff_initial: float = Field(0.5, gt=0, le=60, description="seconds before the first re-dial (jittered)")
    backoff_max: float = Field(30.0, gt=0, le=3600, description="longest wait between re-dials (jittered)")
    dial_timeout: float = Field(15.0, gt=0, le=300, description="seconds a dial may take to open the link (TCP, "
                                "the proxy's CONNECT, TLS, the WebSocket upgrade) before it is given up and "
                                "dialled again")
    max_clock_skew: float = Field(5.0, ge=0, le=300, description="seconds of clock difference with the relay "
                                  "tolerated on request deadlines; `authgw check` warns above it")
    max_concurrent: int = Field(64, ge=1, le=1024, description="requests the connector works on at once")
    proxy: str | None = Field(None, pattern=r"^https?://[^@]+$", description="HTTP proxy for the link (CONNECT); "
                              "default: `HTTPS_PROXY`/`NO_PROXY` from the environment; no credentials in it")
    proxy_username: str | None = Field(None, description="proxy user (Basic), with `proxy_password`")
    proxy_password: Secret | None = Field(None, description="`{env: NAME}` or `{file: PATH}`")

    @model_validator(mode="after")
    def _proxy_credentials(self) -> LinkSettings:
        if (self.proxy_username is None) != (self.proxy_password is None):
            raise ValueError("`proxy_username` and `proxy_password` go together")
        return self
