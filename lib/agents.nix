# Every agent flavor: name -> its NixOS module (modules/flavor.nix over the
# flavor's entry in lib/flavors.nix). A new agent is one entry there; the
# flake, the host module, the checks and the tests all read this list.
builtins.mapAttrs (name: _: import ../modules/flavor.nix name) (import ./flavors.nix)
