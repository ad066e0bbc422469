# Each flavor's network defaults, from its entry in lib/flavors.nix (which
# says what they mean): the allowlist for `--net allowlist` and the key
# proxy routes for `--inject-keys`. Pure data (JSON with nix-instantiate
# --eval): the flake's lib.network, and the real-CLI tests read it.
builtins.mapAttrs (_: flavor: { inherit (flavor) allow keyProxy; }) (import ./flavors.nix)
