"""Network policy as plain data: allowlist entries, addresses, port forwards."""

from __future__ import annotations

import pytest

from microvm_run import netpolicy
from microvm_run.netpolicy import (
    BASE_PORTS,
    KEY_PROXY_PORT,
    AllowRule,
    KeyRoute,
    PolicyError,
    PortForward,
    check_unique_forwards,
    extra_ports,
    key_route_refusal,
    parse_allow,
    parse_allow_file,
    parse_port_forward,
    permitted,
    private_permitted,
    public_address,
)


@pytest.mark.parametrize(
    ("entry", "rule"),
    [
        ("api.example.com", AllowRule("api.example.com")),
        ("localhost", AllowRule("localhost")),
        ("*.example.com", AllowRule("example.com", wildcard=True)),
        ("git.example.com:8443", AllowRule("git.example.com", port=8443)),
        ("*.example.com:443", AllowRule("example.com", wildcard=True, port=443)),
        ("API.Example.COM", AllowRule("api.example.com")),
        ("api.example.com.", AllowRule("api.example.com")),
        ("  Api.Example.Com.  ", AllowRule("api.example.com")),
        ("*.EXAMPLE.com.", AllowRule("example.com", wildcard=True)),
        ("api.example.com.:443", AllowRule("api.example.com", port=443)),
        ("x:1", AllowRule("x", port=1)),
        ("x:65535", AllowRule("x", port=65535)),
        ("a-b.c0.example", AllowRule("a-b.c0.example")),
    ],
)
def test_parse_allow_accepts_and_normalises(entry: str, rule: AllowRule) -> None:
    assert parse_allow(entry) == rule


@pytest.mark.parametrize(
    "entry",
    [
        "",
        "   ",
        "*",
        "*.",
        ".",
        "a..b",
        ".example.com",
        "*.*.x",
        "a.*.b",
        "*example.com",
        "ex*ample.com",
        "host:0",
        "host:65536",
        "host:99999",
        "host:",
        "host:-1",
        "host:+443",
        "host:44 3",
        "host:\u00b2",  # superscript two: str.isdigit() says yes, int() says no
        "host:\u0661",  # Arabic-Indic one: a digit to Python, not a port
        "http://x",
        "https://api.example.com",
        "api.example.com/v1",
        "a b",
        "api .example.com",
        "-a.example.com",
        "a-.example.com",
        "a_b.example.com",
        "[::1]:443",
        "::1",
        "user@example.com",
        "x" * 64 + ".com",
        ".".join(["a" * 63] * 4) + ".com",  # 258 characters
        "bücher.example",
    ],
)
def test_parse_allow_rejects_with_one_line(entry: str) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_allow(entry)
    assert "\n" not in str(caught.value)
    assert repr(entry) in str(caught.value)


def test_longest_labels_and_names_are_accepted() -> None:
    assert parse_allow("x" * 63 + ".com").host == "x" * 63 + ".com"
    name = ".".join(["a" * 63] * 3) + "." + "b" * 61  # 253 characters
    assert len(name) == 253
    assert parse_allow(name).host == name


def test_wildcard_matches_subdomains_only() -> None:
    rule = parse_allow("*.example.com")
    assert rule.matches("api.example.com", 443)
    assert rule.matches("a.b.example.com", 80)
    assert not rule.matches("example.com", 443)
    assert not rule.matches("evilexample.com", 443)
    assert not rule.matches("example.com.evil.net", 443)
    assert not rule.matches("api.example.co", 443)


def test_exact_rule_matches_only_that_host() -> None:
    rule = parse_allow("example.com")
    assert rule.matches("example.com", 443)
    assert not rule.matches("api.example.com", 443)
    assert not rule.matches("example.com.evil.net", 443)
    assert not rule.matches("xexample.com", 443)


def test_port_specific_rules_match_only_their_port() -> None:
    rule = parse_allow("git.example.com:8443")
    assert rule.matches("git.example.com", 8443)
    assert not rule.matches("git.example.com", 443)
    wild = parse_allow("*.example.com:22")
    assert wild.matches("a.example.com", 22)
    assert not wild.matches("a.example.com", 443)
    # Without a port, a rule admits the web ports only.
    assert not parse_allow("git.example.com").matches("git.example.com", 8443)
    assert parse_allow("git.example.com").matches("git.example.com", 80)
    assert parse_allow("git.example.com").matches("git.example.com", 443)


def test_permitted_normalises_the_host_it_is_asked_about() -> None:
    rules = (parse_allow("api.example.com"), parse_allow("*.corp.example:8443"))
    assert permitted(rules, "API.Example.com.", 443)
    assert permitted(rules, "git.corp.example", 8443)
    assert not permitted(rules, "git.corp.example", 443)
    assert not permitted(rules, "corp.example", 8443)
    assert not permitted(rules, "other.example", 443)
    assert not permitted((), "api.example.com", 443)


