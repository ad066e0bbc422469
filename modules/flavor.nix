# One agent flavor's NixOS module, made from its entry in lib/flavors.nix:
#
#   import ./flavor.nix "claude"   -> the module (lib/agents.nix has them all)
#
# Every value is the entry's; the command, the allowlist and the key proxy
# routes are defaults a consumer's own value replaces.
name:
{
  config,
  lib,
  pkgs,
  ...
}:
let
  flavor = (import ../lib/flavors.nix).${name};
  preStart = flavor.preStart or "";
in
{
  _file = "${toString ./flavor.nix} (${name})";
  config = {
    agentVM.agent = {
      inherit name;
      package = lib.mkDefault pkgs.${flavor.package};
      command = lib.mkDefault flavor.command;
      apiKeyVars = flavor.keyVars;
      inherit (flavor) configDir;
      # Only this flavor's own package, by name (nixpkgs' lib.getName).
      unfreePackages = lib.mkIf (flavor.unfree or false) [ flavor.package ];
    };
    agentVM.network = {
      allow = lib.mkDefault flavor.allow;
      keyProxy = lib.mkDefault flavor.keyProxy;
    };
    environment.etc = lib.mkIf config.agentVM.enable (
      lib.mapAttrs (
        _: file:
        { text = builtins.toJSON file.json; }
        // lib.optionalAttrs (file ? mode) { inherit (file) mode; }
      ) (flavor.etc or { })
    );
    agentVM.launch.agentPreStart = lib.mkIf (preStart != "") (
      if builtins.isFunction preStart then preStart pkgs else preStart
    );
  };
}
