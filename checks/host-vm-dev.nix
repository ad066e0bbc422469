# The agent VM of checks/host-vm-test.nix, in a file of its own so that
# scripts/eval-modules evaluates the same declaration against microvm.nix's
# host module and the stand-in (the check itself needs a NixOS host).
{ lib, ... }:
let
  inherit (import ../lib/contract.nix) workDir;
in
{
  services.agent-microvm = {
    enable = true;
    bridge.externalInterface = "eth1";
    vms.dev = {
      flavor = "claude";
      workspace = "/home/alice/project";
      user = "alice";
      network.mode = "allowlist";
      apiKeyFiles.ANTHROPIC_API_KEY = "/run/keys/anthropic";
      resources = {
        memoryMiB = 1024;
        vcpus = 1;
      };
      modules = [
        {
          # No agent package to build; a script stands in for it and
          # leaves its mark in /work and on its terminal.
          agentVM.agent.package = lib.mkForce null;
          agentVM.agent.command = lib.mkForce [
            "sh"
            "-c"
            "echo agent-started > ${workDir}/started; printf 'key=%s url=%s\\n' \"$ANTHROPIC_API_KEY\" \"$ANTHROPIC_BASE_URL\"; echo AGENT-SCREEN; exec sleep infinity"
          ];
        }
      ];
    };
  };
}