@pytest.mark.parametrize(
    "entry", ["api.example.com", "*.example.com", "git.example.com:8443", "*.example.com:22"]
)
def test_rules_print_as_they_parse(entry: str) -> None:
    assert str(parse_allow(entry)) == entry
    assert parse_allow(str(parse_allow(entry))) == parse_allow(entry)


def test_allow_file_has_comments_and_names_the_bad_line() -> None:
    text = "# the team's hosts\napi.example.com  # the API\n\n  *.cdn.example  \n"
    assert parse_allow_file(text, "f") == [
        AllowRule("api.example.com"),
        AllowRule("cdn.example", wildcard=True),
    ]
    with pytest.raises(PolicyError, match=r"^proj\.allow:3: allow entry 'a\.\.b'"):
        parse_allow_file("ok.example\n# fine\na..b\n", "proj.allow")


def test_extra_ports_are_the_rule_ports_beyond_the_fixed_ones() -> None:
    rules = tuple(
        parse_allow(e)
        for e in ("a.example:8443", "b.example:22", "c.example:443", "d.example", "e.example:22",
                  f"f.example:{KEY_PROXY_PORT}", "g.example:53", "h.example:3128")
    )  # fmt: skip
    assert extra_ports(rules) == (22, 8443)
    assert not set(extra_ports(rules)) & set(BASE_PORTS)
    assert extra_ports(()) == ()


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.1.2.3",
        "10.0.0.1",
        "10.255.255.255",
        "172.16.0.1",
        "172.31.255.254",
        "192.168.1.1",
        "169.254.169.254",  # cloud metadata
        "100.64.0.1",  # CGNAT
        "100.127.255.254",
        "0.0.0.0",
        "0.1.2.3",
        "255.255.255.255",
        "224.0.0.1",
        "239.255.255.250",
        "240.0.0.1",
        "192.0.2.1",  # documentation
        "198.18.0.1",  # benchmarking
        "::",
        "::1",
        "fe80::1",
        "fe80::1%eth0",
        "fc00::1",
        "fd12:3456::1",
        "ff02::1",
        "ff0e::1",
        "2001:db8::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "::ffff:192.168.0.1",
        "::ffff:169.254.169.254",
        "::127.0.0.1",  # IPv4-compatible (deprecated)
        "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
        "64:ff9b::10.0.0.1",  # NAT64 of the LAN
        "2002:7f00:1::1",  # 6to4 of 127.0.0.1
        "2002:c0a8:101::1",  # 6to4 of 192.168.1.1
        # RFC 8215 local-use NAT64: a gateway on the LAN, whatever
        # ipaddress.is_global says on the running Python release.
        "64:ff9b:1::1",
        "64:ff9b:1::a00:1",
        "64:ff9b:1:ffff:ffff:ffff:ffff:ffff",
        "100.64.0.1",  # CGNAT
        "192.0.0.9",
        "198.18.0.1",
        "",
        "garbage",
        "localhost",
        "1.2.3",
        "1.2.3.4.5",
        "256.1.1.1",
        "01.1.1.1",
        "1.1.1.1 ",
        "[2606:4700::1111]",
    ],
)
def test_public_address_refuses_everything_not_globally_routed(address: str) -> None:
    assert not public_address(address)


@pytest.mark.parametrize(
    "address",
    ["1.1.1.1", "8.8.8.8", "93.184.216.34", "2606:4700::1111", "2a00:1450:4001:80b::200e",
     "::ffff:1.1.1.1", "64:ff9b::1.1.1.1", "2002:101:101::1"],
)  # fmt: skip
def test_public_address_accepts_global_unicast(address: str) -> None:
    assert public_address(address)


def test_allow_private_rules_are_separate_and_say_so() -> None:
    plain = parse_allow("db.corp.example:5432")
    private = parse_allow("db.corp.example:5432", private=True)
    assert plain != private and private.private and not plain.private
    assert str(private) == "db.corp.example:5432 (private)"
    rules = (plain, parse_allow("*.lan.example", private=True))
    assert permitted(rules, "db.corp.example", 5432)
    assert not private_permitted(rules, "db.corp.example", 5432)
    assert private_permitted(rules, "nas.lan.example", 443)
    assert not private_permitted(rules, "nas.lan.example", 22)  # the web ports only
    assert not private_permitted(rules, "lan.example", 443)


def _route(**kw: object) -> KeyRoute:
    return KeyRoute("anthropic-api-key", "ANTHROPIC_API_KEY", "https://api.example", "x-api-key",
                    **kw)  # type: ignore[arg-type]  # fmt: skip


