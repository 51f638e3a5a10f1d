"""Certificates forwarded by a TLS-terminating proxy in a request header.

Two encodings:

``pem``
    nginx ``$ssl_client_escaped_cert``: the PEM certificate, URL-encoded (RFC 3986 section 2.1).
    The deprecated ``$ssl_client_cert`` (PEM with tab-indented continuation lines) and Traefik's
    ``X-Forwarded-Tls-Client-Cert`` (bare base64 DER, comma-separated) are read too. An empty value means "no client certificate" (nginx sends one
    when the client presented none).
``xfcc``
    Envoy ``X-Forwarded-Client-Cert``: comma-separated elements of ``Key=Value`` pairs separated
    by ``;``, values optionally double-quoted. ``Cert`` holds the URL-encoded PEM leaf and
    ``Chain`` the URL-encoded PEM chain. Each proxy appends its element, so the last one was
    written by the proxy nearest to us (our trusted peer); earlier ones are not believed.

Anything undecodable raises :class:`~.verify.CertError` with ``cert.malformed``: the caller turns
it into a 401, never a 500.
"""

from __future__ import annotations

import base64
import binascii
import re
from urllib.parse import unquote

from .verify import CertError

__all__ = ["MAX_HEADER_CHARS", "parse_pem_header", "parse_xfcc", "split_xfcc"]

#: Far above any real certificate chain; aiohttp already refuses header lines over 8 KiB.
MAX_HEADER_CHARS = 64 * 1024
MAX_CHAIN = 10

_BEGIN, _END = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
_B64 = re.compile(r"^[A-Za-z0-9+/]+={0,2}$")


def _unquote(text: str) -> str:
    try:
        return unquote(text, errors="strict")
    except UnicodeDecodeError:
        raise CertError("cert.malformed", "the URL-encoded certificate is not UTF-8") from None


def _b64(text: str) -> bytes:
    compact = re.sub(r"\s+", "", text)
    if not compact or not _B64.match(compact):
        raise CertError("cert.malformed", "the certificate is not base64")
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise CertError("cert.malformed", "the certificate is not valid base64") from None


def _pem_blocks(text: str) -> list[str]:
    """What lies between each BEGIN and the first END after it, in one pass: the regular
    expression this replaces looked for an END from every BEGIN, so a header of BEGINs alone
    took time in its length squared (0.8 s for 64 KiB, found by the parsers' fuzzing)."""
    blocks: list[str] = []
    pos = 0
    while (begin := text.find(_BEGIN, pos)) >= 0:
        end = text.find(_END, begin + len(_BEGIN))
        if end < 0:
            break  # no END after this BEGIN, so none after a later one either
        blocks.append(text[begin + len(_BEGIN):end])
        pos = end + len(_END)
    return blocks


def decode_pem_chain(text: str) -> tuple[bytes, ...]:
    """PEM blocks (leaf first), or bare base64 DER certificates separated by commas (Traefik's
    ``X-Forwarded-Tls-Client-Cert``), to DER."""
    blocks = _pem_blocks(text) if "-----BEGIN" in text else text.split(",")
    if not blocks:
        raise CertError("cert.malformed", "PEM armour without a complete CERTIFICATE block")
    if len(blocks) > MAX_CHAIN:
        raise CertError("cert.malformed", f"more than {MAX_CHAIN} certificates")
    return tuple(_b64(block) for block in blocks)


def parse_pem_header(value: str) -> tuple[bytes, ...] | None:
    """Decode an nginx-style header; ``None`` when it says "no certificate"."""
    if len(value) > MAX_HEADER_CHARS:
        raise CertError("cert.malformed", "the certificate header is too long")
    text = _unquote(value) if "%" in value else value
    if not text.strip() or text.strip() == "-":
        return None
    return decode_pem_chain(text)


def split_xfcc(value: str) -> list[dict[str, str]]:
    """Split an XFCC header into elements of (lower-cased key -> raw value) pairs.

    Quoted values may contain ``,``, ``;`` and ``=``; ``\\"`` escapes a quote inside them.
    """
    elements: list[dict[str, str]] = []
    pairs: dict[str, str] = {}
    i, n = 0, len(value)
    while i < n:
        while i < n and value[i] in " \t":
            i += 1
        eq = value.find("=", i)
        if eq < 0:
            raise CertError("cert.malformed", "X-Forwarded-Client-Cert: a pair without `=`")
        key = value[i:eq].strip().lower()
        if not key or any(c in key for c in ',;"'):
            raise CertError("cert.malformed", "X-Forwarded-Client-Cert: a bad key")
        i = eq + 1
        if i < n and value[i] == '"':
            i += 1
            chars = []
            while True:
                if i >= n:
                    raise CertError("cert.malformed", "X-Forwarded-Client-Cert: an unterminated quote")
                if value[i] == "\\" and i + 1 < n:
                    chars.append(value[i + 1])
                    i += 2
                    continue
                if value[i] == '"':
                    i += 1
                    break
                chars.append(value[i])
                i += 1
            item = "".join(chars)
            while i < n and value[i] in " \t":
                i += 1
        else:
            end = i
            while end < n and value[end] not in ",;":
                end += 1
            item = value[i:end].strip()
            i = end
        if key in pairs:
            raise CertError("cert.malformed", f"X-Forwarded-Client-Cert: {key} twice in one element")
        pairs[key] = item
        if i < n and value[i] not in ",;":
            raise CertError("cert.malformed", "X-Forwarded-Client-Cert: garbage after a value")
        if i >= n or value[i] == ",":
            elements.append(pairs)
            pairs = {}
        i += 1
    if pairs:
        elements.append(pairs)
    return elements


def parse_xfcc(value: str) -> tuple[bytes, ...] | None:
    """The certificate chain in the last XFCC element; ``None`` when it carries none."""
    if len(value) > MAX_HEADER_CHARS:
        raise CertError("cert.malformed", "the certificate header is too long")
    elements = split_xfcc(value)
    if not elements:
        return None
    last = elements[-1]
    cert = _unquote(last.get("cert", ""))
    chain = _unquote(last.get("chain", ""))
    if cert.strip():
        leaf = decode_pem_chain(cert)
        if len(leaf) != 1:
            raise CertError("cert.malformed", "X-Forwarded-Client-Cert: Cert holds more than one certificate")
        rest = [der for der in (decode_pem_chain(chain) if chain.strip() else ()) if der != leaf[0]]
        return (leaf[0], *rest[:MAX_CHAIN])
    if chain.strip():
        return decode_pem_chain(chain)
    return None
