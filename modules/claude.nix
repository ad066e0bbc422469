# Claude Code (Anthropic). Unfree: only this package is allowed.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  network = import ../lib/network.nix;
  # Claude Code's hooks for "waiting for you" (its Notification event: a
  # permission or input prompt; Stop: the answer is done) call the guest's
  # agent-microvm-notify (modules/base.nix), which tells the host.
  notifyHooks = {
    Notification = "Claude Code needs your input";
    Stop = "Claude Code is done and waits for you";
  };
  # Passed with --settings, so nothing is written into the user's
  # ~/.claude/settings.json: the VM is the sandbox, so the "Bypass
  # Permissions mode" warning (default "No, exit") is not shown.
  settings = "agent-microvm/claude-settings.json";
in
{
  agentVM.agent = {
    name = "claude";
    package = lib.mkDefault pkgs.claude-code;
    command = lib.mkDefault [
      "claude"
      "--settings"
      "/etc/${settings}"
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
  environment.etc.${settings} = lib.mkIf config.agentVM.enable {
    text = builtins.toJSON { skipDangerousModePermissionPrompt = true; };
  };
  # Claude's first start in a project would stop at three dialogs: the
  # onboarding (its connectivity check ignores ANTHROPIC_BASE_URL), "use
  # this API key?" (default No, which leads into an OAuth login) and the
  # folder trust question. ~/.claude.json is Claude's own state, so only
  # what Claude itself writes when the user says yes is added, and nothing
  # the user decided is changed: a key suffix they rejected stays rejected.
  # A subscription login (~/.claude/.credentials.json) wins over the
  # injected key: the session runs without the key variables, so nothing is
  # billed to the API key behind the user's back (`/logout` in the VM, then
  # a new start, switches to the key).
  agentVM.launch.agentPreStart = ''
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
        ${pkgs.jq}/bin/jq --arg key "$claude_key" '
          .projects["/work"].hasTrustDialogAccepted //= true
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
  # No DISABLE_AUTOUPDATER here: nixpkgs' claude-code wrapper sets it
  # (pkgs/by-name/cl/claude-code/package.nix, wrapProgram --set).

  # Managed settings: the system-wide file Claude Code reads on Linux, merged
  # with the user's own; so the hooks need nothing in the agent's home.
  environment.etc."claude-code/managed-settings.json" = lib.mkIf config.agentVM.enable {
    text = builtins.toJSON {
      hooks = lib.mapAttrs (_: message: [
        {
          hooks = [
            {
              type = "command";
              command = "agent-microvm-notify ${lib.escapeShellArg message}";
            }
          ];
        }
      ]) notifyHooks;
    };
  };
}
