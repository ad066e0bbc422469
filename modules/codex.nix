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
      # "The agent needs you" when a turn ends: Codex runs `notify` with the
      # event's JSON appended, which agent-microvm-notify ignores
      # (modules/base.nix). Checked with codex-cli 0.171.0: `-c notify=...`
      # takes a TOML list and refuses other types.
      "-c"
      ''notify=["agent-microvm-notify","Codex is done and waits for you"]''
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
