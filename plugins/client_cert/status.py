"""The answer of a revocation source about one certificate."""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass

__all__ = ["Status", "Verdict", "later_than", "plus_seconds"]

_LAST = dt.datetime.max.replace(tzinfo=dt.timezone.utc)


class Status(enum.Enum):
    GOOD = "good"
    REVOKED = "revoked"
    #: The source should answer but cannot: unreachable, too old, badly signed, "unknown".
    UNKNOWN = "unknown"
    #: The source has nothing to say about this certificate (no CRL for its issuer, no responder).
    NONE = "none"


@dataclass(frozen=True, slots=True)
class Verdict:
    status: Status
    detail: str = ""


def later_than(now: dt.datetime, when: dt.datetime, seconds: float) -> bool:
    """``now > when + seconds``, without adding to a date: a CRL or OCSP ``nextUpdate`` in year
    9999 plus a grace overflowed ``datetime`` and turned a login into ``internal_error``, a
    refusal even under soft-fail (review of time). The difference of two dates always fits."""
    return (now - when).total_seconds() > seconds


def plus_seconds(when: dt.datetime, seconds: float) -> dt.datetime:
    """*when* + *seconds* (UTC), or the last date there is when that is beyond it."""
    try:
        return when + dt.timedelta(seconds=seconds)
    except OverflowError:
        return _LAST
