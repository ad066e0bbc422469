"""Destinations from first bytes, and the DNS answers: real ClientHellos, crafted DNS."""

from __future__ import annotations

import random
import ssl
import struct
from typing import TypedDict

import pytest

from microvm_run import sniff
from microvm_run.sniff import (
    MAX_HEAD,
    NEED_MORE,
    HttpHead,
    dns_answer,
    dns_format_error,
    dns_query,
    http_head,
    looks_like_tls,
    render_head,
    split_host_port,
    tls_server_name,
)


def client_hello(
    server_hostname: str | None, maximum: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED
) -> bytes:
    """The bytes a real TLS client sends first."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.maximum_version = maximum
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    data = outgoing.read()
    assert data[:1] == b"\x16"
    return data


# -- TLS --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("api.example.com", "api.example.com"),
        ("localhost", "localhost"),
        ("a-b.c.d.e.f.example.org", "a-b.c.d.e.f.example.org"),
        ("bücher.example", "xn--bcher-kva.example"),  # IDNA on the wire
        (".".join(["a" * 63] * 3) + "." + "b" * 61, ".".join(["a" * 63] * 3) + "." + "b" * 61),
    ],
)
@pytest.mark.parametrize("maximum", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.MAXIMUM_SUPPORTED])
def test_sni_of_a_real_client_hello(name: str, expected: str, maximum: ssl.TLSVersion) -> None:
    hello = client_hello(name, maximum)
    assert looks_like_tls(hello)
    assert tls_server_name(hello) == expected
    # Whatever follows the first record does not matter.
    assert tls_server_name(hello + b"\x17\x03\x03\x00\x05hello") == expected


@pytest.mark.parametrize("name", [None, "127.0.0.1", "::1", "10.0.2.100"])
def test_no_sni_is_none(name: str | None) -> None:
    assert tls_server_name(client_hello(name)) is None


def test_every_proper_prefix_of_a_client_hello_needs_more() -> None:
    hello = client_hello("api.example.com")
    for end in range(len(hello)):
        assert tls_server_name(hello[:end]) == NEED_MORE, end


def test_not_a_handshake_record_is_none() -> None:
    hello = client_hello("api.example.com")
    for first in (0x14, 0x15, 0x17, 0x47, 0x00):
        assert tls_server_name(bytes([first]) + hello[1:]) is None
    assert not looks_like_tls(b"GET / HTTP/1.1\r\n")
    assert not looks_like_tls(b"")


def test_a_handshake_that_is_not_a_client_hello_is_none() -> None:
    hello = bytearray(client_hello("api.example.com"))
    hello[5] = 0x02  # ServerHello
    assert tls_server_name(bytes(hello)) is None


def test_a_client_hello_split_across_records_is_refused() -> None:
    hello = client_hello("api.example.com")
    (record_len,) = struct.unpack_from("!H", hello, 3)
    first = 40  # the first record carries only the start of the ClientHello
    split = hello[:3] + struct.pack("!H", first) + hello[5 : 5 + first]
    split += hello[:3] + struct.pack("!H", record_len - first) + hello[5 + first :]
    assert tls_server_name(split) is None


def test_a_record_longer_than_the_limit_is_refused_not_awaited() -> None:
    header = b"\x16\x03\x01" + struct.pack("!H", MAX_HEAD)
    assert tls_server_name(header + b"\x01") is None
    fits = b"\x16\x03\x01" + struct.pack("!H", MAX_HEAD - 5)
    assert tls_server_name(fits + b"\x01") == NEED_MORE


def _hello_with_extensions(extensions: bytes) -> bytes:
    body = b"\x03\x03" + bytes(32) + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
    body += struct.pack("!H", len(extensions)) + extensions
    handshake = b"\x01" + struct.pack("!I", len(body))[1:] + body
    return b"\x16\x03\x01" + struct.pack("!H", len(handshake)) + handshake


def _sni_extension(*entries: tuple[int, bytes]) -> bytes:
    names = b"".join(bytes([kind]) + struct.pack("!H", len(n)) + n for kind, n in entries)
    data = struct.pack("!H", len(names)) + names
    return struct.pack("!HH", 0, len(data)) + data


def test_crafted_hellos() -> None:
    other = struct.pack("!HH", 0x000A, 4) + b"\x00\x02\x00\x1d"
    assert tls_server_name(_hello_with_extensions(_sni_extension((0, b"x.example")))) == (
        "x.example"
    )
    assert tls_server_name(_hello_with_extensions(other + _sni_extension((0, b"y.example")))) == (
        "y.example"
    )
    # A name type other than host_name is skipped.
    assert (
        tls_server_name(_hello_with_extensions(_sni_extension((1, b"zzz"), (0, b"z.example"))))
        == "z.example"
    )
    assert tls_server_name(_hello_with_extensions(other)) is None
    assert tls_server_name(_hello_with_extensions(b"")) is None
    assert tls_server_name(_hello_with_extensions(_sni_extension((0, b"\xff\xfe")))) is None
    # No extensions block at all (SSLv3-style hello).
    body = b"\x03\x03" + bytes(32) + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
    handshake = b"\x01" + struct.pack("!I", len(body))[1:] + body
    assert tls_server_name(b"\x16\x03\x01" + struct.pack("!H", len(handshake)) + handshake) is None
    # A record of length zero.
    assert tls_server_name(b"\x16\x03\x01\x00\x00") is None


def _mutations(rng: random.Random, seed: bytes, count: int) -> list[bytes]:
    out = []
    for _ in range(count):
        data = bytearray(seed)
        for _ in range(rng.randint(1, 8)):
            choice = rng.randrange(4)
            if choice == 0 and data:
                data[rng.randrange(len(data))] = rng.randrange(256)
            elif choice == 1 and data:
                del data[rng.randrange(len(data)) :]
            elif choice == 2:
                data.insert(rng.randrange(len(data) + 1), rng.randrange(256))
            elif data:
                pos = rng.randrange(max(1, len(data) - 1))
                data[pos : pos + 2] = rng.choice([b"\xff\xff", b"\x00\x00", b"\x00\x01"])
        out.append(bytes(data))
    return out


def _fuzz_inputs() -> list[bytes]:
    rng = random.Random(20240611)
    inputs: list[bytes] = [b"", b"\x16", b"\x16\x03", b"\x16\x03\x01\xff\xff"]
    inputs += [rng.randbytes(rng.randrange(0, 600)) for _ in range(1500)]
    inputs += [b"\x16\x03\x01" + rng.randbytes(rng.randrange(0, 600)) for _ in range(1500)]
    for name in ("api.example.com", None):
        inputs += _mutations(rng, client_hello(name), 1500)
    inputs += _mutations(rng, b"GET http://x/ HTTP/1.1\r\nHost: x:80\r\n\r\n", 800)
    return inputs


def test_tls_parser_never_raises_on_garbage() -> None:
    for data in _fuzz_inputs():
        result = tls_server_name(data)
        assert result is None or isinstance(result, str), data


def test_http_parser_never_raises_on_garbage() -> None:
    for data in _fuzz_inputs():
        result = http_head(data)
        assert result is None or result == NEED_MORE or isinstance(result, HttpHead), data
        if isinstance(result, HttpHead):
            for _, value in result.headers:
                split_host_port(value, 80)


def test_split_host_port_never_raises() -> None:
    rng = random.Random(7)
    alphabet = "[]:0123456789a.\u00b2\u0661 "
    for _ in range(5000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(12)))
        result = split_host_port(text, 443)
        if result is not None:
            host, port = result
            assert host and 0 < port < 65536


# -- HTTP -------------------------------------------------------------------------


def test_http_head_of_a_complete_request() -> None:
    data = (
        b"POST /v1/x?y=1 HTTP/1.1\r\nHost: api.example.com:8443\r\n"
        b"Content-Length: 5\r\nX-Empty:\r\nX-Spaced:   a b  \r\n\r\nhello"
    )
    head = http_head(data)
    assert isinstance(head, HttpHead)
    assert (head.method, head.target, head.version) == ("POST", "/v1/x?y=1", "HTTP/1.1")
    assert head.header("host") == "api.example.com:8443"
    assert head.header("HOST") == "api.example.com:8443"
    assert head.header("x-empty") == ""
    assert head.header("x-spaced") == "a b"
    assert head.header("absent") is None
    assert data[head.length :] == b"hello"
    assert http_head(b"GET / HTTP/1.0\r\n\r\n") == HttpHead("GET", "/", "HTTP/1.0", (), 18)


def test_http_head_needs_more_until_the_blank_line() -> None:
    data = b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n"
    for end in range(len(data)):
        assert http_head(data[:end]) == NEED_MORE, end
    assert isinstance(http_head(data), HttpHead)


def test_an_endless_head_is_refused_at_the_limit() -> None:
    assert http_head(b"GET / HTTP/1.1\r\nX: " + b"a" * MAX_HEAD) is None
    assert http_head(b"G" * (MAX_HEAD - 1)) == NEED_MORE


@pytest.mark.parametrize(
    "data",
    [
        b"\r\n\r\n",
        b"GET /\r\n\r\n",
        b"GET / HTTP/2\r\n\r\n",
        b"GET / HTTP/1.1 extra\r\n\r\n",
        b"GET  / HTTP/1.1\r\n\r\n",
        b"G3T / HTTP/1.1\r\n\r\n",
        b"/ GET HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nNoColon\r\n\r\n",
        b"GET / HTTP/1.1\r\n: empty-name\r\n\r\n",
        b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nName : x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\nAuthorization: x\r\n\r\n",  # bare LF smuggles a header
        b"GET / HTTP/1.1\r\nX\nAuthorization: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\rb\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\x00b\r\n\r\n",
        b"GET / HTTP/1.1\r\nX\x00Y: a\r\n\r\n",
        b"\x16\x03\x01\x00\x05\r\n\r\n",
    ],
)
def test_malformed_heads_are_none(data: bytes) -> None:
    assert http_head(data) is None


def test_render_head_round_trips() -> None:
    head = http_head(b"GET http://a.example/x HTTP/1.1\r\nHost: a.example\r\nAccept: */*\r\n\r\n")
    assert isinstance(head, HttpHead)
    out = render_head(head, "/x", [("Host", "a.example"), ("Connection", "close")])
    assert out == b"GET /x HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n"
    again = http_head(out)
    assert isinstance(again, HttpHead) and again.length == len(out)


@pytest.mark.parametrize(
    ("authority", "expected"),
    [
        ("example.com", ("example.com", 443)),
        ("example.com:8443", ("example.com", 8443)),
        ("  example.com:80 ", ("example.com", 80)),
        ("[::1]:8080", ("::1", 8080)),
        ("[2606:4700::1111]", ("2606:4700::1111", 443)),
        ("example.com:65535", ("example.com", 65535)),
        ("", None),
        (":443", None),
        ("example.com:", ("example.com", 443)),
        ("example.com:0", None),
        ("example.com:65536", None),
        ("example.com:http", None),
        ("example.com:-1", None),
        ("example.com:\u00b2", None),
        ("example.com:\u0661", None),
        ("::1", None),
        ("[::1", None),
        ("[::1]x", None),
        ("[::1]:", ("::1", 443)),
        ("[]:443", None),
        ("a:b:c", None),
    ],
)
def test_split_host_port(authority: str, expected: tuple[str, int] | None) -> None:
    assert split_host_port(authority, 443) == expected


# -- DNS --------------------------------------------------------------------------


def dns_message(
    name: str, qtype: int = 1, ident: int = 0x1234, flags: int = 0x0100, extra: bytes = b""
) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".") if p)
    question = labels + b"\0" + struct.pack("!HH", qtype, 1)
    arcount = 1 if extra else 0
    return struct.pack("!HHHHHH", ident, flags, 1, 0, 0, arcount) + question + extra


# An EDNS0 OPT record, as dig and glibc with "options edns0" add.
_OPT = b"\x00" + struct.pack("!HHIH", 41, 1232, 0, 0)


class Answer(TypedDict):
    """A DNS reply taken apart: the header's fields, the question, the records."""

    id: int
    qr: bool
    opcode: int
    rd: bool
    ra: bool
    rcode: int
    counts: tuple[int, int, int, int]
    name: str
    qtype: int
    qclass: int
    records: list[tuple[int, int, int, int, bytes]]


