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
  # Codex takes its API base URL from its configuration only (it ignores
  # OPENAI_BASE_URL); with its built-in provider the TUI asks for a login
  # even with OPENAI_API_KEY set, and `codex exec` sends no key at all. So,
  # given a key (the key proxy's placeholder or, with --no-inject-keys, the
  # real one), a command that starts with codex gets a provider of its own
  # with `-c`: the base URL, the key variable, the Responses API over HTTP
  # (no WebSocket attempt first). Nothing is written to
  # ~/.codex/config.toml. A ChatGPT login in the home (auth.json with
  # tokens) wins: the key variables are dropped and Codex uses the login.
  # Every start gets a `-c`, which also runs Codex in-process: no
  # background server, and no ~/.codex/packages (about 424 MB of binaries
  # it would otherwise copy into each project's home).
  agentVM.launch.agentPreStart = ''
    if [ "''${1##*/}" = codex ]; then
      codex_home=''${CODEX_HOME:-$HOME/.codex}
      if [ -n "''${OPENAI_API_KEY:-}" ] &&
        ${pkgs.jq}/bin/jq -e '.tokens.refresh_token // empty' "$codex_home/auth.json" >/dev/null 2>&1; then
        unset OPENAI_API_KEY OPENAI_BASE_URL
      fi
      codex_command=$1
      shift
      set -- -c check_for_update_on_startup=false "$@"
      if [ -n "''${OPENAI_API_KEY:-}" ]; then
        codex_url=''${OPENAI_BASE_URL:-https://api.openai.com/v1}
        case $codex_url in
          *[!A-Za-z0-9:/._-]*)
            echo "agent-microvm: OPENAI_BASE_URL=$codex_url is not a plain URL" >&2
            exit 2
            ;;
        esac
        set -- -c "model_providers.microvm={ name = \"OpenAI\", base_url = \"$codex_url\", env_key = \"OPENAI_API_KEY\", wire_api = \"responses\" }" \
          -c model_provider=microvm "$@"
      fi
      set -- "$codex_command" "$@"
      unset codex_home codex_command codex_url
    fi
  '';
}
