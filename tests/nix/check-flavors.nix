# Our flavors as `microvm-run check` finds them in a flake: for every agent of
# lib/flavors.nix, with and without container runtimes, a derivation shaped as
# pkgs/flavor.nix makes a flavor (`spec`, `specFile`), its spec from our
# modules evaluated against microvm.nix's real options (eval-modules.nix).
# Stand-in packages (nixpkgs itself cannot be fetched here), so nothing of it
# is ever built. `broken` adds a flavor whose modules trip an assertion, as a
# consumer's mistake would.
#
#   microvm-run check --file tests/nix/check-flavors.nix \
#     --arg lib NIXPKGS_LIB/lib --arg microvm MICROVM_SRC
{
  lib,
  microvm,
  broken ? true,
}:
let
  agents = builtins.attrNames (import ../../lib/flavors.nix);

  flavor =
    agent: cri: extraModules:
    let
      evaluated = import ./eval-modules.nix {
        inherit
          lib
          microvm
          cri
          extraModules
          ;
        flavor = agent;
      };
      name = "${agent}${if cri then "-cri" else ""}";
    in
    derivation {
      name = "${name}-microvm";
      system = "x86_64-linux";
      builder = "/bin/sh";
      args = [
        "-c"
        "exit 1"
      ];
      inherit (evaluated) specToml;
    }
    // {
      inherit (evaluated) spec;
      specFile = builtins.toFile "${name}-spec.toml" evaluated.specToml;
    };

  flavors = builtins.listToAttrs (
    builtins.concatMap (agent: [
      {
        name = agent;
        value = flavor agent false [ ];
      }
      {
        name = "${agent}-cri";
        value = flavor agent true [ ];
      }
    ]) agents
  );
in
flavors
// (
  if broken then
    {
      # A share added to microvm.shares directly: base.nix's assertion refuses it.
      broken = flavor "claude" false [
        {
          microvm.shares = [
            {
              tag = "x";
              source = "/x";
              mountPoint = "/x";
              proto = "virtiofs";
            }
          ];
        }
      ];
    }
  else
    { }
)