def parse_answer(message: bytes) -> Answer:
    ident, flags, qd, an, ns, ar = struct.unpack_from("!HHHHHH", message, 0)
    pos = 12
    labels = []
    while message[pos]:
        labels.append(message[pos + 1 : pos + 1 + message[pos]].decode())
        pos += 1 + message[pos]
    qtype, qclass = struct.unpack_from("!HH", message, pos + 1)
    pos += 5
    records: list[tuple[int, int, int, int, bytes]] = []
    for _ in range(an):
        pointer, rtype, rclass, ttl, rdlen = struct.unpack_from("!HHHIH", message, pos)
        pos += 12
        records.append((pointer, rtype, rclass, ttl, message[pos : pos + rdlen]))
        pos += rdlen
    assert pos == len(message)
    return {
        "id": ident, "qr": bool(flags & 0x8000), "opcode": (flags >> 11) & 0xF,
        "rd": bool(flags & 0x0100), "ra": bool(flags & 0x0080), "rcode": flags & 0xF,
        "counts": (qd, an, ns, ar), "name": ".".join(labels), "qtype": qtype,
        "qclass": qclass, "records": records,
    }  # fmt: skip


def test_a_query_gets_the_egress_address() -> None:
    query = dns_query(dns_message("API.Example.com", ident=0xBEEF))
    assert query is not None
    assert (query.ident, query.name, query.qtype) == (0xBEEF, "api.example.com", 1)
    answer = parse_answer(dns_answer(query, "10.0.2.100"))
    assert answer["id"] == 0xBEEF
    assert answer["qr"] and answer["rd"] and answer["ra"]
    assert (answer["opcode"], answer["rcode"]) == (0, 0)
    assert answer["counts"] == (1, 1, 0, 0)
    assert answer["name"] == "API.Example.com"  # the question is echoed as asked
    assert (answer["qtype"], answer["qclass"]) == (1, 1)
    assert answer["records"] == [(0xC00C, 1, 1, 60, bytes([10, 0, 2, 100]))]


