# Every agent flavor, one entry each: the one place a flavor is written.
# modules/flavor.nix turns an entry into the flavor's NixOS module; the
# flake (packages, apps, nixosModules, checks), nix.mk's targets,
# lib/network.nix, the Nix tests' samples and stand-in packages, the
# real-CLI tests and the README's flavor tables all read this file
# (tests/nix/cases.nix fails when one of them lists a flavor by hand).
#
# An entry:
#   title       the CLI's name (the flavor package's description)
#   package     its nixpkgs attribute (installed in the guest)
#   unfree      true: the package's licence is unfree; only it is allowed
#   command     the command the guest runs in /work
#   keyVars     the host variables passed as the agent's API keys
#   configDir   its configuration directory in the persistent home
#   allow       `--net allowlist`: its API and login endpoints (users
#               extend it with --allow)
#   keyProxy    `--inject-keys`: one route per key (lib/spec.nix): the
#               variable, the fixed upstream and the header the real key
#               goes in, `baseUrlVar` through which the CLI takes its API
#               base URL (`baseUrlPath` appended), and the only `methods`
#               and `paths` (prefixes of the upstream path) the route
#               forwards: the calls the CLI's API client makes, so the
#               real key is good for nothing else on that host
#   etc         small extras: files in the guest's /etc, path -> { json;
#               mode (optional: a copy, not a link into the store); }
#   preStart    small extras: shell run as the agent just before the
#               command (a function of the guest's pkgs when it needs one)
# Pure data apart from preStart, and flat: `nix-instantiate --eval` of
# lib/network.nix (or of an entry without preStart) gives JSON.
let
  contract = import ./contract.nix;
  claudeSettings = "agent-microvm/claude-settings.json";
  geminiDefaults = "agent-microvm/gemini-system-defaults.json";
  qwenDefaults = "agent-microvm/qwen-system-defaults.json";
  qwenQuiet = {
    # The settings schema's version: without it Qwen Code (0.10) rewrites
    # the file to add it, and says so on every start where it cannot.
    "$version" = 3;
    privacy.usageStatisticsEnabled = false;
    telemetry.enabled = false;
    general.enableAutoUpdate = false;
  };
  # agent-microvm-notify's message as one shell word (lib.escapeShellArg
  # without nixpkgs; the messages are plain text).
  notify = message: "agent-microvm-notify '${message}'";
