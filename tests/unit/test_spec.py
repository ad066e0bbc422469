from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from microvm_run.spec import SPEC_V2_CRI_RUNTIMES, KeyProxy, SpecError, load_spec, parse_spec


def test_valid_spec_parses_to_typed_values(sample: dict[str, Any]) -> None:
    spec = parse_spec(sample, Path("/specs/claude.toml"))
    assert spec.agent == "claude"
    assert spec.command == ("claude", "--dangerously-skip-permissions")
    assert spec.memory_mib == 4096 and spec.vcpus == 4
    assert spec.kernel == Path("/nix/store/k-linux/bzImage")
    assert [s.source for s in spec.shares] == ["nix-store", "work", "home"]
    assert spec.shares[0].read_only and not spec.shares[1].read_only


def test_relative_paths_resolve_against_the_spec_dir(sample: dict[str, Any]) -> None:
    sample["guest"]["kernel"] = "vmlinuz"
    spec = parse_spec(sample, Path("/guests/test/spec.toml"))
    assert spec.kernel == Path("/guests/test/vmlinuz")


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("spec_version"), "spec_version"),
        (lambda d: d.update(spec_version=99), "newer than this microvm-run"),
        (lambda d: d.update(extra=1), "unknown key 'extra'"),
        (lambda d: d["agent"].update(name="Bad Name"), "agent.name"),
        (lambda d: d["agent"].update(command=[]), "must not be empty"),
        (lambda d: d["agent"].update(api_key_vars=["1BAD"]), "invalid name"),
        (lambda d: d["guest"].update(contract=9), "contract 9 is not supported"),
        (lambda d: d["guest"].update(machine="pc"), "guest.machine"),
        (lambda d: d["guest"].update(memory_mib=0), "out of range"),
        (lambda d: d["guest"].update(vcpus="4"), "must be an integer"),
        (lambda d: d["guest"].update(vcpus=True), "must be an integer"),
        (lambda d: d["host"].pop("qemu"), "qemu must be a non-empty string"),
        (lambda d: d["shares"][1].update(source="usb"), "source 'usb'"),
        (lambda d: d["shares"][1].update(mount_point="work"), "must be absolute"),
        (lambda d: d["shares"][1].update(tag="a b"), "tag 'a b'"),
        (lambda d: d["shares"][0].update(read_only=False), "must be read_only"),
        (lambda d: d["shares"][2].update(tag="work"), "same tag 'work'"),
        (lambda d: d["shares"].pop(1), "no share with source 'work'"),
        (lambda d: d.update(shares={}), "array of tables"),
    ],
)
def test_bad_specs_are_rejected_with_one_clear_line(
    sample: dict[str, Any], mutate: Any, message: str
) -> None:
    mutate(sample)
    with pytest.raises(SpecError, match=message) as caught:
        parse_spec(sample, Path("/specs/claude.toml"))
    assert "\n" not in str(caught.value)


def test_load_spec_reports_corrupt_toml(tmp_path: Path) -> None:
    path = tmp_path / "spec.toml"
    path.write_text("spec_version = [\n")
    with pytest.raises(SpecError, match="not valid TOML"):
        load_spec(path)


def test_load_spec_reports_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="cannot read spec"):
        load_spec(tmp_path / "absent.toml")


# -- spec version 2: [network] and [[key_proxy]] ----------------------------------

KEY_PROXY: dict[str, Any] = {
    "var": "ANTHROPIC_API_KEY",
    "upstream": "https://api.anthropic.com",
    "header": "x-api-key",
    "base_url_var": "ANTHROPIC_BASE_URL",
}


@pytest.mark.parametrize("version", [1, 2])
def test_network_and_key_proxy_tables_parse(sample: dict[str, Any], version: int) -> None:
    sample["spec_version"] = version
    sample["network"] = {"allow": ["api.anthropic.com", "*.example.com", "git.corp:8443"]}
    sample["key_proxy"] = [KEY_PROXY | {"base_url_path": "/v1"}]
    spec = parse_spec(sample, Path("/specs/claude.toml"))
    assert spec.allow == ("api.anthropic.com", "*.example.com", "git.corp:8443")
    # Without methods and paths: the defaults, GET and POST under /v1/.
    assert spec.key_proxies[0].methods == ("GET", "POST")
    assert spec.key_proxies[0].paths == ("/v1/",)
    assert spec.key_proxies == (
        KeyProxy(
            var="ANTHROPIC_API_KEY",
            upstream="https://api.anthropic.com",
            header="x-api-key",
            base_url_var="ANTHROPIC_BASE_URL",
            base_url_path="/v1",
        ),
    )


