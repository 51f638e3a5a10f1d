"""Password hashes for users files and caches: argon2id (RFC 9106) in PHC string format.

Parameters follow the OWASP Password Storage Cheat Sheet minimum for argon2id: 19 MiB of memory,
2 iterations, 1 lane. Verification takes about 17 ms on the reference machine and releases the GIL.
"""

from __future__ import annotations

import hmac

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

__all__ = ["hash_password", "is_supported_hash", "verify_password", "DUMMY_HASH"]

_HASHER = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1, hash_len=32, salt_len=16, type=Type.ID)


def hash_password(password: str) -> str:
    return _HASHER.hash(password)


def is_supported_hash(encoded: str) -> bool:
    return encoded.startswith("$argon2id$")


def verify_password(encoded: str, password: str) -> bool:
    """True when *password* matches *encoded*; never raises for a wrong or malformed input."""
    try:
        return _HASHER.verify(encoded, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


#: Verified against when a user does not exist, so that an unknown user takes as long as a wrong
#: password (no user-enumeration by timing). Made once per process, with the same parameters.
DUMMY_HASH = _HASHER.hash(hmac.new(b"authgw", b"dummy", "sha256").hexdigest())
