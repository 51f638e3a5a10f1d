"""Every value that goes from a user into LDAP passes through this module (DESIGN.md section 7).

* Search filters: RFC 4515 section 3 escaping of assertion values (:func:`filter_value`), and
  template filling that never interprets the value (:func:`fill`); directory searches
  (:func:`fill_search`, :func:`contains`) add a wildcard around the escaped text, never in it.
* DNs: RFC 4514 section 2.4 escaping of attribute values (:func:`dn_value`), used only for the
  ``direct_bind`` DN template; in search-then-bind the DN comes from the directory.
* Bind names that are not DNs (``{username}@example.com``): :func:`plain_name_ok` refuses the
  characters that would change what the server parses.
* The way back: :func:`first_rdn_value` (a group name from a ``memberOf`` DN) and
  :func:`format_guid` (AD's ``objectGUID`` as a GUID string).
"""

from __future__ import annotations

import re
import uuid

from gateway.plugins.ldap.wire import FilterError, compile_filter

__all__ = ["FilterTemplate", "contains", "dn_value", "filter_value", "fill", "fill_search", "first_rdn_value",
           "format_guid", "plain_name_ok"]

# RFC 4515 section 3: in an assertion value, '*', '(', ')', '\' and NUL must be written as a
# backslash and two hex digits. Other octets (UTF-8 included) may stay as they are.
_FILTER_SPECIAL = {ord("*"): "\\2a", ord("("): "\\28", ord(")"): "\\29", ord("\\"): "\\5c", 0: "\\00"}


def filter_value(value: str) -> str:
    """Escape *value* for use as an assertion value in a string filter (RFC 4515 section 3)."""
    return value.translate(_FILTER_SPECIAL)


def fill(template: str, **values: str) -> str:
    """Put escaped *values* into the ``{name}`` placeholders of a filter template.

    One pass over the template, not :meth:`str.format` and not one replace per name: a template
    is operator text and the values are user text, so a value is never read as a format
    specification nor as a placeholder (a username ``{dn}`` stays the text ``{dn}``).
    """
    escaped = {name: filter_value(value) for name, value in values.items()}
    return _PLACEHOLDER.sub(lambda m: escaped.get(m.group(1), m.group(0)), template)


_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")


class FilterTemplate:
    """A filter template with one kind of placeholder, as BER: ``template(value)`` is
    ``compile_filter(fill(template, name=value))``, without filling and parsing a string per call
    (about 11 µs of a login's user search, in a tight loop; a copy and a splice instead).

    Why it is the same: a filled value is escaped, so it never changes the filter's structure,
    only the octets of the assertion values it is in, which are its UTF-8; and BER lengths depend
    on how many octets there are, not which. So for each length of value (in octets) the template
    is compiled twice, with the value all 0x00 and all 0xFF octets (written as escapes): the two
    encodings differ exactly where the value goes, and a call writes the value there. A template
    where they do not differ so (the placeholder outside an assertion value, or absent) is filled
    and parsed on every call, as before, and raises what that raises.
    """

    #: Lengths of value remembered (a username is at most 256 octets at the front doors).
    MAX_LENGTHS = 1024

    def __init__(self, template: str, name: str = "username") -> None:
        self.template = template
        self.name = name
        self._shapes: dict[int, tuple[bytes, tuple[int, ...]] | None] = {}

    def __call__(self, value: str) -> bytes:
        data = value.encode("utf-8")  # a lone surrogate: UnicodeEncodeError, as compile_filter raises
        size = len(data)
        try:
            shape = self._shapes[size]
        except KeyError:
            shape = self._shape(size)
            if len(self._shapes) < self.MAX_LENGTHS:
                self._shapes[size] = shape
        if shape is None:
            return compile_filter(fill(self.template, **{self.name: value}))
        encoded, starts = shape
        if len(starts) == 1:
            start = starts[0]
            return encoded[:start] + data + encoded[start + size:]
        out = bytearray(encoded)
        for start in starts:
            out[start:start + size] = data
        return bytes(out)

    def _shape(self, size: int) -> tuple[bytes, tuple[int, ...]] | None:
        """The template's encoding for values of *size* octets and where the value goes."""
        if size == 0:
            return None
        try:
            low, high = (compile_filter(_PLACEHOLDER.sub(
                lambda m: escaped if m.group(1) == self.name else m.group(0), self.template))
                for escaped in ("\\00" * size, "\\ff" * size))
        except FilterError:
            return None
        if len(low) != len(high):
            return None
        places = [i for i in range(len(low)) if low[i] != high[i]]
        if not places or len(places) % size:
            return None
        starts = tuple(places[::size])
        for start in starts:
            if low[start:start + size] != bytes(size) or high[start:start + size] != b"\xff" * size:
                return None
        return low, starts


