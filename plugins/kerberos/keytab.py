"""The keytab's table of contents: principals, key versions, encryption types. Never the keys.

Reads MIT's FILE keytab format version 0x502 (what ``ktutil``, ``kadmin ktadd``, ``ktpass`` and
``msktutil`` write; documented in MIT krb5 ``doc/formats/keytab_file_format.rst``). The plugin
uses it to explain failed logins (which kvno and enctypes the keytab holds) and for self-tests;
GSSAPI reads the keys itself. Key bytes are skipped, not kept.
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from .tokens import enctype_name, unparse_principal

__all__ = ["KeytabEntry", "KeytabError", "KeytabIndex", "read_keytab"]

#: A keytab with more entries than this is not a service keytab; stop rather than loop.
_MAX_ENTRIES = 10_000


class KeytabError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class KeytabEntry:
    principal: str
    kvno: int
    enctype: int
    timestamp: int


@dataclass(frozen=True, slots=True)
class KeytabIndex:
    """The entries of one keytab file, and the file's identity when it was read."""

    path: Path
    entries: tuple[KeytabEntry, ...]
    signature: tuple[int, int, int]

    @property
    def principals(self) -> list[str]:
        return sorted({e.principal for e in self.entries})

    def kvnos(self, principal: str) -> list[int]:
        return sorted({e.kvno for e in self.entries if e.principal == principal})

    def enctypes(self, principal: str, kvno: int | None = None) -> list[int]:
        return sorted({e.enctype for e in self.entries
                       if e.principal == principal and (kvno is None or e.kvno == kvno)})

    def describe(self, principal: str) -> str:
        """``kvno 2 (aes256-cts-hmac-sha1-96, aes128-cts-hmac-sha1-96), kvno 3 (...)``."""
        parts = [f"kvno {k} ({', '.join(enctype_name(e) for e in self.enctypes(principal, k))})"
                 for k in self.kvnos(principal)]
        return "; ".join(parts) or "no keys"


def file_signature(path: Path) -> tuple[int, int, int]:
    """Changes when the file is rewritten or replaced (inode, modification time, size)."""
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns, st.st_size


def read_keytab(path: Path) -> KeytabIndex:
    """Read *path*'s table of contents. Raises ``OSError`` or :class:`KeytabError`.

    Opened without blocking and read only when it is a regular file: a FIFO put at the
    keytab's path blocked the first login's open, on the event loop the whole worker (review of
    the Kerberos plugin); MIT could not read keys from one anyway."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as file:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeytabError(f"{path} is not a regular file")
        signature = (st.st_ino, st.st_mtime_ns, st.st_size)
        data = file.read()
    if data[:2] != b"\x05\x02":
        raise KeytabError(f"{path} is not a version 0x502 keytab (first bytes {data[:2].hex() or 'empty'})")
    entries = []
    pos = 2
    while pos + 4 <= len(data) and len(entries) < _MAX_ENTRIES:
        (size,) = struct.unpack_from(">i", data, pos)
        pos += 4
        if size == 0:
            break
        if size < 0:  # a hole left by a deleted entry
            pos += -size
            continue
        end = pos + size
        if end > len(data):
            raise KeytabError(f"{path}: entry at offset {pos - 4} runs past the end of the file")
        entries.append(_entry(data[pos:end], path))
        pos = end
    return KeytabIndex(Path(path), tuple(entries), signature)


def _entry(record: bytes, path: Path) -> KeytabEntry:
    try:
        pos = 0

        def counted() -> bytes:
            nonlocal pos
            (length,) = struct.unpack_from(">H", record, pos)
            value = record[pos + 2:pos + 2 + length]
            if len(value) != length:
                raise KeytabError("truncated string")
            pos += 2 + length
            return value

        (count,) = struct.unpack_from(">H", record, pos)
        pos += 2
        realm = counted().decode("utf-8", "replace")
        components = [counted().decode("utf-8", "replace") for _ in range(count)]
        _name_type, timestamp, kvno8, enctype = struct.unpack_from(">IIBH", record, pos)
        pos += 11
        key_length = struct.unpack_from(">H", record, pos)[0]
        pos += 2 + key_length  # skip the key itself
        kvno = kvno8
        if pos + 4 <= len(record):  # 32-bit kvno, when present and non-zero, wins (kvno > 255)
            (kvno32,) = struct.unpack_from(">I", record, pos)
            kvno = kvno32 or kvno8
    except struct.error:
        raise KeytabError(f"{path}: truncated entry") from None
    return KeytabEntry(unparse_principal(components, realm), kvno, enctype, timestamp)
