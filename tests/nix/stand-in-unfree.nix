# STAND-IN for what nixpkgs does with the NixOS option nixpkgs.config when
# it decides whether an unfree package may be used:
#   1. pkgs/top-level/default.nix evaluates the config as a module against
#      pkgs/top-level/config.nix (allowUnfree: bool; allowUnfreePackages:
#      listOf str; everything else freeform lazyAttrsOf raw);
#   2. pkgs/stdenv/generic/check-meta.nix (hasDeniedUnfreeLicense): a
#      package with an unfree meta.license is allowed by allowUnfree, by its
#      name (lib.getName) in allowUnfreePackages, or by a function
#      allowUnfreePredicate; a non-function predicate counts as none.
# The NIXPKGS_ALLOW_UNFREE environment variable is not modelled (unset).
#
#   import ./stand-in-unfree.nix { inherit lib; } nixpkgsConfig pkg -> bool
{ lib }:
nixpkgsConfig:
let
  eval = lib.evalModules {
    modules = [
      {
        freeformType = lib.types.lazyAttrsOf lib.types.raw;
        options = {
          allowUnfree = lib.mkOption {
            type = lib.types.bool;
            default = false;
          };
          allowUnfreePackages = lib.mkOption {
            type = lib.types.listOf lib.types.str;
            default = [ ];
          };
        };
      }
      {
        _file = "nixpkgs.config";
        config = nixpkgsConfig;
      }
    ];
  };
  config = eval.config;

  isUnfree = licenses: if builtins.isAttrs licenses then !(licenses.free or true) else false;
  hasUnfreeLicense = attrs: attrs ? meta.license && isUnfree attrs.meta.license;
  listPredicate = pkg: lib.elem (lib.getName pkg) config.allowUnfreePackages;
  definedListPredicate = config.allowUnfreePackages != [ ];
  definedExplicitPredicate = lib.isFunction (config.allowUnfreePredicate or null);
  hasDeniedUnfreeLicense =
    if config.allowUnfree then
      _: false
    else if definedListPredicate then
      if definedExplicitPredicate then
        attrs: hasUnfreeLicense attrs && !(listPredicate attrs || config.allowUnfreePredicate attrs)
      else
        attrs: hasUnfreeLicense attrs && !listPredicate attrs
    else if definedExplicitPredicate then
      attrs: hasUnfreeLicense attrs && !config.allowUnfreePredicate attrs
    else
      hasUnfreeLicense;
in
pkg: !hasDeniedUnfreeLicense pkg
