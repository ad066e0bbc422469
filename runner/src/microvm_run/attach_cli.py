"""``microvm-run attach NAME``: the agent's tmux session in a VM declared on this host.

The VM is one of ``services.agent-microvm.vms`` (hostvms.py reads the
registry the NixOS module writes); attach runs SSH to its agent user with
the host key checked strictly, then the guest's ``agent-microvm-attach``
joins the session (or starts it again if the agent and its shell ended).
Detach with tmux's prefix + d: the agent keeps running, the VM stays up.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence

from microvm_run import hostvms, process
from microvm_run.contract import EXIT_BAD_INPUT

USAGE = "usage: microvm-run attach NAME   (a VM of services.agent-microvm; see microvm-run ps)"


def main(argv: Sequence[str], environ: Mapping[str, str]) -> int:
    words = list(argv[1:])
    if words in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    if len(words) != 1 or words[0].startswith("-"):
        return _fail(f"attach takes one VM name ({USAGE})", EXIT_BAD_INPUT)
    name = words[0]
    path = hostvms.registry_path(environ)
    try:
        vms = {vm.name: vm for vm in hostvms.load(path)}
    except hostvms.RegistryError as err:
        return _fail(str(err), 1)
    vm = vms.get(name)
    if vm is None:
        known = ", ".join(sorted(vms)) or "none"
        return _fail(f"no VM {name!r} is declared on this host ({path}: {known})", EXIT_BAD_INPUT)
    current = hostvms.state(vm, environ)
    if current != "active":
        return _fail(f"VM {name} is {current}: start it with systemctl start {vm.unit}", 1)
    if not vm.known_hosts.is_file():
        return _fail(f"no host key for VM {name} yet ({vm.known_hosts}); is it starting?", 1)
    try:
        process.replace(hostvms.attach_argv(vm), dict(environ))
    except process.ProcessError as err:
        return _fail(str(err), 1)
    return 1  # not reached: replace() does not return


def _fail(message: str, code: int) -> int:
    print(f"microvm-run: {message}", file=sys.stderr)
    return code
