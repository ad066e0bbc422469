# Claude Code (Anthropic). Unfree: only this package is allowed.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  network = import ../lib/network.nix;
  # Claude Code's hooks for "waiting for you" (its Notification event: a
  # permission or input prompt; Stop: the answer is done) call the guest's
  # agent-microvm-notify (modules/base.nix), which tells the host.
  notifyHooks = {
    Notification = "Claude Code needs your input";
    Stop = "Claude Code is done and waits for you";
  };
in
{
  agentVM.agent = {
    name = "claude";
    package = lib.mkDefault pkgs.claude-code;
    command = lib.mkDefault [
      "claude"
      # The VM is the sandbox; Claude's own permission prompts are redundant.
      "--dangerously-skip-permissions"
    ];
    apiKeyVars = [ "ANTHROPIC_API_KEY" ];
    configDir = ".claude";
    unfreePackages = [ "claude-code" ];
  };
  agentVM.network = {
    # lib/network.nix: the API endpoints and the key proxy route.
    allow = lib.mkDefault network.claude.allow;
    keyProxy = lib.mkDefault network.claude.keyProxy;
  };
  # No DISABLE_AUTOUPDATER here: nixpkgs' claude-code wrapper sets it
  # (pkgs/by-name/cl/claude-code/package.nix, wrapProgram --set).

  # Managed settings: the system-wide file Claude Code reads on Linux, merged
  # with the user's own; so the hooks need nothing in the agent's home.
  environment.etc."claude-code/managed-settings.json" = lib.mkIf config.agentVM.enable {
    text = builtins.toJSON {
      hooks = lib.mapAttrs (_: message: [
        {
          hooks = [
            {
              type = "command";
              command = "agent-microvm-notify ${lib.escapeShellArg message}";
            }
          ];
        }
      ]) notifyHooks;
    };
  };
}
