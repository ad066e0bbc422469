"""The host module's isolation, for real: its rendered nftables ruleset in namespaces.

modules/host.nix's ruleset, networkd bridge and egress proxy configuration
are rendered into tests/host-network/rendered by `make eval-modules` (from
the evaluation of two VMs: alpha `open`, beta `allowlist` with a key). Here
they are loaded as they are into network namespaces this test makes, none
of them the machine's own:

    guest (QEMU, TCG) --tap vm-NAME-- [H: bridge microbr 10.77.0.1/24,
        nft -f ruleset.nft, microvm-run-egress, listeners on 10.77.0.1 and
        192.168.50.2] --ext0-- [R: LAN 192.168.50.1, a listener; routes to]
        --up0-- [P: "public" 192.31.196.1 (allowed.amvm.test,
        keys.amvm.test) and 192.31.196.2 (denied.amvm.test), listeners]

The busybox test guest (tests/guest/build with tests/host-network/guest-init)
runs a script as root: the attacker.  Every assertion is made on the host
side, on what the listeners received.  No traffic leaves the machine: the
namespaces have no link to anything else.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from microvm_run import hostvms, netpolicy
from microvm_run.plan import KEY_PLACEHOLDER
from tests.integration.conftest import REPO
from tests.support.prereq import require

RENDERED = REPO / "tests" / "host-network" / "rendered"
BOOT_TIMEOUT_S = 240
PUBLIC = "192.31.196.1"
PUBLIC_DENIED = "192.31.196.2"
LAN = "192.168.50.1"
HOST_EXT = "192.168.50.2"
ROUTER_UP = "192.31.196.254"
CANARY = "sk-canary-" + os.urandom(8).hex()


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=check, capture_output=True, text=True)


def ns(name: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return sh("ip", "netns", "exec", name, *argv, check=check)


def _ini(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key] = value
    return values


@dataclass
class Net:
    host: str
    router: str
    public: str
    other_vm: str
    other_vm_address: str
    bridge: str
    gateway: str
    prefix: int
    scratch: Path
    guests: dict[str, dict[str, object]]
    processes: list[subprocess.Popen[bytes]]

    def listener_log(self, name: str) -> str:
        path = self.scratch / "listen" / f"{name}.log"
        return path.read_text() if path.exists() else ""

    def start(
        self, namespace: str, *argv: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        full = ["ip", "netns", "exec", namespace, *argv]
        process = subprocess.Popen(
            full, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True
        )
        self.processes.append(process)
        return process


@pytest.fixture(scope="module")
def topology(host_env: dict[str, str], scratch: Path) -> Iterator[Net]:
    for tool in ("ip", "nft", "qemu-system-x86_64"):
        require(shutil.which(tool) is not None, f"{tool} (scripts/setup-host installs nftables)")
    require(os.geteuid() == 0, "root (network namespaces)")
    netdev = _ini(RENDERED / "networkd" / "20-microbr.netdev")
    network = _ini(RENDERED / "networkd" / "20-microbr.network")
    gateway, prefix = network["Address"].split("/")
    tag = os.urandom(3).hex()
    net = Net(
        host=f"amvmH{tag}",
        router=f"amvmR{tag}",
        public=f"amvmP{tag}",
        other_vm=f"amvmV{tag}",
        # a host number no VM of the rendered set has
        other_vm_address=str(ipaddress.ip_interface(network["Address"]).network[250]),
        bridge=netdev["Name"],
        gateway=gateway,
        prefix=int(prefix),
        scratch=scratch / f"hostnet-{tag}",
        guests=json.loads((RENDERED / "guests.json").read_text()),
        processes=[],
    )
    (net.scratch / "listen").mkdir(parents=True)
    etc = Path("/etc/netns") / net.host
    try:
        for name in (net.host, net.router, net.public, net.other_vm):
            sh("ip", "netns", "add", name)
            ns(name, "ip", "link", "set", "lo", "up")
        # H: the bridge as networkd makes it (name and address from the rendered units)
        ns(net.host, "ip", "link", "add", net.bridge, "type", "bridge")
        ns(net.host, "ip", "addr", "add", f"{gateway}/{prefix}", "dev", net.bridge)
        ns(net.host, "ip", "link", "set", net.bridge, "up")
        for guest in net.guests.values():
            tap = str(guest["tap"])
            ns(net.host, "ip", "tuntap", "add", "dev", tap, "mode", "tap")
            ns(net.host, "ip", "link", "set", tap, "master", net.bridge, "up")
        # Another VM on the bridge (a namespace behind a port named like a tap)
        sh(
            "ip", "link", "add", "vm-other", "netns", net.host,
            "type", "veth", "peer", "eth0", "netns", net.other_vm,
        )  # fmt: skip
        ns(net.host, "ip", "link", "set", "vm-other", "master", net.bridge, "up")
        ns(net.other_vm, "ip", "addr", "add", f"{net.other_vm_address}/{prefix}", "dev", "eth0")
        ns(net.other_vm, "ip", "link", "set", "eth0", "up")
        # H's uplink to R (the LAN), R's to P (the "internet")
        sh(
            "ip",
            "link",
            "add",
            "ext0",
            "netns",
            net.host,
            "type",
            "veth",
            "peer",
            "lan0",
            "netns",
            net.router,
        )
        sh(
            "ip",
            "link",
            "add",
            "up0",
            "netns",
            net.router,
            "type",
            "veth",
            "peer",
            "up1",
            "netns",
            net.public,
        )
        ns(net.host, "ip", "addr", "add", f"{HOST_EXT}/24", "dev", "ext0")
        ns(net.host, "ip", "link", "set", "ext0", "up")
        ns(net.host, "ip", "route", "add", "default", "via", LAN)
        ns(net.router, "ip", "addr", "add", f"{LAN}/24", "dev", "lan0")
        ns(net.router, "ip", "addr", "add", f"{ROUTER_UP}/24", "dev", "up0")
        ns(net.router, "ip", "link", "set", "lan0", "up")
        ns(net.router, "ip", "link", "set", "up0", "up")
        ns(net.router, "sysctl", "-qw", "net.ipv4.conf.all.forwarding=1")
        ns(net.public, "ip", "addr", "add", f"{PUBLIC}/24", "dev", "up1")
        ns(net.public, "ip", "addr", "add", f"{PUBLIC_DENIED}/24", "dev", "up1")
        ns(net.public, "ip", "link", "set", "up1", "up")
        ns(net.public, "ip", "route", "add", "default", "via", ROUTER_UP)
        # The module's sysctl and ruleset, as they are
        ns(net.host, "sysctl", "-qw", "net.ipv4.conf.all.forwarding=1")
        # Bridged frames skip the inet hooks, as on a host without br_netfilter
        # (where it is loaded, e.g. for Docker, the inet table sees them too):
        # the bridge table alone must keep the VMs apart.
        if Path("/proc/sys/net/bridge/bridge-nf-call-iptables").exists():
            ns(net.host, "sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=0")
        ns(net.host, "nft", "-f", str(RENDERED / "ruleset.nft"))
        # Names the proxy resolves (ip netns exec binds this over /etc/hosts)
        etc.mkdir(parents=True)
        (etc / "hosts").write_text(
            f"127.0.0.1 localhost\n{PUBLIC} allowed.amvm.test keys.amvm.test\n"
            f"{PUBLIC_DENIED} denied.amvm.test\n"
        )
        listen = REPO / "tests" / "host-network" / "listen.py"
        out = str(net.scratch / "listen")
        for namespace, addresses in (
            (net.public, [f"{PUBLIC}:8080", f"{PUBLIC}:8081", f"{PUBLIC_DENIED}:8080"]),
            (net.router, [f"{LAN}:8080"]),
            (net.other_vm, [f"{net.other_vm_address}:8080"]),
            # ... and one on alpha's proxy port at another of H's addresses
            (
                net.host,
                [
                    f"{gateway}:9000",
                    f"{HOST_EXT}:9000",
                    "127.0.0.1:9000",
                    f"{HOST_EXT}:{40000 + _index(net, 'alpha')}",
                ],
            ),
        ):
            ready = net.scratch / "listen" / "ready"
            ready.unlink(missing_ok=True)
            net.start(namespace, "python3", "-I", str(listen), out, *addresses)
            _wait_for(ready.exists, 20, "a listener")
        yield net
    finally:
        for process in net.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        for name in (net.host, net.router, net.public, net.other_vm):
            sh("ip", "netns", "del", name, check=False)
        shutil.rmtree(etc, ignore_errors=True)


def _wait_for(condition: object, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"{what} did not come up"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def guest_build(host_env: dict[str, str], scratch: Path) -> Path:
    out = scratch / "hostnet-guest"
    subprocess.run(
        [
            str(REPO / "tests" / "guest" / "build"), str(out), "--machine", "q35",
            "--init", str(REPO / "tests" / "host-network" / "guest-init"),
            "--modules", "virtio_pci virtio_net qemu_fw_cfg",
        ],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return out


@pytest.fixture
def proxy(topology: Net, venv_python: Path) -> Iterator[subprocess.Popen[bytes]]:
    """beta's egress proxy: the rendered configuration (log moved into the test's dir)."""
    config = json.loads((RENDERED / "egress-beta.json").read_text())
    config["log"] = str(topology.scratch / "beta-egress.log")
    path = topology.scratch / "egress-beta.json"
    path.write_text(json.dumps(config))
    credentials = topology.scratch / "credentials"
    credentials.mkdir(exist_ok=True, mode=0o700)
    (credentials / "ANTHROPIC_API_KEY").write_text(CANARY)
    env = {"PATH": os.environ["PATH"], "CREDENTIALS_DIRECTORY": str(credentials),
           "PYTHONPATH": str(REPO / "runner" / "src")}  # fmt: skip
    process = topology.start(
        topology.host, str(venv_python), "-m", "microvm_run.hostegress", str(path), env=env
    )
    port = int(config["port"])
    _wait_for(lambda: _listening(topology, port) or process.poll() is not None, 30, "the proxy")
    assert process.poll() is None, process.stderr.read() if process.stderr else ""
    yield process
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=30)


def _listening(net: Net, port: int) -> bool:
    result = ns(net.host, "ss", "-Htln", f"sport = :{port}", check=False)
    return bool(result.stdout.strip())


def boot(net: Net, build: Path, name: str, script: str) -> dict[str, str]:
    """Boot the test guest as VM ``name`` on its tap; its script's sections by title."""
    guest = net.guests[name]
    work = net.scratch / f"boot-{name}-{os.urandom(2).hex()}"
    work.mkdir()
    (work / "script").write_text(script)
    console = work / "console"
    qemu = shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"
    argv = [
        "ip", "netns", "exec", net.host, qemu, "-machine", "q35,accel=tcg", "-m", "256",
        "-nodefaults", "-no-reboot", "-display", "none", "-monitor", "none",
        "-kernel", str(build / "vmlinuz"), "-initrd", str(build / "initrd.gz"),
        "-append", f"console=ttyS0 quiet panic=-1 amvm.addr={guest['address']}/{net.prefix} "
        f"amvm.gw={guest['gateway']}",
        "-serial", f"file:{console}",
        "-netdev", f"tap,id=n0,ifname={guest['tap']},script=no,downscript=no",
        "-device", f"virtio-net-pci,netdev=n0,mac={guest['mac']}",
        "-fw_cfg", f"name=opt/amvm/script,file={work / 'script'}",
    ]  # fmt: skip
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=BOOT_TIMEOUT_S, check=False
    )
    text = console.read_text(errors="replace") if console.exists() else ""
    assert "AMVM-END" in text, f"the guest did not finish: {result.stderr}\n{text[-3000:]}"
    assert "AMVM-NET-FAILED" not in text
    body = text.split("AMVM-BEGIN", 1)[1].split("AMVM-END", 1)[0]
    sections: dict[str, str] = {}
    for part in re.split(r"^== ", body, flags=re.M)[1:]:
        title, _, rest = part.partition("\n")
        sections[title.strip(" =")] = rest
    return sections


