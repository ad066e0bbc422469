# Codex CLI (OpenAI).
{ lib, pkgs, ... }:
let
  network = import ../lib/network.nix;
  # Codex takes its API base URL from its configuration only (it ignores
  # OPENAI_BASE_URL), and with the built-in provider its TUI asks for a
  # login even with OPENAI_API_KEY set, while `codex exec` sends no key at
  # all. So, given a key (the key proxy's placeholder or, with
  # --no-inject-keys, the real one), the command names a provider of its
  # own with `-c`: the base URL, the key variable, the Responses API over
  # HTTP (no WebSocket attempt first). Nothing is written to
  # ~/.codex/config.toml. A ChatGPT login in the home (auth.json with
  # tokens) wins: the key variables are dropped, Codex uses the login.
  # Every start has a `-c`, which also runs Codex in-process: no
  # background server, and no ~/.codex/packages (about 424 MB of binaries
  # it would otherwise copy into each project's home).
  wrapper = pkgs.writeShellScript "agent-microvm-codex" ''
    codex_home=''${CODEX_HOME:-$HOME/.codex}
    if [ -n "''${OPENAI_API_KEY:-}" ] &&
      ${pkgs.jq}/bin/jq -e '.tokens.refresh_token // empty' "$codex_home/auth.json" >/dev/null 2>&1; then
      unset OPENAI_API_KEY OPENAI_BASE_URL
    fi
    set -- -c check_for_update_on_startup=false "$@"
    if [ -n "''${OPENAI_API_KEY:-}" ]; then
      base_url=''${OPENAI_BASE_URL:-https://api.openai.com/v1}
      case $base_url in
        *[!A-Za-z0-9:/._-]*)
          echo "agent-microvm: OPENAI_BASE_URL=$base_url is not a plain URL" >&2
          exit 2
          ;;
      esac
      set -- -c "model_providers.microvm={ name = \"OpenAI\", base_url = \"$base_url\", env_key = \"OPENAI_API_KEY\", wire_api = \"responses\" }" \
        -c model_provider=microvm "$@"
    fi
    exec codex "$@"
  '';
in
{
  agentVM.agent = {
    name = "codex";
    package = lib.mkDefault pkgs.codex;
    # Codex's own bubblewrap sandbox cannot work inside the guest and is
    # redundant there: the VM is the sandbox.
    command = lib.mkDefault [
      "${wrapper}"
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
