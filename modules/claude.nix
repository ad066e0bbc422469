# Claude Code (Anthropic). Unfree: only this package is allowed.
{ lib, pkgs, ... }:
let
  network = import ../lib/network.nix;
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
}