def _http(host: str) -> str:
    return f"printf 'GET / HTTP/1.0\\r\\nHost: {host}\\r\\n\\r\\n'"


def _section(title: str, command: str) -> str:
    return f"echo '== {title} =='\n{command} 2>&1\necho \"rc=$?\"\n"


def _dns(gateway: str, name: str) -> str:
    """The guest's DNS-over-TCP query for NAME at the gateway, the answer in hex."""
    return f"printf '{_dns_query(name)}' | nc -w 3 {gateway} 53 | od -An -tx1"


def _octal(data: bytes) -> str:
    """Bytes as printf octal escapes (busybox printf in the guest)."""
    return "".join(f"\\{byte:03o}" for byte in data)


def _client_hello(name: str) -> bytes:
    """The first bytes a real TLS client sends to ``name``."""
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=name)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def _dns_query(name: str) -> str:
    """A DNS-over-TCP query for NAME's A record, as printf octal escapes."""
    question = b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\0"
    message = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + question + b"\x00\x01\x00\x01"
    return _octal(len(message).to_bytes(2, "big") + message)


def test_an_open_vm_reaches_the_public_peer_and_not_the_host_nor_the_lan(
    topology: Net, guest_build: Path
) -> None:
    gw = topology.gateway
    own_port = 40000 + _index(topology, "alpha")
    script = "".join(
        [
            _section("public", f"echo hello-from-alpha | nc -w 5 {PUBLIC} 8080"),
            _section("lan", f"echo lan-from-alpha | nc -w 3 {LAN} 8080"),
            _section("other-vm", f"echo vm-from-alpha | nc -w 3 {topology.other_vm_address} 8080"),
            _section("host-bridge", f"echo host-from-alpha | nc -w 3 {gw} 9000"),
            _section("host-ext", f"echo ext-from-alpha | nc -w 3 {HOST_EXT} 9000"),
            # the proxy ports of the other VM (beta) are not alpha's
            _section("beta-proxy", f"echo x | nc -w 3 {gw} {40000 + _index(topology, 'beta')}"),
            # its own proxy port is open on the gateway only, not on H's other addresses
            _section("own-port-ext", f"echo own-from-alpha | nc -w 3 {HOST_EXT} {own_port}"),
        ]
    )
    out = boot(topology, guest_build, "alpha", script)
    assert f"answer from {PUBLIC}_8080" in out["public"]
    assert "hello-from-alpha" in topology.listener_log(f"{PUBLIC}_8080")
    for title in ("lan", "other-vm", "host-bridge", "host-ext", "beta-proxy", "own-port-ext"):
        assert "answer from" not in out[title], title
    assert "from-alpha" not in topology.listener_log(f"{HOST_EXT}_{own_port}")
    assert topology.listener_log(f"{topology.other_vm_address}_8080") == ""
    assert "from-alpha" not in topology.listener_log(f"{LAN}_8080")
    assert "from-alpha" not in topology.listener_log(f"{gw}_9000")
    assert "from-alpha" not in topology.listener_log(f"{HOST_EXT}_9000")


