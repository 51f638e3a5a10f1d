"""Decoding what a browser carries from a service provider, before anything trusts it.

* :func:`parse_xml`: lxml with DTDs, entities and network access off; a document that carries a
  DOCTYPE at all is refused (``login.xml_forbidden``): SAML messages never have one, and that
  shuts out XXE and entity expansion (billion laughs) whatever the parser would do.
* :func:`inflate_redirect`: the HTTP-Redirect binding's base64 + raw DEFLATE (SAML bindings
  section 3.4.4.1), inflating at most ``limit`` bytes: a 1 GB bomb costs ``limit`` bytes of
  work and is refused (``login.inflate_too_large``).
* :func:`decode_post`: the HTTP-POST binding's base64.
"""

from __future__ import annotations

import base64
import binascii
import re
import zlib

from lxml import etree

from .web import Refused

__all__ = ["decode_post", "inflate_redirect", "parse_xml"]

_PARSER_OPTIONS = dict(resolve_entities=False, no_network=True, load_dtd=False, dtd_validation=False,
                       huge_tree=False, remove_comments=True, remove_pis=True, collect_ids=False)
_DOCTYPE = re.compile(rb"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)


def _b64(text: str, limit: int) -> bytes:
    if len(text) > limit:
        raise Refused("login.parameter_too_large", f"{len(text)} bytes")
    try:
        return base64.b64decode(text.encode("ascii"), validate=False)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise Refused("login.malformed", "bad base64") from None


def inflate_redirect(text: str, *, limit: int, max_parameter: int) -> bytes:
    raw = _b64(text, max_parameter)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        data = inflater.decompress(raw, limit + 1)
    except zlib.error:
        raise Refused("login.malformed", "bad DEFLATE data") from None
    if len(data) > limit or inflater.unconsumed_tail:
        raise Refused("login.inflate_too_large", f"more than {limit} bytes once inflated")
    return data


def decode_post(text: str, *, max_parameter: int) -> bytes:
    return _b64(text, max_parameter)


def parse_xml(data: bytes) -> etree._Element:
    """Parse an untrusted XML message; refuse any DTD or entity declaration."""
    if _DOCTYPE.search(data):
        raise Refused("login.xml_forbidden", "a DTD or entity declaration")
    parser = etree.XMLParser(**_PARSER_OPTIONS)
    try:
        root = etree.fromstring(data, parser)
    except etree.XMLSyntaxError as exc:
        raise Refused("login.malformed", f"not well-formed XML: {str(exc)[:100]}") from None
    if root.getroottree().docinfo.doctype:  # belt and braces: the scan above should catch it
        raise Refused("login.xml_forbidden", "a DTD")
    return root
