"""Check what tests/nix/run --emit-spec wrote against the runner's side of the seam.

PYTHONPATH=runner/src python3 tests/nix/validate_specs.py DIR

DIR/*-spec.toml: the sample flavors' specs, read with the runner's schema.
DIR/contract.json: lib/contract.nix, compared value by value with the
runner's constants (spec.py, contract.py, netpolicy.py, hostvms.py): the
one check that the two languages state the seam alike. Not compared, as the
runner names none of them: network.prefixLength and gatewayAddr (QEMU user
networking's defaults) and criRuntimes (the runner reads them from each
spec; check_specs compares the samples' with them).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from microvm_run import contract, hostvms, netpolicy, spec
from microvm_run.spec import SpecError, load_spec


def runner_side(nix: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(name, Nix value, runner value) for every value of the seam."""
    net = nix["network"]
    fw_cfg = nix["fwCfg"]
    launch_vars = nix["launchVars"]
    return [
        ("specVersion", nix["specVersion"], spec.SPEC_VERSION),
        ("contractVersion", nix["contractVersion"], contract.CONTRACT_VERSION),
        ("contractVersion supported", [nix["contractVersion"]], list(spec.SUPPORTED_CONTRACTS)),
        ("machines", nix["machines"], list(spec.MACHINES)),
        ("shareSources", nix["shareSources"], list(spec.SHARE_SOURCES)),
        ("keyHeaders", nix["keyHeaders"], list(spec.KEY_HEADERS)),
        ("fwCfg.launch", fw_cfg["launch"], contract.LAUNCH_FW_CFG),
        ("fwCfg.credentialPrefix", fw_cfg["credentialPrefix"], contract.CREDENTIAL_FW_CFG_PREFIX),
        ("statusPort", nix["statusPort"], contract.STATUS_PORT),
        ("console", nix["console"], contract.CONSOLE),
        ("launchVars.net", launch_vars["net"], contract.LAUNCH_VAR_NET),
        ("launchVars.localDirs", launch_vars["localDirs"], contract.LAUNCH_VAR_LOCAL_DIRS),
        ("launchVars.ttySize", launch_vars["ttySize"], contract.LAUNCH_VAR_TTY_SIZE),
        ("launchVars.devshell", launch_vars["devshell"], contract.LAUNCH_VAR_DEVSHELL),
        ("launchVars.enableCri", launch_vars["enableCri"], contract.LAUNCH_VAR_ENABLE_CRI),
        ("localDisk.serial", nix["localDisk"]["serial"], contract.LOCAL_DISK_SERIAL),
        ("localDisk.mount", nix["localDisk"]["mount"], contract.LOCAL_MOUNT),
        ("guestUser.name", nix["guestUser"]["name"], hostvms.GUEST_USER),
        ("guestUser.uid", nix["guestUser"]["uid"], contract.GUEST_UID),
        ("guestUser.home", nix["guestUser"]["home"], contract.GUEST_HOME),
        ("workDir", nix["workDir"], contract.GUEST_WORK_DIR),
        ("attachCommand", nix["attachCommand"], hostvms.ATTACH_COMMAND),
        ("guestFailureStatus", nix["guestFailureStatus"], contract.EXIT_NO_STATUS),
        ("network.guestAddr", net["guestAddr"], netpolicy.GUEST_ADDR),
        ("network.egressAddr", net["egressAddr"], netpolicy.EGRESS_ADDR),
        ("network.ports.dns", net["ports"]["dns"], netpolicy.DNS_PORT),
        ("network.ports.http", net["ports"]["http"], netpolicy.HTTP_PORT),
        ("network.ports.tls", net["ports"]["tls"], netpolicy.TLS_PORT),
        ("network.ports.proxy", net["ports"]["proxy"], netpolicy.PROXY_PORT),
        ("network.ports.keyProxy", net["ports"]["keyProxy"], netpolicy.KEY_PROXY_PORT),
        ("network.keyPlaceholder", net["keyPlaceholder"], netpolicy.KEY_PLACEHOLDER),
    ]


def check_contract(path: Path) -> int:
    try:
        nix = json.loads(path.read_text())
        pairs = runner_side(nix)
    except (OSError, ValueError, KeyError) as err:
        print(f"FAIL {path}: {err!r}")
        return 1
    bad = [(name, ours, theirs) for name, ours, theirs in pairs if ours != theirs]
    for name, ours, theirs in bad:
        print(f"FAIL lib/contract.nix {name} = {ours!r}, the runner has {theirs!r}")
    print(f"{len(pairs) - len(bad)} contract values agree, {len(bad)} differ")
    return 1 if bad else 0


def check_specs(directory: Path, nix: dict[str, Any]) -> int:
    paths = sorted(directory.glob("*-spec.toml"))
    if not paths:
        print(f"validate_specs: no *-spec.toml in {directory}", file=sys.stderr)
        return 1
    bad = 0
    for path in paths:
        try:
            loaded = load_spec(path)
        except SpecError as err:
            print(f"FAIL {err}")
            bad += 1
            continue
        wanted = tuple(nix["criRuntimes"]) if loaded.share_by_source("cri-storage") else ()
        if loaded.cri_runtimes != wanted:
            print(f"FAIL {path.name}: cri_runtimes {loaded.cri_runtimes}, not {wanted}")
            bad += 1
            continue
        sources = ",".join(s.source for s in loaded.shares)
        proxies = ",".join(f"{p.var}->{p.base_url_var}" for p in loaded.key_proxies) or "-"
        print(
            f"ok   {path.name}: {loaded.agent} {loaded.memory_mib} MiB {loaded.vcpus} vCPU "
            f"shares={sources} allow={len(loaded.allow)} key_proxy={proxies} "
            f"cri={','.join(loaded.cri_runtimes) or '-'}"
        )
    print(f"{len(paths) - bad} specs valid, {bad} invalid")
    return 1 if bad else 0


def main() -> int:
    directory = Path(sys.argv[1])
    contract_file = directory / "contract.json"
    failed = check_contract(contract_file)
    try:
        nix = json.loads(contract_file.read_text())
    except (OSError, ValueError):
        return 1
    return 1 if check_specs(directory, nix) or failed else 0


if __name__ == "__main__":
    sys.exit(main())