in
{
  claude = {
    title = "Claude Code";
    package = "claude-code";
    unfree = true;
    command = [
      "claude"
      # Nothing is written into the user's ~/.claude/settings.json: the VM
      # is the sandbox, so the "Bypass Permissions mode" warning (default
      # "No, exit") is not shown (etc below).
      "--settings"
      "/etc/${claudeSettings}"
      # The VM is the sandbox; Claude's own permission prompts are redundant.
      "--dangerously-skip-permissions"
    ];
    keyVars = [ "ANTHROPIC_API_KEY" ];
    configDir = ".claude";
    allow = [
      "api.anthropic.com"
      "statsig.anthropic.com"
      "console.anthropic.com"
      "claude.ai"
      # Claude's first-start connectivity check and its OAuth token refresh.
      "platform.claude.com"
    ];
    keyProxy = [
      {
        var = "ANTHROPIC_API_KEY";
        upstream = "https://api.anthropic.com";
        header = "x-api-key";
        baseUrlVar = "ANTHROPIC_BASE_URL";
        # /v1/messages, /v1/messages/count_tokens, /v1/models
        methods = [
          "GET"
          "POST"
        ];
        paths = [ "/v1/" ];
      }
    ];
    etc = {
      ${claudeSettings}.json = {
        skipDangerousModePermissionPrompt = true;
      };
      # Managed settings: the system-wide file Claude Code reads on Linux,
      # merged with the user's own; so the hooks need nothing in the agent's
      # home. Its hooks for "waiting for you" (Notification: a permission or
      # input prompt; Stop: the answer is done) call the guest's
      # agent-microvm-notify (modules/base.nix), which tells the host.
      "claude-code/managed-settings.json".json = {
        hooks =
          builtins.mapAttrs
            (_: message: [
              {
                hooks = [
                  {
                    type = "command";
                    command = notify message;
                  }
                ];
              }
            ])
            {
              Notification = "Claude Code needs your input";
              Stop = "Claude Code is done and waits for you";
            };
      };
    };
    # Claude's first start in a project would stop at three dialogs: the
    # onboarding (its connectivity check ignores ANTHROPIC_BASE_URL), "use
    # this API key?" (default No, which leads into an OAuth login) and the
    # folder trust question. ~/.claude.json is Claude's own state, so only
    # what Claude itself writes when the user says yes is added, and nothing
    # the user decided is changed: a key suffix they rejected stays rejected.
    # A subscription login (~/.claude/.credentials.json) wins over the
    # injected key: the session runs without the key variables, so nothing
    # is billed to the API key behind the user's back (`/logout` in the VM,
    # then a new start, switches to the key).
    # No DISABLE_AUTOUPDATER here: nixpkgs' claude-code wrapper sets it
    # (pkgs/by-name/cl/claude-code/package.nix, wrapProgram --set).
    preStart =
      { jq, ... }:
      ''
        claude_state=''${CLAUDE_CONFIG_DIR:-$HOME}/.claude.json
        if [ -n "''${ANTHROPIC_API_KEY:-}" ] &&
          grep -qs '"claudeAiOauth"' "''${CLAUDE_CONFIG_DIR:-$HOME/.claude}/.credentials.json"; then
          unset ANTHROPIC_API_KEY ANTHROPIC_BASE_URL
        fi
        claude_key=
        if [ -n "''${ANTHROPIC_API_KEY:-}" ]; then
          # Claude records an approved key by its last 20 characters.
          claude_key=''${ANTHROPIC_API_KEY: -20}
        fi
        claude_tmp=$(mktemp "$claude_state.XXXXXX") &&
          if { [ -e "$claude_state" ] && cat "$claude_state" || echo '{}'; } |
            ${jq}/bin/jq --arg key "$claude_key" '
              .projects[${builtins.toJSON contract.workDir}].hasTrustDialogAccepted //= true
              | if $key == "" then . else
                  .hasCompletedOnboarding //= true
                  | .customApiKeyResponses.approved //= []
                  | .customApiKeyResponses.rejected //= []
                  | if (.customApiKeyResponses.approved + .customApiKeyResponses.rejected | index([$key]))
                    then . else .customApiKeyResponses.approved += [$key] end
                end' >"$claude_tmp"; then
            mv -f "$claude_tmp" "$claude_state"
          else
            echo "agent-microvm: $claude_state is not valid JSON; left as it is" >&2
            rm -f "$claude_tmp"
          fi
        unset claude_state claude_key claude_tmp
      '';
  };

  codex = {
    title = "Codex CLI";
    package = "codex";
    command = [
      "codex"
      # Codex's own bubblewrap sandbox cannot work inside the guest and is
      # redundant there: the VM is the sandbox.
      "--dangerously-bypass-approvals-and-sandbox"
      # "The agent needs you" when a turn ends: Codex runs `notify` with the
      # event's JSON appended, which agent-microvm-notify ignores
      # (modules/base.nix). Checked with codex-cli 0.171.0: `-c notify=...`
      # takes a TOML list and refuses other types.
      "-c"
      ''notify=["agent-microvm-notify","Codex is done and waits for you"]''
    ];
    keyVars = [ "OPENAI_API_KEY" ];
    configDir = ".codex";
    allow = [
      "api.openai.com"
      "auth.openai.com"
      "chatgpt.com"
    ];
    keyProxy = [
      {
        var = "OPENAI_API_KEY";
        upstream = "https://api.openai.com";
        header = "authorization";
        baseUrlVar = "OPENAI_BASE_URL";
        baseUrlPath = "/v1";
        # /v1/responses, /v1/chat/completions, /v1/models
        methods = [
          "GET"
          "POST"
        ];
        paths = [ "/v1/" ];
      }
    ];
    # Codex takes its API base URL from its configuration only (it ignores
    # OPENAI_BASE_URL); with its built-in provider the TUI asks for a login
    # even with OPENAI_API_KEY set, and `codex exec` sends no key at all.
    # So, given a key (the key proxy's placeholder or, with
    # --no-inject-keys, the real one), a command that starts with codex gets
    # a provider of its own with `-c`: the base URL, the key variable, the
    # Responses API over HTTP (no WebSocket attempt first). Nothing is
    # written to ~/.codex/config.toml. A ChatGPT login in the home
    # (auth.json with tokens) wins: the key variables are dropped and Codex
    # uses the login. Every start gets a `-c`, which also runs Codex
    # in-process: no background server, and no ~/.codex/packages (about
    # 424 MB of binaries it would otherwise copy into each project's home).
    preStart =
      { jq, ... }:
      ''
        if [ "''${1##*/}" = codex ]; then
          codex_home=''${CODEX_HOME:-$HOME/.codex}
          if [ -n "''${OPENAI_API_KEY:-}" ] &&
            ${jq}/bin/jq -e '.tokens.refresh_token // empty' "$codex_home/auth.json" >/dev/null 2>&1; then
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
  };

  gemini = {
    title = "Gemini CLI";
    package = "gemini-cli";
    # --yolo: accept every tool call; the VM is the sandbox.
    command = [
      "gemini"
      "--yolo"
    ];
    keyVars = [ "GEMINI_API_KEY" ];
    configDir = ".gemini";
    allow = [
      "generativelanguage.googleapis.com"
      "cloudcode-pa.googleapis.com"
      "oauth2.googleapis.com"
      "accounts.google.com"
    ];
    keyProxy = [
      {
        var = "GEMINI_API_KEY";
        upstream = "https://generativelanguage.googleapis.com";
        header = "x-goog-api-key";
        baseUrlVar = "GOOGLE_GEMINI_BASE_URL";
        # /v1beta/models/M:streamGenerateContent, :countTokens, :embedContent
        methods = [
          "GET"
          "POST"
        ];
        paths = [
          "/v1beta/"
          "/v1/"
        ];
      }
    ];
    # Gemini's system defaults: below the user's own settings, so a user who
    # chose another auth type (a Google login: "oauth-personal") keeps it.
    # Copied into /etc (a mode, not a link into the store): Gemini refuses a
    # settings file under a group-writable directory such as /nix/store.
    etc.${geminiDefaults} = {
      json.security.auth.selectedType = "gemini-api-key";
      mode = "0444";
    };
    # With GOOGLE_GEMINI_BASE_URL set and no auth type chosen, Gemini picks
    # "gateway", which `gemini -p` refuses ("Invalid auth method selected",
    # exit 41) and the TUI answers with its auth dialog: with a key, the
    # default is the API key. /work is trusted, or Gemini silently turns
    # --yolo off (and exits 55 in headless mode): the VM is the sandbox.
    preStart = ''
      export GEMINI_CLI_TRUST_WORKSPACE=true
      if [ -n "''${GEMINI_API_KEY:-}" ]; then
        export GEMINI_CLI_SYSTEM_DEFAULTS_PATH=/etc/${geminiDefaults}
      fi
    '';
  };

  # Qwen Code (Alibaba), an OpenAI-compatible client: it reads
  # OPENAI_API_KEY and OPENAI_BASE_URL (packages/core/src/models/constants.ts
  # in QwenLM/qwen-code), but only once an auth type is chosen, and sends
  # POST $OPENAI_BASE_URL/chat/completions with `Authorization: Bearer`.
  # The host's key is DASHSCOPE_API_KEY (Model Studio's own name for it), not
  # OPENAI_API_KEY: an OpenAI key exported for codex must never be sent to
  # Alibaba. The guest's session hands it to Qwen Code (preStart).
  qwen = {
    title = "Qwen Code";
    package = "qwen-code";
    # --yolo: accept every tool call; the VM is the sandbox.
    command = [
      "qwen"
      "--yolo"
    ];
    keyVars = [ "DASHSCOPE_API_KEY" ];
    configDir = ".qwen";
    allow = [
      # Alibaba Cloud Model Studio's OpenAI-compatible API, Qwen Code's
      # default for an API key.
      "dashscope.aliyuncs.com"
      # The Qwen OAuth login (device flow); the API host its token names
      # is the user's to --allow.
      "chat.qwen.ai"
    ];
    keyProxy = [
      {
        var = "DASHSCOPE_API_KEY";
        upstream = "https://dashscope.aliyuncs.com/compatible-mode";
        header = "authorization";
        baseUrlVar = "OPENAI_BASE_URL";
        baseUrlPath = "/v1";
        # /compatible-mode/v1/chat/completions, /compatible-mode/v1/models
        methods = [
          "GET"
          "POST"
        ];
        paths = [ "/compatible-mode/v1/" ];
      }
    ];
    # Qwen Code's system defaults, the lowest layer of its settings (a user
    # who chose another auth type, a Qwen OAuth login "qwen-oauth", or
    # another model in ~/.qwen/settings.json keeps it): no usage statistics
    # or telemetry (their host is not in the allowlist), no update check.
    # With a key the defaults are a second file that also selects the key
    # ("openai") and a model that Model Studio serves (in Qwen Code 0.24.4's
    # list of its models): with a key and no auth type chosen, `qwen -p`
    # fails ("No auth type is selected") and the TUI opens its "Connect a
    # Provider" dialog (seen with 0.10.1 and 0.24.4).
    etc = {
      "qwen-code/system-defaults.json".json = qwenQuiet;
      ${qwenDefaults}.json = qwenQuiet // {
        security.auth.selectedType = "openai";
        model.name = "qwen3-coder-plus";
      };
    };
    preStart = ''
      if [ -n "''${DASHSCOPE_API_KEY:-}" ]; then
        export OPENAI_API_KEY="$DASHSCOPE_API_KEY"
        export QWEN_CODE_SYSTEM_DEFAULTS_PATH=/etc/${qwenDefaults}
      fi
    '';
  };
}
