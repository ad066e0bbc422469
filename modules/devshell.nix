# The project's development environment inside the guest. The runner
# evaluates it on the host (only with DIRENV_ALLOW=1, the user's consent),
# caches it as a POSIX sh file of `export` lines and names that file, as a
# guest path, in MICROVM_DEVSHELL in the launch fragment. The agent's shell
# sources it just before the command starts; the host store is shared, so
# every store path it names is present.
{ config, lib, ... }:
let
  cfg = config.agentVM.devshell;
  var = (import ../lib/contract.nix).launchVars.devshell;
in
{
  options.agentVM.devshell.enable = lib.mkOption {
    type = lib.types.bool;
    default = true;
    description = ''
      Whether to source the dev environment the runner cached (launch variable
      ${var}) before the agent starts. Inert when the runner sets
      no ${var}.
    '';
  };

  config = lib.mkIf (config.agentVM.enable && cfg.enable) {
    agentVM.launch.agentPreStart = ''
      if [ -n "''${${var}:-}" ]; then
        if [ -r "${"$"}${var}" ]; then
          agent_microvm_path=$PATH
          . "${"$"}${var}"
          # The dev shell's tools first, the guest's after them.
          PATH="$PATH:$agent_microvm_path"
          export PATH
          unset agent_microvm_path
        else
          echo "agent-microvm: dev environment ${"$"}${var} is not readable; starting without it" >&2
        fi
      fi
    '';
  };
}