def _index(net: Net, name: str) -> int:
    return int(str(net.guests[name]["address"]).rsplit(".", 1)[1])


def test_an_allowlist_vm_reaches_listed_names_through_the_proxy_with_the_key_injected(
    topology: Net, guest_build: Path, proxy: subprocess.Popen[bytes]
) -> None:
    gw = topology.gateway
    env = topology.guests["beta"]["environment"]
    assert isinstance(env, dict)
    base_url = env["ANTHROPIC_BASE_URL"]
    placeholder = env["ANTHROPIC_API_KEY"]
    alpha = topology.guests["alpha"]["address"]
    spoofed = f"echo spoofed-from-beta | nc -w 3 -s {alpha} {PUBLIC} 8080"
    key = f"wget -Y off -q -O - --header 'x-api-key: {placeholder}' {base_url}/v1/messages"
    script = "".join(
        [
            # any destination: the ruleset hands every TCP connection to the proxy
            _section("allowed", f"{_http('allowed.amvm.test:8080')} | nc -w 5 {PUBLIC} 8080"),
            # TLS, by SNI: the first bytes reach the allowed name only
            _section(
                "tls-allowed",
                f"printf '{_octal(_client_hello('allowed.amvm.test'))}' | nc -w 3 {PUBLIC} 8080",
            ),
            _section(
                "tls-denied",
                f"printf '{_octal(_client_hello('denied.amvm.test'))}' | nc -w 3 {PUBLIC} 8080",
            ),
            _section("denied", f"{_http('denied.amvm.test:8080')} | nc -w 5 {PUBLIC_DENIED} 8080"),
            _section("lan", f"{_http(f'{LAN}:8080')} | nc -w 5 {LAN} 8080"),
            _section("host", f"{_http(f'{gw}:9000')} | nc -w 5 {gw} 9000"),
            _section("dns-allowed", _dns(gw, "allowed.amvm.test")),
            _section("dns-denied", _dns(gw, "denied.amvm.test")),
            _section("key", key),
            # Not TCP: nothing (the proxy takes TCP only, the ruleset drops the rest)
            _section("udp", f"echo udp-from-beta | nc -u -w 2 {PUBLIC} 8080"),
            # Spoofing alpha's (open) address to get past the proxy
            _section("spoof", f"ip addr add {alpha}/{topology.prefix} dev eth0 && {spoofed}"),
            _section("environ", "cat /proc/cmdline; env"),
        ]
    )
    out = boot(topology, guest_build, "beta", script)
    assert f"answer from {PUBLIC}_8080" in out["allowed"]
    # the ClientHello itself reached the allowed name (a TLS record, as logged)
    assert "\\x16\\x03\\x01" in topology.listener_log(f"{PUBLIC}_8080")
    assert "answer from" in out["tls-allowed"]
    assert "answer from" not in out["tls-denied"]
    assert "403" in out["denied"] and "answer from" not in out["denied"]
    assert topology.listener_log(f"{PUBLIC_DENIED}_8080") == ""
    assert "answer from" not in out["lan"] and topology.listener_log(f"{LAN}_8080") == ""
    assert "answer from" not in out["host"] and topology.listener_log(f"{gw}_9000") == ""
    gw_hex = " ".join(f"{int(octet):02x}" for octet in gw.split("."))
    assert gw_hex in " ".join(out["dns-allowed"].split())
    assert gw_hex not in " ".join(out["dns-denied"].split())
    # The key: injected upstream on the flavor's route, never in the guest
    assert "answer from" in out["key"]
    key_log = topology.listener_log(f"{PUBLIC}_8081")
    assert f"x-api-key: {CANARY}" in key_log
    assert "GET /api/v1/messages" in key_log
    assert placeholder not in key_log
    assert CANARY not in "".join(out.values())
    assert "udp-from-beta" not in topology.listener_log(f"{PUBLIC}_8080")
    assert "spoofed-from-beta" not in topology.listener_log(f"{PUBLIC}_8080")
    log = (topology.scratch / "beta-egress.log").read_text()
    assert "allow allowed.amvm.test:8080 via http" in log
    assert "deny denied.amvm.test:8080 via http (not in the allowlist)" in log
    assert CANARY not in log


