# Gemini CLI (Google).
{ lib, pkgs, ... }:
{
  agentVM.agent = {
    name = "gemini";
    package = lib.mkDefault pkgs.gemini-cli;
    # --yolo: accept every tool call; the VM is the sandbox.
    command = lib.mkDefault [
      "gemini"
      "--yolo"
    ];
    apiKeyVars = [ "GEMINI_API_KEY" ];
    configDir = ".gemini";
  };
}
