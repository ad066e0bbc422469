# Every agent flavor: name -> its NixOS module. A new agent is one module
# under modules/ and one line here; the flake, the checks and the tests all
# read this list.
{
  claude = ../modules/claude.nix;
  codex = ../modules/codex.nix;
  gemini = ../modules/gemini.nix;
}
