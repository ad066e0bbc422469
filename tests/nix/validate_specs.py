"""Validate the specs tests/nix/run --emit-spec wrote with the runner's schema.

PYTHONPATH=runner/src python3 tests/nix/validate_specs.py DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

from microvm_run.spec import SpecError, load_spec


def main() -> int:
    paths = sorted(Path(sys.argv[1]).glob("*-spec.toml"))
    if not paths:
        print(f"validate_specs: no *-spec.toml in {sys.argv[1]}", file=sys.stderr)
        return 1
    bad = 0
    for path in paths:
        try:
            spec = load_spec(path)
        except SpecError as err:
            print(f"FAIL {err}")
            bad += 1
            continue
        sources = ",".join(s.source for s in spec.shares)
        proxies = ",".join(f"{p.var}->{p.base_url_var}" for p in spec.key_proxies) or "-"
        print(
            f"ok   {path.name}: {spec.agent} {spec.memory_mib} MiB {spec.vcpus} vCPU "
            f"shares={sources} allow={len(spec.allow)} key_proxy={proxies}"
        )
    print(f"{len(paths) - bad} specs valid, {bad} invalid")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
