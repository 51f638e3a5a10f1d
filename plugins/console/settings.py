"""Settings of the ``console`` plugin (``console:`` in conf.d).

The console manages the directory settings and shows status, so it must not be reachable from
the network by accident: a listen address that is not loopback needs a TLS certificate and key,
and is refused at load time (with the file and line of ``listen``) otherwise.

``listen`` is an IP address, never a host name: a name such as ``localhost`` resolves to more
than one address (127.0.0.1 and ::1) while the console binds one of them, and the browser that
opens the printed link may try the other first — where another local user's server, bound to
the free one, receives the one-time token. With an IP literal the link names the address bound.
"""

from __future__ import annotations

import ipaddress

from pydantic import Field, ValidationInfo, field_validator

from gateway import ConfigPath, PluginSettings
from gateway.settings import parse_listen

__all__ = ["ConsoleSettings", "listen_address"]

DEFAULT_LISTEN = "127.0.0.1:8357"


def listen_address(value: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """``HOST:PORT`` of ``console.listen`` as (IP address, port); ``ValueError`` for a host name.
    ``localhost``, the one name older configurations hold, is 127.0.0.1: bound, and named in the
    link, as that address."""
    host, port = parse_listen(value)
    if host == "localhost":
        host = "127.0.0.1"
    try:
        return ipaddress.ip_address(host), port
    except ValueError:
        raise ValueError(f"{value}: give an IP address, not a host name (127.0.0.1:{port} or [::1]:{port}): "
                         "a name may resolve to several addresses and the console binds one, "
                         "so a browser could take the one-time link to a server of another user on the "
                         "other (docs/console.md)") from None


class ConsoleSettings(PluginSettings):
    """``console:`` in conf.d. See docs/console.md."""

    tls_cert: ConfigPath | None = Field(None, description="PEM certificate (chain) of the console's HTTPS "
                                                          "listener; required for a non-loopback `listen`")
    tls_key: ConfigPath | None = Field(None, description="PEM private key of `tls_cert` (keep it 0600)")
    listen: str = Field(DEFAULT_LISTEN, description="`IP:PORT` of the console (an address, not a name: `127.0.0.1:8357`, `[::1]:8357`); plain HTTP only on loopback")
    hosts: list[str] = Field([], description="extra host names the browser may use in `Host` (besides "
                                             "127.0.0.1, ::1 and localhost); others are refused "
                                             "(DNS rebinding)")
    login_link_ttl: float = Field(900.0, gt=0, le=86400, description="seconds a one-time login link from "
                                                                     "`authgw console` stays valid")
    session_ttl: float = Field(3600.0, gt=0, le=86400, description="seconds a console session lasts "
                                                                   "without activity")
    session_lifetime: float = Field(43200.0, gt=0, le=604800, description="seconds a console session lasts "
                                    "at most, however active (then run `authgw console` for a new link)")
    audit_events: int = Field(50, ge=0, le=1000, description="recent audit events shown on the status page")
    certificate_warning_days: float = Field(14.0, ge=0, le=3650, description="the status page warns when a "
                                            "certificate a component reports (the link's, the relay's) ends "
                                            "within this many days")

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str, info: ValidationInfo) -> str:
        address, _ = listen_address(value)
        tls = info.data.get("tls_cert") is not None and info.data.get("tls_key") is not None
        if not address.is_loopback and not tls:
            raise ValueError(f"{value} is not a loopback address: the console serves plain HTTP only on "
                             "127.0.0.1/::1; set tls_cert and tls_key to listen elsewhere, or reach it "
                             "through an SSH tunnel (docs/console.md)")
        if (info.data.get("tls_cert") is None) != (info.data.get("tls_key") is None):
            raise ValueError("tls_cert and tls_key go together")
        address, port = listen_address(value)
        return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"  # what is bound
