# Gemini CLI (Google).
{ lib, pkgs, ... }:
let
  network = import ../lib/network.nix;
in
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
  agentVM.network = {
    # lib/network.nix: the API endpoints and the key proxy route.
    allow = lib.mkDefault network.gemini.allow;
    keyProxy = lib.mkDefault network.gemini.keyProxy;
  };
}
