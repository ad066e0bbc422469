"""Check what tests/nix/eval-modules.nix resolved for each flavor.

Run by scripts/eval-modules: reads OUT/<flavor>.json and OUT/flavors.json (the
flavors' entries in lib/flavors.nix, what each must resolve to), writes the spec TOML and
the guest scripts next to it, validates each spec with the runner's schema
(microvm_run.spec.load_spec) and checks the resolved values the README
promises: resolved values, not declarations (a mkDefault in one module
loses to a plain value in another, and only the resolved value shows it).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

from microvm_run.contract import STATUS_PORT
from microvm_run.spec import load_spec

CRI_RUNTIMES = ["containerd", "cri-o", "crun", "docker", "podman"]


def systemd_device_unit(path: str) -> str:
    """`systemd-escape --path --suffix=device PATH` for the paths we use."""
    parts = [p for p in path.split("/") if p]
    escaped = []
    for part in parts:
        out = ""
        for i, ch in enumerate(part):
            if ch.isalnum() or ch in ":_" or (ch == "." and i > 0):
                out += ch
            else:
                out += f"\\x{ord(ch):02x}"
        escaped.append(out)
    return "-".join(escaped) + ".device"


def etc_problems(etc: dict[str, Any], entry: dict[str, Any]) -> list[str]:
    """The entry's /etc files against what NixOS would install (text and mode)."""
    problems = []
    for path, file in entry.get("etc", {}).items():
        got = etc.get(path)
        if got is None or json.loads(got["text"]) != file["json"]:
            problems.append(f"/etc/{path}: {got}")
        elif got["mode"] != file.get("mode", "symlink"):
            problems.append(f"/etc/{path} mode {got['mode']}")
    return problems


