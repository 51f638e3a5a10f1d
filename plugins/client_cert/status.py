"""The answer of a revocation source about one certificate."""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["Status", "Verdict"]


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
