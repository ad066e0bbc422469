# Codex CLI (OpenAI).
{ lib, pkgs, ... }:
let
  network = import ../lib/network.nix;
in
{
  agentVM.agent = {
    name = "codex";
    package = lib.mkDefault pkgs.codex;
    # Codex's own bubblewrap sandbox cannot work inside the guest and is
    # redundant there: the VM is the sandbox.
    command = lib.mkDefault [
      "codex"
      "--dangerously-bypass-approvals-and-sandbox"
    ];
    apiKeyVars = [ "OPENAI_API_KEY" ];
    configDir = ".codex";
  };
  agentVM.network = {
    # lib/network.nix: the API endpoints and the key proxy route.
    allow = lib.mkDefault network.codex.allow;
    keyProxy = lib.mkDefault network.codex.keyProxy;
  };
}
