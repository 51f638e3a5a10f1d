"""Password hashes for users files and caches: argon2id (RFC 9106) in PHC string format.

Parameters follow the OWASP Password Storage Cheat Sheet minimum for argon2id: 19 MiB of memory,
2 iterations, 1 lane. Verification takes about 17 ms on the reference machine and releases the GIL.

At most ``limits.hash_concurrency`` verifications run at once in a process (default: its CPUs),
the others wait their turn in arrival order, and one whose attempt is no longer wanted when its
turn comes (deadline passed, client gone) is not run (:mod:`gateway.slots`, issue 10).
"""

from __future__ import annotations

import hmac

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from gateway.pool import check_wanted
from gateway.slots import FairSlots, usable_cpus

__all__ = ["hash_password", "is_supported_hash", "set_hash_concurrency", "verify_password", "DUMMY_HASH"]

_HASHER = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1, hash_len=32, salt_len=16, type=Type.ID)


def hash_password(password: str) -> str:
    return _HASHER.hash(password)


def is_supported_hash(encoded: str) -> bool:
    return encoded.startswith("$argon2id$")


_slots = FairSlots(usable_cpus())


def set_hash_concurrency(size: int | None) -> None:
    """How many verifications may run at once in this process (None: its CPUs). Called when a
    worker builds its configuration, before any attempt runs."""
    global _slots
    _slots = FairSlots(size or usable_cpus())


def verify_password(encoded: str, password: str) -> bool:
    """True when *password* matches *encoded*; never raises for a wrong or malformed input.

    Waits for a hashing slot first. On a chain thread whose attempt is given up meanwhile, it
    raises :class:`gateway.pool.Abandoned` or :class:`gateway.pool.DeadlineExpired` instead of
    hashing (the chain answers ``client_gone`` or ``deadline_exceeded``)."""
    slots = _slots
    with slots.held():
        check_wanted()
        try:
            return _HASHER.verify(encoded, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False


#: Verified against when a user does not exist, so that an unknown user takes as long as a wrong
#: password (no user-enumeration by timing). Made once per process, with the same parameters.
DUMMY_HASH = _HASHER.hash(hmac.new(b"authgw", b"dummy", "sha256").hexdigest())
