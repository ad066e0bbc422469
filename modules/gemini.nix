# Gemini CLI (Google).
{
  config,
  lib,
  pkgs,
  ...
}:
let
  network = import ../lib/network.nix;
  # Gemini's system defaults: below the user's own settings, so a user who
  # chose another auth type (a Google login: "oauth-personal") keeps it.
  # Copied into /etc (a mode, not a link into the store): Gemini refuses a
  # settings file under a group-writable directory such as /nix/store.
  defaults = "agent-microvm/gemini-system-defaults.json";
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
  environment.etc.${defaults} = lib.mkIf config.agentVM.enable {
    text = builtins.toJSON { security.auth.selectedType = "gemini-api-key"; };
    mode = "0444";
  };
  # With GOOGLE_GEMINI_BASE_URL set and no auth type chosen, Gemini picks
  # "gateway", which `gemini -p` refuses ("Invalid auth method selected",
  # exit 41) and the TUI answers with its auth dialog: with a key, the
  # default is the API key. /work is trusted, or Gemini silently turns
  # --yolo off (and exits 55 in headless mode): the VM is the sandbox.
  agentVM.launch.agentPreStart = ''
    export GEMINI_CLI_TRUST_WORKSPACE=true
    if [ -n "''${GEMINI_API_KEY:-}" ]; then
      export GEMINI_CLI_SYSTEM_DEFAULTS_PATH=/etc/${defaults}
    fi
  '';
}