def test_key_route_methods_and_paths_are_read(sample: dict[str, Any]) -> None:
    sample["key_proxy"] = [KEY_PROXY | {"methods": ["POST"], "paths": ["/v1beta/", "/v1/"]}]
    (proxy,) = parse_spec(sample, Path("/specs/gemini.toml")).key_proxies
    assert (proxy.methods, proxy.paths) == (("POST",), ("/v1beta/", "/v1/"))


def test_version_2_without_the_new_tables_has_no_allowlist_or_key_proxies(
    sample: dict[str, Any],
) -> None:
    sample["spec_version"] = 2
    spec = parse_spec(sample, Path("/specs/claude.toml"))
    assert spec.allow == () and spec.key_proxies == ()
    sample["network"] = {}
    assert parse_spec(sample, Path("/specs/claude.toml")).allow == ()


def test_version_4_is_refused(sample: dict[str, Any]) -> None:
    sample["spec_version"] = 4
    with pytest.raises(SpecError, match="newer than this microvm-run"):
        parse_spec(sample, Path("/specs/claude.toml"))


CRI_SHARE = {"tag": "cri", "source": "cri-storage", "mount_point": "/var/lib/containers"}


def test_version_3_lists_the_flavors_container_runtimes(sample: dict[str, Any]) -> None:
    sample["spec_version"] = 3
    assert parse_spec(sample, Path("/s.toml")).cri_runtimes == ()
    sample["shares"].append(CRI_SHARE)
    sample["guest"]["cri_runtimes"] = ["podman", "youki"]
    assert parse_spec(sample, Path("/s.toml")).cri_runtimes == ("podman", "youki")


def test_a_version_2_spec_with_container_storage_has_the_runtimes_of_its_day(
    sample: dict[str, Any],
) -> None:
    sample["spec_version"] = 2
    assert parse_spec(sample, Path("/s.toml")).cri_runtimes == ()
    sample["shares"].append(CRI_SHARE)
    assert parse_spec(sample, Path("/s.toml")).cri_runtimes == SPEC_V2_CRI_RUNTIMES
    sample["guest"]["cri_runtimes"] = ["docker"]  # not a version 2 key
    with pytest.raises(SpecError, match="unknown key 'cri_runtimes'"):
        parse_spec(sample, Path("/s.toml"))


@pytest.mark.parametrize(
    ("runtimes", "message"),
    [
        (["Docker"], "invalid name 'Docker'"),
        (["docker", "docker"], "names a runtime twice"),
        ("docker", "must be an array of strings"),
        (["docker", None], "must be an array of strings"),
    ],
)
def test_bad_container_runtime_lists_are_refused(
    sample: dict[str, Any], runtimes: Any, message: str
) -> None:
    sample["spec_version"] = 3
    sample["shares"].append(CRI_SHARE)
    sample["guest"]["cri_runtimes"] = runtimes
    with pytest.raises(SpecError, match=message):
        parse_spec(sample, Path("/s.toml"))


def test_container_runtimes_need_their_storage_share(sample: dict[str, Any]) -> None:
    sample["spec_version"] = 3
    sample["guest"]["cri_runtimes"] = ["docker"]
    with pytest.raises(SpecError, match="needs a share with source 'cri-storage'"):
        parse_spec(sample, Path("/s.toml"))


@pytest.mark.parametrize("header", ["x-api-key", "authorization", "x-goog-api-key"])
def test_every_key_header_is_accepted(sample: dict[str, Any], header: str) -> None:
    sample["key_proxy"] = [KEY_PROXY | {"header": header}]
    assert parse_spec(sample, Path("/s.toml")).key_proxies[0].header == header


@pytest.mark.parametrize(
    "upstream",
    ["https://api.anthropic.com", "http://127.0.0.1:8080", "https://example.com/v1/",
     "https://generativelanguage.googleapis.com/v1beta"],
)  # fmt: skip
def test_good_upstreams(sample: dict[str, Any], upstream: str) -> None:
    sample["key_proxy"] = [KEY_PROXY | {"upstream": upstream}]
    assert parse_spec(sample, Path("/s.toml")).key_proxies[0].upstream == upstream


