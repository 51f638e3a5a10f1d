"""A typed per-attempt store for plugin state (the shape of pytest's ``Stash``).

A plugin creates a module-level key once and uses it to keep state on the attempt without
inventing attributes that could collide with another plugin's::

    bind_dn_key = StashKey[str]()

    attempt.stash[bind_dn_key] = dn
    dn = attempt.stash.get(bind_dn_key, None)
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar, cast

__all__ = ["Stash", "StashKey"]

T = TypeVar("T")
D = TypeVar("D")


class StashKey(Generic[T]):
    """A key into a :class:`Stash`; identity, not name, makes it unique."""

    __slots__ = ()


class Stash:
    """Maps :class:`StashKey` objects to values of the key's type."""

    __slots__ = ("_data",)

    def __init__(self) -> None:
        self._data: dict[StashKey[Any], object] = {}

    def __setitem__(self, key: StashKey[T], value: T) -> None:
        self._data[key] = value

    def __getitem__(self, key: StashKey[T]) -> T:
        return cast(T, self._data[key])

    def get(self, key: StashKey[T], default: D) -> T | D:
        return cast("T | D", self._data.get(key, default))

    def setdefault(self, key: StashKey[T], default: T) -> T:
        return cast(T, self._data.setdefault(key, default))

    def __delitem__(self, key: StashKey[T]) -> None:
        del self._data[key]

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        # Values may be secrets or backend handles; never render them.
        return f"<Stash with {len(self._data)} entries>"
