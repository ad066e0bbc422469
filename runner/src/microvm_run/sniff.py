"""Read a connection's destination from its first bytes; answer DNS queries.

Pure byte parsing, no sockets: the egress proxy feeds what the guest sent so
far and gets either an answer or NEED_MORE.  Parsers are strict and bounded:
whatever the guest sends, the worst outcome is "no destination" (refused).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import Final

NEED_MORE: Final = "need-more"
MAX_HEAD = 16 * 1024  # an HTTP request head or a ClientHello larger than this is refused

_TLS_HANDSHAKE = 0x16
_CLIENT_HELLO = 0x01
_EXT_SERVER_NAME = 0x0000
# RFC 9110 token: a header name.  Anything else (spaces, a bare LF that a
# lenient upstream would read as a line break) is refused, not forwarded.
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_PORT = re.compile(r"[0-9]{1,5}")  # ASCII only: str.isdigit() also admits "²", "٣"


def looks_like_tls(data: bytes) -> bool:
    return data[:1] == bytes([_TLS_HANDSHAKE])


def tls_server_name(data: bytes) -> str | None:
    """The SNI host name of a TLS ClientHello, None if it has none, or NEED_MORE.

    Only the first handshake record is read: a ClientHello split across
    records is rare and is refused rather than reassembled.
    """
    if len(data) < 5:
        return NEED_MORE
    if data[0] != _TLS_HANDSHAKE:
        return None
    (record_len,) = struct.unpack_from("!H", data, 3)
    if len(data) < 5 + record_len:
        return NEED_MORE if 5 + record_len <= MAX_HEAD else None
    body = data[5 : 5 + record_len]
    try:
        return _client_hello_sni(body)
    except (struct.error, IndexError, UnicodeDecodeError):
        return None


def _client_hello_sni(body: bytes) -> str | None:
    if body[0] != _CLIENT_HELLO:
        return None
    (hello_len,) = struct.unpack("!I", b"\0" + body[1:4])
    hello = body[4 : 4 + hello_len]
    if len(hello) < hello_len:
        return None  # split across records
    pos = 2 + 32  # client_version, random
    pos += 1 + hello[pos]  # session id
    (suites_len,) = struct.unpack_from("!H", hello, pos)
    pos += 2 + suites_len
    pos += 1 + hello[pos]  # compression methods
    if pos + 2 > len(hello):
        return None  # no extensions
    (ext_total,) = struct.unpack_from("!H", hello, pos)
    pos += 2
    end = min(len(hello), pos + ext_total)
    while pos + 4 <= end:
        ext_type, ext_len = struct.unpack_from("!HH", hello, pos)
        pos += 4
        if ext_type == _EXT_SERVER_NAME:
            return _server_name_list(hello[pos : pos + ext_len])
        pos += ext_len
    return None


def _server_name_list(ext: bytes) -> str | None:
    (list_len,) = struct.unpack_from("!H", ext, 0)
    pos, end = 2, min(len(ext), 2 + list_len)
    while pos + 3 <= end:
        name_type, name_len = ext[pos], struct.unpack_from("!H", ext, pos + 1)[0]
        pos += 3
        if name_type == 0:  # host_name
            return ext[pos : pos + name_len].decode("ascii")
        pos += name_len
    return None


@dataclass(frozen=True)
class HttpHead:
    """The parts of an HTTP/1.x request head the proxies need."""

    method: str
    target: str
    version: str
    headers: tuple[tuple[str, str], ...]
    length: int  # bytes of the head, including the blank line

    def header(self, name: str) -> str | None:
        wanted = name.lower()
        return next((value for key, value in self.headers if key.lower() == wanted), None)


def http_head(data: bytes) -> HttpHead | str | None:
    """Parse a request head; NEED_MORE until the blank line, None if not HTTP."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return NEED_MORE if len(data) < MAX_HEAD else None
    try:
        text = data[:end].decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes anything
        return None
    request_line, *lines = text.split("\r\n")
    if any(c in line for line in (request_line, *lines) for c in "\r\n\0"):
        return None  # a bare CR or LF, or a NUL: no two parsers agree on those
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[0].isalpha():
        return None
    headers = []
    for line in lines:
        name, sep, value = line.partition(":")
        if not sep or not _TOKEN.fullmatch(name):
            return None
        headers.append((name, value.strip()))
    return HttpHead(
        method=parts[0], target=parts[1], version=parts[2], headers=tuple(headers), length=end + 4
    )


def split_host_port(authority: str, default_port: int) -> tuple[str, int] | None:
    """``host``, ``host:port`` or ``[v6]:port`` -> (host, port); None if malformed."""
    authority = authority.strip()
    if authority.startswith("["):
        close = authority.find("]")
        if close < 0:
            return None
        host, rest = authority[1:close], authority[close + 1 :]
        if rest and not rest.startswith(":"):
            return None
        port_text = rest[1:]
    else:
        host, _, port_text = authority.partition(":")
    if not host:
        return None
    if not port_text:
        return host, default_port
    if not _PORT.fullmatch(port_text) or not 0 < int(port_text) < 65536:
        return None
    return host, int(port_text)


