# Codex CLI (OpenAI).
{ lib, pkgs, ... }:
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
}
