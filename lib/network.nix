# Each flavor's network defaults, pure data (the flavor modules and
# tests/nix read it): the allowlist for `--net allowlist` (its API and login
# endpoints; users extend it with --allow) and the key proxy routes for
# `--inject-keys`. `baseUrlVar` is the variable through which the CLI takes
# its API base URL. `methods` and `paths` (prefixes of the upstream path) are
# all the key route forwards: the calls the agent's API client makes, so the
# real key is good for nothing else on that host (no TRACE, no other APIs).
{
  claude = {
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
  };
  codex = {
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
  };
  gemini = {
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
  };
}