def render_head(head: HttpHead, target: str, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"{head.method} {target} {head.version}", *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


# -- DNS: every A query answers the egress address -----------------------------

_QTYPE_A = 1
_QCLASS_IN = 1
_RCODE_NXDOMAIN = 3
_RCODE_FORMERR = 1
# RFC 1035 2.3.4: a name is at most 255 octets, as labels on the wire.  A
# longer one could make the answer (the question echoed) overflow DNS over
# TCP's two-byte length.
_MAX_NAME = 255


@dataclass(frozen=True)
class DnsQuery:
    ident: int
    name: str
    qtype: int
    question: bytes  # the raw question section, echoed in the answer
    flags: int


def dns_query(message: bytes) -> DnsQuery | None:
    """The first question of a DNS query message, or None if malformed."""
    try:
        ident, flags, qdcount = struct.unpack_from("!HHH", message, 0)
        if qdcount < 1 or flags & 0x8000:  # no question, or a response
            return None
        pos, labels = 12, []
        while True:
            length = message[pos]
            pos += 1
            if length == 0:
                break
            if length > 63:  # compression pointers have no place in a question
                return None
            labels.append(message[pos : pos + length].decode("ascii"))
            pos += length
            if pos - 12 >= _MAX_NAME:  # the labels so far and the root's 0 octet
                return None
        qtype, _qclass = struct.unpack_from("!HH", message, pos)
        pos += 4
    except (struct.error, IndexError, UnicodeDecodeError):
        return None
    return DnsQuery(ident, ".".join(labels).lower(), qtype, message[12:pos], flags)


def dns_answer(query: DnsQuery, address: str | None) -> bytes:
    """An answer for one question: an A record for ``address``, or NXDOMAIN if None.

    Other types (AAAA, MX, ...) get an empty NOERROR answer: the name exists,
    only over IPv4, so clients fall back to the A record.
    """
    rcode = 0 if address is not None else _RCODE_NXDOMAIN
    answers = b""
    if address is not None and query.qtype == _QTYPE_A:
        rdata = bytes(int(part) for part in address.split("."))
        # Name as a pointer to the question (offset 12); TTL 60 s.
        answers = struct.pack("!HHHIH", 0xC00C, _QTYPE_A, _QCLASS_IN, 60, 4) + rdata
    flags = 0x8000 | (query.flags & 0x0100) | 0x0080 | rcode  # QR, RD copied, RA
    header = struct.pack("!HHHHHH", query.ident, flags, 1, 1 if answers else 0, 0, 0)
    return header + query.question + answers


def dns_format_error(message: bytes) -> bytes:
    ident = struct.unpack_from("!H", message, 0)[0] if len(message) >= 2 else 0
    return struct.pack("!HHHHHH", ident, 0x8000 | _RCODE_FORMERR, 0, 0, 0, 0)


# -- request bodies: where one request ends and the next would begin ------------

_CONTENT_LENGTH = re.compile(r"[0-9]{1,18}")
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,15}")
_MAX_CHUNK_LINE = 4096


@dataclass(frozen=True)
class BodyFraming:
    """How a request's body ends: ``length`` bytes, or chunked encoding."""

    chunked: bool
    length: int = 0


def body_framing(head: HttpHead) -> BodyFraming | None:
    """RFC 9112 section 6.3 for requests; None when two parsers could disagree.

    A request with both Content-Length and Transfer-Encoding, with two
    different lengths, or with any coding but a lone ``chunked`` is refused:
    those are the request-smuggling shapes, where the proxy and the upstream
    would see a different second request.
    """
    lengths = {value.strip() for key, value in head.headers if key.lower() == "content-length"}
    codings = [value for key, value in head.headers if key.lower() == "transfer-encoding"]
    if codings:
        if lengths or len(codings) != 1 or codings[0].strip().lower() != "chunked":
            return None
        return BodyFraming(chunked=True)
    if not lengths:
        return BodyFraming(chunked=False, length=0)
    if len(lengths) != 1:
        return None
    (text,) = lengths
    if not _CONTENT_LENGTH.fullmatch(text):
        return None
    return BodyFraming(chunked=False, length=int(text))


class ChunkedScanner:
    """Finds the end of a chunked body in a byte stream fed piece by piece.

    ``feed`` returns how many bytes of ``data`` still belong to the body, or
    None if all of it does and the body goes on; it raises ValueError on
    anything malformed (a size line without CRLF, a size that is not hex,
    a chunk not followed by CRLF, an endless trailer).
    """

    def __init__(self) -> None:
        self._state = "size"
        self._line = b""
        self._left = 0  # data bytes of the current chunk still to come
        self._trailer = 0

    def feed(self, data: bytes) -> int | None:
        pos = 0
        while pos < len(data):
            if self._state == "data":
                take = min(self._left, len(data) - pos)
                pos += take
                self._left -= take
                if self._left == 0:
                    self._state = "data-end"
                continue
            end = data.find(b"\n", pos)
            piece = data[pos:] if end < 0 else data[pos : end + 1]
            self._line += piece
            pos += len(piece)
            if len(self._line) > _MAX_CHUNK_LINE:
                raise ValueError("chunk line too long")
            if end >= 0 and self._end_of_line():
                return pos
        return None

    def _end_of_line(self) -> bool:
        """Take one complete line; True when it was the body's last."""
        line, self._line = self._line, b""
        if not line.endswith(b"\r\n") or b"\r" in line[:-2]:
            raise ValueError("a chunk line must end in CRLF")
        line = line[:-2]
        if self._state == "size":
            size = line.split(b";", 1)[0].strip(b" \t")
            if not _CHUNK_SIZE.fullmatch(size):
                raise ValueError("bad chunk size")
            self._left = int(size, 16)
            self._state = "data" if self._left else "trailer"
        elif self._state == "data-end":
            if line:
                raise ValueError("chunk data not followed by CRLF")
            self._state = "size"
        elif not line:  # the empty line after the trailer fields
            self._state = "done"
            return True
        else:
            self._trailer += 1
            if self._trailer > 64:
                raise ValueError("too many trailer fields")
        return False