def test_an_allowlist_vm_reaches_nothing_while_its_proxy_is_down(
    topology: Net, guest_build: Path
) -> None:
    gw = topology.gateway
    before = topology.listener_log(f"{PUBLIC}_8080")
    script = "".join(
        [
            _section("allowed", f"{_http('allowed.amvm.test:8080')} | nc -w 5 {PUBLIC} 8080"),
            _section("dns", _dns(gw, "allowed.amvm.test")),
            _section("lan", f"echo lan-from-beta | nc -w 3 {LAN} 8080"),
            _section("host", f"echo host-from-beta | nc -w 3 {gw} 9000"),
        ]
    )
    out = boot(topology, guest_build, "beta", script)
    for title in ("allowed", "lan", "host"):
        assert "answer from" not in out[title], title
    # No answer at all: nothing listens where the ruleset sends the VM.
    assert re.search(r"^( [0-9a-f]{2})+$", out["dns"], flags=re.M) is None
    assert "refused" in out["allowed"]
    assert topology.listener_log(f"{PUBLIC}_8080") == before
    assert "from-beta" not in topology.listener_log(f"{LAN}_8080")
    assert "from-beta" not in topology.listener_log(f"{gw}_9000")


def test_the_rulesets_non_public_ranges_are_the_proxys() -> None:
    """lib/hostnet.nix's list (rendered) and netpolicy's, compared across the languages."""
    text = (RENDERED / "ruleset.nft").read_text()
    match = re.search(r"set nonpublic4 \{.*?elements = \{ ([^}]*) \}", text, flags=re.S)
    assert match is not None
    rendered = {ipaddress.ip_network(e.strip()) for e in match.group(1).split(",")}
    python = {net for net in netpolicy._NOT_PUBLIC if net.version == 4}
    assert rendered == python
    assert all(not netpolicy.public_address(str(net.network_address)) for net in rendered)
    assert netpolicy.public_address(PUBLIC), "the test's public peer must count as public"


