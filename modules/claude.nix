# Claude Code (Anthropic). Unfree: only this package is allowed.
{ lib, pkgs, ... }:
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
  # Updates come with the flake; a self-updating binary in a throw-away VM
  # would only download on every start.
  environment.variables.DISABLE_AUTOUPDATER = "1";
}