def test_recursion_desired_is_copied_not_invented() -> None:
    query = dns_query(dns_message("a.example", flags=0))
    assert query is not None
    answer = parse_answer(dns_answer(query, "10.0.2.100"))
    assert not answer["rd"] and answer["qr"]


def test_a_refused_name_is_nxdomain() -> None:
    query = dns_query(dns_message("evil.example", ident=7))
    assert query is not None
    answer = parse_answer(dns_answer(query, None))
    assert answer["id"] == 7 and answer["qr"]
    assert answer["rcode"] == 3
    assert answer["counts"] == (1, 0, 0, 0)
    assert answer["records"] == []


@pytest.mark.parametrize("qtype", [28, 15, 16, 255, 65])
def test_other_types_are_an_empty_noerror(qtype: int) -> None:
    query = dns_query(dns_message("api.example.com", qtype=qtype))
    assert query is not None and query.qtype == qtype
    answer = parse_answer(dns_answer(query, "10.0.2.100"))
    assert answer["rcode"] == 0
    assert answer["counts"] == (1, 0, 0, 0)
    assert answer["qtype"] == qtype


def test_only_the_first_question_is_answered_and_edns_is_ignored() -> None:
    message = dns_message("a.example", extra=_OPT)
    query = dns_query(message)
    assert query is not None and query.name == "a.example"
    answer = parse_answer(dns_answer(query, "10.0.2.100"))
    assert answer["counts"] == (1, 1, 0, 0)


