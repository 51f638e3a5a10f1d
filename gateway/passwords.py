"""Password hashes for users files and caches: argon2id (RFC 9106) in PHC string format.

Parameters follow the OWASP Password Storage Cheat Sheet minimum for argon2id: 19 MiB of memory,
2 iterations, 1 lane. Verification takes about 17 ms on the reference machine and releases the GIL.

At most ``limits.hash_concurrency`` verifications run at once in a process (default: its CPUs),
the others wait their turn in arrival order, and one whose attempt is no longer wanted when its
turn comes (deadline passed, client gone) is not run (:mod:`gateway.slots`, issue 10).
"""

from __future__ import annotations

import binascii
import hmac
import threading
from collections.abc import Iterable

from argon2 import Parameters, PasswordHasher, Type, extract_parameters
from argon2.exceptions import Argon2Error, InvalidHashError, VerificationError, VerifyMismatchError

from gateway.pool import check_wanted
from gateway.slots import FairSlots, usable_cpus

__all__ = ["hash_password", "hash_parameters", "is_supported_hash", "set_hash_concurrency", "verify_password",
           "dummy_hash_like", "DUMMY_HASH", "MAX_LANES", "MAX_WORK_KIB"]

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
        except VerifyMismatchError:
            return False
        except (VerificationError, InvalidHashError, ValueError):
            # A hash that does not read (a file's "locked" marker, a value cut short) answered
            # at once, where a wrong password costs a hashing: which users hold one showed in
            # the timing (review of the console and static users). It costs a hashing too.
            # ValueError: argon2-cffi encodes the hash as ASCII, and a digit of another script
            # (`m=1\u0669456`, which int() reads) raised UnicodeEncodeError out of the step: an
            # internal_error and a traceback per attempt, answered at once (review of the audit
            # and static users).
            _verify_quietly(DUMMY_HASH, password)
            return False


def _verify_quietly(encoded: str, password: str) -> None:
    try:
        _HASHER.verify(encoded, password)
    except (Argon2Error, ValueError):
        pass


#: Verified against when a user does not exist, so that an unknown user takes as long as a wrong
#: password (no user-enumeration by timing). Made once per process, with the same parameters.
DUMMY_HASH = _HASHER.hash(hmac.new(b"authgw", b"dummy", "sha256").hexdigest())


#: The most work a hash may ask of a verification, in KiB of memory times passes: 4 GiB for one
#: pass, twice RFC 9106's first recommended option (2 GiB, t=1). A users file's hash beyond it
#: (a typo, `t=3000`) cost minutes a login, and the dummy made for it held up the file's reload
#: with every login waiting (review of the audit and static users).
MAX_WORK_KIB = 1 << 22
#: The most lanes a hash may have: argon2-cffi runs one thread per lane for each verification.
MAX_LANES = 64


def hash_parameters(encoded: str) -> Parameters | None:
    """The argon2 parameters of *encoded* (a PHC string, which is ASCII), or None when it is not one."""
    if not encoded.isascii():  # int() reads other scripts' digits; argon2 refuses to verify them
        return None
    try:
        return extract_parameters(encoded)
    except (InvalidHashError, ValueError):
        return None


def _verifiable(params: Parameters) -> bool:
    return (0 < params.parallelism <= MAX_LANES and 0 < params.time_cost
            and 0 < params.memory_cost * params.time_cost <= MAX_WORK_KIB)


def readable_hash(encoded: str) -> bool:
    """Whether *encoded* reads as an argon2 PHC string, its salt and tag base64 included (what
    :func:`hash_parameters` does not check), asking for no more than :data:`MAX_WORK_KIB` and
    :data:`MAX_LANES`, without hashing. A password never matches one that does not;
    :func:`verify_password` still costs a hashing for it."""
    params = hash_parameters(encoded)
    if params is None or not _verifiable(params):
        return False
    *_, salt, tag = encoded.split("$")
    try:
        return all(binascii.a2b_base64(part + "=" * (-len(part) % 4), strict_mode=True) for part in (salt, tag))
    except (binascii.Error, ValueError):
        return False


def _work(params: Parameters) -> tuple[int, int, int]:
    # Memory times passes is the work; with as much work, fewer lanes take longer (the lanes of
    # one verification run in parallel).
    return params.memory_cost * params.time_cost, -params.parallelism, params.hash_len


_dummies: dict[tuple[int, ...], str] = {}
_dummies_lock = threading.Lock()


def dummy_hash_like(hashes: Iterable[str]) -> str:
    """A hash of a secret nobody knows, made with the parameters of the most expensive of
    *hashes*: verifying a password against it costs what a wrong password costs for that user.

    For the users of one file, so that an unknown user takes as long as a wrong password when
    their hashes were made with other parameters than :data:`DUMMY_HASH`'s (an imported
    ``m=65536,t=3,p=4`` hash takes several times as long as the default's). Made once per
    parameter set and process (it costs one hashing), :data:`DUMMY_HASH` when *hashes* hold
    none or use the default parameters.
    """
    found = {(p.type, p.version, p.salt_len, p.hash_len, p.time_cost, p.memory_cost, p.parallelism): p
             for p in map(hash_parameters, hashes) if p is not None and _verifiable(p)}
    for key, params in sorted(found.items(), key=lambda item: _work(item[1]), reverse=True):
        if _work(params) <= _work(_DEFAULT_PARAMETERS):
            break  # the default's dummy costs at least as much
        with _dummies_lock:
            if key not in _dummies:
                try:
                    _dummies[key] = PasswordHasher.from_parameters(params).hash(_DUMMY_SECRET)
                except (Argon2Error, MemoryError, OverflowError, ValueError):
                    continue  # parameters argon2 cannot hash with: no user verifies with them either
            return _dummies[key]
    return DUMMY_HASH


_DUMMY_SECRET = hmac.new(b"authgw", b"dummy", "sha256").hexdigest()
_DEFAULT_PARAMETERS = extract_parameters(DUMMY_HASH)