def test_the_modules_proxy_ports_and_key_url_are_the_runners() -> None:
    """What modules/host.nix wrote into the guest and the ruleset, against netpolicy/plan."""
    beta = json.loads((RENDERED / "guests.json").read_text())["beta"]
    gw = beta["gateway"]
    prefix = netpolicy.key_route_prefix("ANTHROPIC_API_KEY")
    assert beta["environment"]["ANTHROPIC_BASE_URL"] == (
        f"http://{gw}:{netpolicy.KEY_PROXY_PORT}/{prefix}"
    )
    assert beta["environment"]["ANTHROPIC_API_KEY"] == KEY_PLACEHOLDER
    assert beta["environment"]["HTTPS_PROXY"] == f"http://{gw}:{netpolicy.PROXY_PORT}"
    ruleset = (RENDERED / "ruleset.nft").read_text()
    assert f"tcp dport {netpolicy.KEY_PROXY_PORT} redirect" in ruleset


@pytest.mark.parametrize("vm", ["alpha", "beta"])
def test_the_proxys_hardened_unit_is_one_systemd_accepts(vm: str, tmp_path: Path) -> None:
    """`systemd-analyze verify` on the rendered unit (ExecStart swapped for an existing binary)."""
    analyze = shutil.which("systemd-analyze")
    require(analyze is not None, "systemd-analyze (systemd, scripts/setup-host)")
    assert analyze is not None
    lines = (RENDERED / f"egress-{vm}.service").read_text().splitlines()
    body = [
        "ExecStart=/bin/true" if line.startswith("ExecStart=") else line
        for line in lines
        if not line.startswith("#")
    ]
    unit = tmp_path / f"agent-microvm-egress-{vm}.service"
    unit.write_text("[Unit]\nDescription=egress proxy\n" + "\n".join(body) + "\n")
    done = sh(analyze, "verify", str(unit), check=False)
    assert done.returncode == 0 and done.stderr.strip() == "", done.stderr
    assert "DynamicUser=yes" in body and "CapabilityBoundingSet=" in body


def test_the_registry_the_module_writes_is_the_one_ps_and_attach_read() -> None:
    vms = hostvms.load(RENDERED / "vms.json")
    guests = json.loads((RENDERED / "guests.json").read_text())
    assert {vm.name: vm.address for vm in vms} == {n: g["address"] for n, g in guests.items()}
    assert all(vm.known_hosts == Path(f"/var/lib/microvms/{vm.name}/ssh/known_hosts") for vm in vms)


def test_the_rendered_files_are_committed() -> None:
    """The files these tests load exist (make eval-modules writes and checks them)."""
    for name in ("ruleset.nft", "guests.json", "egress-beta.json", "networkd/20-microbr.network"):
        assert (RENDERED / name).is_file(), name