def check_flavor(out: Path, agent: str, cri: bool, entry: dict[str, Any]) -> list[str]:
    name = f"{agent}-cri" if cri else agent
    data = json.loads((out / f"{name}.json").read_text())
    mv = data["microvm"]
    spec = data["spec"]
    problems: list[str] = []

    def expect(cond: bool, what: str) -> None:
        if not cond:
            problems.append(what)

    spec_path = out / f"{name}-spec.toml"
    spec_path.write_text(data["specToml"])
    for script, text in data["scripts"].items():
        path = out / f"{name}-{script}.sh"
        path.write_text("#!/usr/bin/env bash\n" + text)
        syntax = subprocess.run(
            ["bash", "-n", str(path)], capture_output=True, text=True, check=False
        )
        expect(syntax.returncode == 0, f"{script} script: bash -n: {syntax.stderr.strip()}")
        if shutil.which("shellcheck"):
            # SC1090/1091: sourced files exist only in the guest; SC2043: a
            # loop over one API key variable is still a loop over the list.
            lint = subprocess.run(
                ["shellcheck", "-S", "warning", "-e", "SC1090,SC1091,SC2043", str(path)],
                capture_output=True,
                text=True,
                check=False,
            )
            expect(lint.returncode == 0, f"{script} script: shellcheck:\n{lint.stdout}")

    loaded = load_spec(spec_path)  # raises SpecError with the schema's message
    expect(tomllib.loads(data["specToml"]) == spec, "spec TOML does not round-trip to the spec")

    mem = 8192 if cri else 4096
    expect(mv["mem"] == mem, f"microvm.mem = {mv['mem']}, expected {mem}")
    expect(mv["vcpu"] == 4, f"microvm.vcpu = {mv['vcpu']}, expected 4")
    expect(loaded.memory_mib == mv["mem"], "spec memory_mib != microvm.mem")
    expect(loaded.vcpus == mv["vcpu"], "spec vcpus != microvm.vcpu")
    expect(
        list(loaded.kernel_params) == mv["kernelParams"],
        "spec kernel_params != microvm.kernelParams",
    )
    expect(
        any(p.startswith("init=/nix/store/") and p.endswith("/init") for p in loaded.kernel_params),
        "no init=<toplevel>/init in kernel params",
    )
    expect(str(loaded.kernel).endswith("/bzImage"), f"kernel {loaded.kernel} is not a bzImage")
    expect(loaded.machine == mv["qemu"]["machine"], "spec machine != microvm.qemu.machine")
    expect(
        str(loaded.qemu).startswith(mv["qemu"]["package"] + "/bin/"),
        "spec qemu is not microvm.qemu.package",
    )
    expect(loaded.agent == agent, f"agent name {loaded.agent}")
    expect(list(loaded.api_key_vars) == entry["keyVars"], f"api_key_vars {loaded.api_key_vars}")
    expect(list(loaded.command) == entry["command"], f"command {loaded.command}")
    agent_cfg = data["agentVM"]["agent"]
    expect(agent_cfg["configDir"] == entry["configDir"], f"configDir {agent_cfg['configDir']}")
    expect(mv["writableStoreOverlay"] == "/nix/.rw-store", "no writable store overlay")
    expect(mv["storeOnDisk"] is False, "store on disk instead of the host store share")
    expect(mv["machineId"] is not None, "microvm.machineId is null")

    sources = {s.source: s for s in loaded.shares}
    want = {"work", "home", "nix-store"} | ({"cri-storage"} if cri else set())
    expect(set(sources) == want, f"share sources {sorted(sources)}, expected {sorted(want)}")
    expect(
        sources.get("nix-store") is not None and sources["nix-store"].read_only,
        "store share not read-only",
    )
    expect(
        sources.get("work") is not None and sources["work"].mount_point == "/work",
        "work not at /work",
    )
    expect(
        sources.get("home") is not None and sources["home"].mount_point == "/home/agent",
        "home not at /home/agent",
    )
    if cri:
        expect(
            sources["cri-storage"].mount_point == "/var/lib/containers", "cri-storage mount point"
        )
    guest_tags = {s["tag"]: s for s in mv["shares"]}
    expect(
        set(guest_tags) == {s.tag for s in loaded.shares}, "microvm.shares and spec shares differ"
    )
    expect(
        all(s["proto"] == "virtiofs" for s in mv["shares"]), "a share is not virtiofs (9p is slow)"
    )
    fs = data["fileSystems"]
    expect("ro" in fs.get("/nix/.ro-store", {}).get("options", []), "/nix/.ro-store not mounted ro")
    expect(
        fs.get("/nix/store", {}).get("overlay", {}).get("lowerdir") == ["/nix/.ro-store"],
        "store overlay",
    )

    # What nixpkgs would let the guest use (stand-in-unfree.nix): free
    # packages, the flavor's own unfree package, no other unfree one.
    unfree = data["unfreeAllowed"]
    flavors: dict[str, dict[str, Any]] = json.loads((out / "flavors.json").read_text())
    want_unfree = {
        f["package"]: not f.get("unfree", False) or f["package"] == entry["package"]
        for f in flavors.values()
    } | {"unfree-other": False, "git": True}
    expect(unfree == want_unfree, f"unfree allowed: {unfree}, expected {want_unfree}")
    expect(data["sudo"] is False, "sudo is enabled")
    groups = data["agentGroups"]
    expect("wheel" not in groups, "agent is in wheel")
    if cri:
        view = data["criView"]
        # A named overlay driver: no silent fallback to vfs on the share.
        expect(
            view["dockerSettings"].get("storage-driver") == "overlay2",
            f"docker storage driver {view['dockerSettings'].get('storage-driver')}",
        )
        expect(
            view["containersStorage"].get("storage", {}).get("driver") == "overlay",
            "podman/cri-o storage driver is not overlay",
        )
        expect("nerdctl" not in view["systemPackages"], "nerdctl (always rootless) is installed")
        expect("runc" in view["containerdCrunPath"], "containerd-crun has no runc for ctr")
        for socket in ("/run/containerd/containerd.sock", "/run/containerd-crun/containerd.sock"):
            expect(
                f"CONTAINER_RUNTIME_ENDPOINT=unix://{socket}" in data["scripts"]["launcher"],
                f"crictl is not pointed at {socket}",
            )
        expect({"docker", "podman", "containerd", "crio"} <= set(groups), f"agent groups {groups}")
        expect(data["agentVM"]["cri"]["runtimes"] == CRI_RUNTIMES, "cri runtimes")
    net = data["networking"]
    expect(not net["waitOnline"] and not net["firewall"], "network wait-online or firewall on")
    # The guest contract's network (contract.py "Network").
    uplink = net["uplink"] or {}
    expect(net["useNetworkd"], "not networkd")
    expect(
        uplink.get("address") == ["10.0.2.15/24"] and uplink.get("gateway") == ["10.0.2.2"],
        f"uplink address/gateway: {uplink.get('address')} via {uplink.get('gateway')}",
    )
    expect(uplink.get("matchConfig", {}).get("Kind") == "!*", "uplink also matches virtual links")
    expect(uplink.get("networkConfig", {}).get("DHCP") == "no", "uplink runs DHCP")
    # systemd-networkd-wait-online (the launcher's wait) ignores links that
    # are not required for online: "no" here makes every launch time out.
    expect(
        uplink.get("linkConfig", {}).get("RequiredForOnline") == "routable",
        "uplink is not required for online: the launcher's wait-online would time out",
    )
    expect(not net["resolved"] and not net["resolvconf"], "resolved or resolvconf manages DNS")
    expect(
        net["resolvConf"] == "nameserver 10.0.2.100\noptions use-vc\n",
        f"/etc/resolv.conf is {net['resolvConf']!r}",
    )

    # "The agent needs you": every guest has the command; claude's hooks call it.
    expect("agent-microvm-notify" in data["systemPackages"], "no agent-microvm-notify")
    if agent == "claude":
        hooks = json.loads(data["claudeSettings"] or "{}").get("hooks", {})
        commands = {
            event: [h["command"] for entry in entries for h in entry["hooks"]]
            for event, entries in hooks.items()
        }
        expect(
            sorted(commands) == ["Notification", "Stop"]
            and all(c[0].startswith("agent-microvm-notify ") for c in commands.values()),
            f"claude's notification hooks: {commands}",
        )
    else:
        expect(data["claudeSettings"] is None, f"{agent} has claude's managed settings")
    if agent == "codex":
        command = data["agentVM"]["agent"]["command"]
        notify = command[command.index("-c") + 1] if "-c" in command else ""
        expect(
            notify.startswith('notify=["agent-microvm-notify",'),
            f"codex's turn-complete notification: {command}",
        )

    # The flavor's /etc files (its entry's extras), as the entry has them.
    problems += etc_problems(data["flavorEtc"], entry)

    # The flavor's allowlist and key proxy routes, methods and path prefixes
    # included, survive the module's option types into the spec.
    want_proxy = [
        (
            r["var"],
            r["upstream"],
            r["header"],
            r["baseUrlVar"],
            r.get("baseUrlPath", ""),
            tuple(r["methods"]),
            tuple(r["paths"]),
        )
        for r in entry["keyProxy"]
    ]
    expect(
        [
            (p.var, p.upstream, p.header, p.base_url_var, p.base_url_path, p.methods, p.paths)
            for p in loaded.key_proxies
        ]
        == want_proxy,
        f"key proxies {loaded.key_proxies}",
    )
    expect(list(loaded.allow) == entry["allow"], f"allow {loaded.allow}")

    # The agent starts once its console and the status port exist (systemd's
    # device units, named as `systemd-escape --path` names them).
    svc = data["agentService"]
    devices = ["dev-hvc0.device", systemd_device_unit(f"/dev/virtio-ports/{STATUS_PORT}")]
    for device in devices:
        expect(device in svc["requires"], f"agent service does not require {device}")
        expect(device in svc["after"], f"agent service not ordered after {device}")
    launcher = data["scripts"]["launcher"]
    expect("sleep 0.05" not in launcher, "launcher still polls for the status port")
    expect(
        "systemd-networkd-wait-online" in launcher and "MICROVM_NET" in launcher,
        "launcher does not wait for the uplink (outside MICROVM_NET=none)",
    )
    # The closure is registered beside the agent's start, not in stage 2.
    reg = data["storeRegistration"]
    expect(reg["registerClosure"] is False, "microvm.registerClosure loads the store DB at boot")
    expect("--load-db" not in reg["postBootCommands"], "stage 2 loads the store DB")
    unit = reg["unit"] or {}
    expect(
        unit.get("serviceConfig", {}).get("Type") == "oneshot"
        and "nix-store --load-db" in unit.get("script", "")
        and "agent-microvm.service" not in unit.get("before", []),
        f"store registration unit: {unit}",
    )
    expect(
        "agent-microvm-register-store.service" in reg["nixDaemonAfter"],
        "nix-daemon does not wait for the store registration",
    )
    expect(
        sum(p.startswith("regInfo=") for p in mv["kernelParams"]) == 1,
        "no single regInfo= kernel parameter",
    )

    expect(svc["unitConfig"].get("SuccessAction") == "poweroff", "agent service does not power off")
    expect(svc["serviceConfig"].get("TTYPath") == "/dev/hvc0", "agent service not on hvc0")
    expect(svc["serviceConfig"].get("ImportCredential") == entry["keyVars"], "credentials")

    cmd = data["microvmQemuCommand"]
    expect(
        f"-m {mv['mem']}M" in cmd and f"-smp {mv['vcpu']}" in cmd,
        "microvm.nix's QEMU command disagrees",
    )

    print(f"== {name}")
    print(
        f"   microvm: mem={mv['mem']} vcpu={mv['vcpu']} machine={mv['qemu']['machine']} "
        f"hypervisor={mv['hypervisor']} overlay={mv['writableStoreOverlay']} "
        f"storeOnDisk={mv['storeOnDisk']}"
    )
    print(f"   kernelParams: {' '.join(mv['kernelParams'])}")
    print(
        "   shares: "
        + ", ".join(
            f"{s['tag']}:{s['mountPoint']}{' (ro)' if s['readOnly'] else ''}" for s in mv["shares"]
        )
    )
    print(f"   spec: {spec_path}")
    for line in data["specToml"].splitlines():
        print(f"   | {line}")
    for warning in data["warnings"]:
        print(f"   warning: {warning.strip()}")
    print(f"   {'OK' if not problems else 'FAILED'}")
    for p in problems:
        print(f"   ! {p}")
    return [f"{name}: {p}" for p in problems]


def main() -> int:
    out = Path(sys.argv[1])
    agents = sys.argv[2:]
    flavors = json.loads((out / "flavors.json").read_text())
    problems: list[str] = []
    count = 0
    for agent in agents:
        for cri in (False, True):
            problems += check_flavor(out, agent, cri, flavors[agent])
            count += 1
    print(f"eval-modules: {count} flavors evaluated, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