def dn_value(value: str) -> str:
    """Escape *value* as an attribute value inside a DN (RFC 4514 section 2.4)."""
    out = []
    last = len(value) - 1
    for i, ch in enumerate(value):
        if ch in '"+,;<>\\=':
            out.append("\\" + ch)
        elif ch == "\x00":
            out.append("\\00")
        elif (i == 0 and ch in " #") or (i == last and ch == " "):
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)


#: Characters that would change how a server reads a UPN or down-level bind name.
_PLAIN_FORBIDDEN = re.compile(r'[@\\/,=+<>;"#*()\x00-\x1f\x7f]')


def plain_name_ok(value: str) -> bool:
    """Whether *value* may be put into a non-DN bind name template such as ``{username}@corp``."""
    return bool(value) and not _PLAIN_FORBIDDEN.search(value) and value.strip() == value


def first_rdn_value(dn: str) -> str:
    """The value of the first RDN of *dn*, unescaped (``cn=A\\, B,ou=x`` gives ``A, B``).

    Multi-valued RDNs (``cn=a+uid=b``) give the first value. Used for group names from
    ``memberOf``, where the RDN is conventionally the name.
    """
    data = bytearray()
    i = dn.find("=") + 1
    # Unescaped spaces around a value are not part of it (RFC 4514 section 3); escaped ones are.
    while i < len(dn) and dn[i] == " ":
        i += 1
    keep = 0  # length of data up to the last escaped or non-space character
    while i < len(dn):
        ch = dn[i]
        if ch == "\\" and i + 1 < len(dn):
            pair = dn[i + 1:i + 3]
            if len(pair) == 2 and all(c in "0123456789abcdefABCDEF" for c in pair):
                data += bytes.fromhex(pair)
                i += 3
            else:
                data += dn[i + 1].encode("utf-8")
                i += 2
            keep = len(data)
            continue
        if ch in ",+":
            break
        data += ch.encode("utf-8")
        if ch != " ":
            keep = len(data)
        i += 1
    return bytes(data[:keep]).decode("utf-8", errors="replace")


def format_guid(raw: bytes) -> str:
    """AD's objectGUID (16 octets, first three fields little-endian, MS-DTYP 2.3.4) as text."""
    if len(raw) != 16:
        raise ValueError("an objectGUID has 16 octets")
    return str(uuid.UUID(bytes_le=bytes(raw)))


def fill_search(template: str, prefix: str) -> str:
    """Fill a user filter template's ``{username}`` for a directory search: the escaped *prefix*
    followed by an unescaped ``*`` (RFC 4515 substring ``initial``), or a presence test when
    *prefix* is empty. The wildcard is the only filter syntax added; *prefix* stays literal."""
    value = filter_value(prefix) + "*"
    return _PLACEHOLDER.sub(lambda m: value if m.group(1) == "username" else m.group(0), template)


def contains(attr: str, text: str) -> str:
    """``(attr=*text*)`` with *text* escaped: a literal substring match (RFC 4515 ``any``)."""
    return f"({attr}=*{filter_value(text)}*)"