def _key_proxy(**changes: Any) -> Any:
    def mutate(data: dict[str, Any]) -> None:
        data["key_proxy"] = [KEY_PROXY | changes]

    return mutate


def _without(key: str) -> Any:
    def mutate(data: dict[str, Any]) -> None:
        item = dict(KEY_PROXY)
        del item[key]
        data["key_proxy"] = [item]

    return mutate


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(network=["a"]), "network must be a table"),
        (lambda d: d.update(network={"allow": "api.example.com"}), r"\[network\]"),
        (lambda d: d.update(network={"allow": [1]}), r"\[network\]"),
        (lambda d: d.update(network={"allow": ["a..b"]}), r"\[network\]: allow entry 'a\.\.b'"),
        (lambda d: d.update(network={"allow": ["*"]}), r"\[network\]: allow entry '\*'"),
        (lambda d: d.update(network={"allow": ["host:0"]}), "port must be 1..65535"),
        (lambda d: d.update(network={"allow": ["https://x"]}), r"\[network\]"),
        (lambda d: d.update(network={"deny": []}), "unknown key 'deny'"),
        (lambda d: d.update(key_proxy={"var": "X"}), "array of tables"),
        (lambda d: d.update(key_proxy=["x"]), r"key_proxy\[0\]: must be a table"),
        (_key_proxy(var="OPENAI_API_KEY"), "var 'OPENAI_API_KEY' is not in agent.api_key_vars"),
        (_key_proxy(header="authorisation"), "header 'authorisation' must be one of"),
        (_key_proxy(header="X-Api-Key"), "header 'X-Api-Key' must be one of"),
        (_key_proxy(upstream="ftp://api.anthropic.com"), "must be an http"),
        (_key_proxy(upstream="api.anthropic.com"), "must be an http"),
        (_key_proxy(upstream="https://"), "must be an http"),
        (_key_proxy(upstream="https://a b.com"), "must be an http"),
        (_key_proxy(upstream="https://x.com/?q=1"), "must be an http"),
        (_key_proxy(upstream="https://x.com/#f"), "must be an http"),
        (_key_proxy(upstream="https://user@x.com"), "must be an http"),
        (_key_proxy(upstream="https://x.com:port"), "must be an http"),
        (_key_proxy(base_url_var="1BAD"), "base_url_var '1BAD' is not a variable name"),
        (_key_proxy(base_url_var="A-B"), "is not a variable name"),
        (_key_proxy(base_url_path="v1"), "base_url_path must be empty or start with /"),
        (_key_proxy(base_url_path=1), "base_url_path must be empty or start with /"),
        (_key_proxy(extra=1), "unknown key 'extra'"),
        (_key_proxy(methods=["GET", "TRACE"]), "must not include TRACE"),
        (_key_proxy(methods=["CONNECT"]), "must not include TRACE, TRACK or CONNECT"),
        (_key_proxy(methods=["get"]), "methods must be a non-empty list"),
        (_key_proxy(methods=[]), "methods must be a non-empty list"),
        (_key_proxy(methods="GET"), "methods must be a non-empty list"),
        (_key_proxy(paths=["/v1"]), "paths must be a non-empty list"),
        (_key_proxy(paths=["/"]), "paths must be a non-empty list"),
        (_key_proxy(paths=["/v1/../"]), "paths must be a non-empty list"),
        (_key_proxy(paths=["v1/"]), "paths must be a non-empty list"),
        (_without("var"), "var"),
        (_without("upstream"), "upstream"),
        (_without("header"), "header"),
        (_without("base_url_var"), "base_url_var"),
        (lambda d: d.update(key_proxy=[KEY_PROXY, KEY_PROXY]), "two key_proxy entries"),
    ],
)
def test_bad_network_and_key_proxy_tables_are_rejected(
    sample: dict[str, Any], mutate: Any, message: str
) -> None:
    sample["spec_version"] = 2
    mutate(sample)
    with pytest.raises(SpecError, match=message) as caught:
        parse_spec(sample, Path("/specs/claude.toml"))
    assert "\n" not in str(caught.value)
