# A real flavor in the systemd test guest (tests/integration/test_real_clis.py):
# the flavor's own name, key variables, command, pre-start and /etc files;
# no package, because the test puts the CLIs from npm on the guest's PATH
# instead (the NixOS packages cannot be built here). Used only to render
# tests/guest-systemd/rendered-flavors/NAME (scripts/eval-modules).
{ lib, ... }:
{
  agentVM.agent.package = lib.mkForce null;
}