def test_the_root_name_parses() -> None:
    query = dns_query(dns_message(""))
    assert query is not None and query.name == ""


def test_a_name_of_255_octets_parses() -> None:
    name = ".".join(["a" * 63] * 3 + ["b" * 61])  # 254 octets of labels, the root's 0
    query = dns_query(dns_message(name))
    assert query is not None and query.name == name


@pytest.mark.parametrize(
    "message",
    [
        b"",
        b"\x12\x34",
        dns_message("a.example")[:11],
        dns_message("a.example")[:-1],  # qclass cut short
        dns_message("a.example")[:-4],  # no qtype/qclass
        dns_message("a.example")[:15],  # inside a label
        dns_message("a.example", flags=0x8100),  # a response, not a query
        struct.pack("!HHHHHH", 1, 0x0100, 0, 0, 0, 0),  # no question
        struct.pack("!HHHHHH", 1, 0x0100, 1, 0, 0, 0) + b"\xc0\x0c\x00\x01\x00\x01",  # pointer
        struct.pack("!HHHHHH", 1, 0x0100, 1, 0, 0, 0) + b"\x02\xff\xfe\x00\x00\x01\x00\x01",
        dns_message(".".join(["a" * 63] * 4)),  # 257 octets: a name has at most 255
    ],
)
def test_malformed_queries_are_none(message: bytes) -> None:
    assert dns_query(message) is None


def test_dns_parser_never_raises_on_garbage() -> None:
    rng = random.Random(53)
    seed = dns_message("api.example.com", extra=_OPT)
    for data in [rng.randbytes(rng.randrange(40)) for _ in range(3000)]:
        dns_query(data)
        dns_format_error(data)
    for data in _mutations(rng, seed, 3000):
        query = dns_query(data)
        if query is not None:
            parse_answer(dns_answer(query, "10.0.2.100"))
            parse_answer(dns_answer(query, None))


def test_format_error_echoes_the_id() -> None:
    error = dns_format_error(b"\xab\xcd garbage")
    assert struct.unpack("!HHHHHH", error) == (0xABCD, 0x8001, 0, 0, 0, 0)
    assert struct.unpack("!HHHHHH", dns_format_error(b"\x01")) == (0, 0x8001, 0, 0, 0, 0)


def test_need_more_is_a_distinct_value() -> None:
    assert sniff.NEED_MORE not in (None, "")