@pytest.mark.parametrize(
    "target", ["/v1/messages", "/v1/messages?beta=true", "/v1/models", "/v1/messages/count_tokens"]
)
def test_key_route_admits_the_apis_methods_and_paths(target: str) -> None:
    for method in ("GET", "POST"):
        assert key_route_refusal(_route(), method, target) is None


@pytest.mark.parametrize("method", ["TRACE", "TRACK", "OPTIONS", "CONNECT", "PUT", "DELETE",
                                    "PATCH", "HEAD", "get", "PROPFIND"])  # fmt: skip
def test_key_route_refuses_other_methods(method: str) -> None:
    refusal = key_route_refusal(_route(), method, "/v1/messages")
    assert refusal is not None and "method" in refusal


@pytest.mark.parametrize(
    "target",
    ["/", "/v1", "/v2/messages", "/api/oauth", "/v1/../admin", "/v1/./x", "/v1//x",
     "/v1/%2e%2e/admin", "/v1/%2E%2E/admin", "/v1%2fadmin", "/v1/x%2Fy", "/v1/x%5cy",
     "/v1/x\\y", "/v1/x y", "v1/messages", "/v1/x%00", "/v1/..;/..;/admin", "/v1/x;y"],
)  # fmt: skip
def test_key_route_refuses_paths_outside_the_api_in_any_spelling(target: str) -> None:
    assert key_route_refusal(_route(), "POST", target) is not None


def test_key_route_paths_and_methods_are_data() -> None:
    route = _route(methods=("POST",), paths=("/v1beta/", "/v1/"))
    assert key_route_refusal(route, "POST", "/v1beta/models/x:generateContent") is None
    assert key_route_refusal(route, "GET", "/v1beta/models") is not None


@pytest.mark.parametrize(
    ("text", "forward"),
    [
        ("8080:80", PortForward("127.0.0.1", 8080, 80)),
        ("127.0.0.1:8080:80", PortForward("127.0.0.1", 8080, 80)),
        ("0.0.0.0:8080:80", PortForward("0.0.0.0", 8080, 80)),
        ("192.168.1.5:2222:22", PortForward("192.168.1.5", 2222, 22)),
        (" 1:65535 ", PortForward("127.0.0.1", 1, 65535)),
    ],
)
def test_parse_port_forward(text: str, forward: PortForward) -> None:
    assert parse_port_forward(text) == forward


def test_port_forwards_print_fully_qualified() -> None:
    assert str(parse_port_forward("8080:80")) == "127.0.0.1:8080:80"


@pytest.mark.parametrize(
    "text",
    ["", "8080", "8080:", ":80", "a:80", "8080:80:90:1", "0:80", "8080:0", "70000:80",
     "8080:70000", "localhost:8080:80", "1.2.3:8080:80", "1.2.3.4.5:8080:80",
     "256.0.0.1:8080:80", "01.2.3.4:8080:80", "[::1]:8080:80", "::1:8080:80", "8080:80/udp",
     "-1:80", "8080:\u00b2", "\u0668\u0660:80"],
)  # fmt: skip
def test_parse_port_forward_rejects_bad_forms(text: str) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_port_forward(text)
    assert str(caught.value).startswith("-p ") and "\n" not in str(caught.value)


def _forwards(*texts: str) -> tuple[PortForward, ...]:
    return tuple(parse_port_forward(t) for t in texts)


@pytest.mark.parametrize(
    "texts",
    [
        ("8080:80", "8080:81"),
        ("8080:80", "127.0.0.1:8080:80"),
        ("0.0.0.0:8080:80", "8080:81"),
        ("8080:80", "0.0.0.0:8080:81"),  # the wildcard second: still the same port
        ("192.168.1.5:8080:80", "0.0.0.0:8080:81"),
        ("0.0.0.0:8080:80", "0.0.0.0:8080:81"),
    ],
)
def test_a_host_port_forwarded_twice_is_refused_in_any_order(texts: tuple[str, ...]) -> None:
    with pytest.raises(PolicyError, match="host port 8080 is forwarded twice"):
        check_unique_forwards(_forwards(*texts))
    with pytest.raises(PolicyError, match="host port 8080 is forwarded twice"):
        check_unique_forwards(_forwards(*reversed(texts)))


def test_distinct_forwards_pass() -> None:
    check_unique_forwards(_forwards("8080:80", "8081:80", "192.168.1.5:8080:80"))
    check_unique_forwards(())


def test_a_refusal_offers_a_command_only_for_a_real_host_name() -> None:
    def text(host: str) -> str:
        return netpolicy.Refusal(host, 53, "dns", netpolicy.FIX_ALLOW, "allowlist", "abc").text()

    assert "microvm-run allow abc api.example.com" in text("api.example.com")
    assert "microvm-run allow abc 10.1.2.3" in text("10.1.2.3")
    hostile = text("x;{touch,/tmp/pwned};#")
    assert "microvm-run allow" not in hostile and hostile.startswith("microvm-run refused")
