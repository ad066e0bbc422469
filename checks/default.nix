# `nix flake check` (on a host with Nix, network and KVM; see
# .github/workflows/nix.yml): the runner's unit tests, the builtins-only
# tests of lib/, a full NixOS evaluation of every flavor with and without
# container runtimes (resolved values asserted), and a NixOS VM test that
# boots a flavor with a stand-in agent.
{
  self,
  lib,
  pkgs,
  system,
}:
let
  agents = self.lib.agents;
  guest = import ../lib/guest.nix;
  contract = import ../lib/contract.nix;

  libTests =
    let
      results = (import ../tests/nix/default.nix).results;
    in
    if results.failed == [ ] then
      pkgs.runCommand "nix-lib-tests" { } ''
        echo "${toString results.passed} builtins tests passed" > $out
      ''
    else
      throw "tests/nix/cases.nix failed: ${lib.concatMapStringsSep ", " (c: c.name) results.failed}";

  # Evaluate (not build) a flavor's whole NixOS system and check the values
  # its spec resolved to (resolved values, not declarations: a mkDefault can
  # lose to a plain value elsewhere).
  evalFlavor =
    name: cri:
    let
      pkg = self.packages.${system}.${if cri then "${name}-cri" else name};
      inherit (pkg) spec nixos;
      want = guest.resources { inherit cri; };
      sources = map (s: s.source) spec.shares;
      facts = [
        {
          ok = spec.guest.memory_mib == want.memoryMiB && spec.guest.vcpus == want.vcpus;
          msg = "resources ${toString spec.guest.memory_mib} MiB / ${toString spec.guest.vcpus} vCPU";
        }
        {
          ok = spec.guest.memory_mib == nixos.config.microvm.mem;
          msg = "spec memory differs from microvm.mem";
        }
        {
          ok = builtins.elem "cri-storage" sources == cri;
          msg = "cri-storage share ${if cri then "missing" else "present"}";
        }
        {
          ok = lib.any (lib.hasPrefix "init=${nixos.config.system.build.toplevel}") spec.guest.kernel_params;
          msg = "kernel params lack init=<toplevel>/init";
        }
        {
          ok = !nixos.config.security.sudo.enable && !(builtins.elem "wheel" nixos.config.users.users.agent.extraGroups);
          msg = "the agent can become root";
        }
        {
          # The guest contract's DNS: TCP to the egress proxy, and no resolver
          # daemon that would rewrite the file.
          ok =
            let
              c = nixos.config;
            in
            !c.services.resolved.enable
            && !c.networking.resolvconf.enable
            && c.environment.etc."resolv.conf".text == "nameserver ${contract.network.egressAddr}\noptions use-vc\n";
          msg = "/etc/resolv.conf is not the contract's (nameserver ${contract.network.egressAddr}, options use-vc)";
        }
        {
          # The agent waits for its console and the status port (a module in
          # NixOS' kernel), and the closure registration is off the boot path.
          ok =
            let
              svc = nixos.config.systemd.services.agent-microvm;
              devices = [
                "dev-${contract.console}.device"
                "dev-virtio\\x2dports-${lib.replaceStrings [ "-" ] [ "\\x2d" ] contract.statusPort}.device"
              ];
            in
            lib.all (d: lib.elem d svc.requires && lib.elem d svc.after) devices
            && !nixos.config.microvm.registerClosure
            && !lib.hasInfix "--load-db" nixos.config.boot.postBootCommands;
          msg = "agent-microvm.service is not ordered after its devices, or stage 2 loads the store DB";
        }
        {
          ok =
            map (p: p.var) (spec.key_proxy or [ ]) == spec.agent.api_key_vars
            && spec.network.allow != [ ];
          msg = "no allowlist, or not one key proxy route per API key variable";
        }
      ];
      bad = builtins.filter (f: !f.ok) facts;
    in
    if bad != [ ] then
      throw "flavor ${pkg.name}: ${lib.concatMapStringsSep "; " (f: f.msg) bad}"
    else
      pkgs.runCommand "eval-${pkg.name}" { } ''
        # Evaluated only: the derivation paths prove evaluation succeeded.
        echo ${builtins.unsafeDiscardStringContext nixos.config.system.build.toplevel.drvPath} > $out
        echo ${builtins.unsafeDiscardStringContext pkg.specFile.drvPath} >> $out
      '';

  evalChecks = lib.concatMapAttrs (
    _: name: {
      "eval-${name}" = evalFlavor name false;
      "eval-${name}-cri" = evalFlavor name true;
    }
  ) (lib.genAttrs agents lib.id);
in
evalChecks
// {
  microvm-run = self.packages.${system}.microvm-run;
  nix-lib = libTests;
  vm-test = import ./vm-test.nix { inherit self lib pkgs system; };
  # nixosModules.host: microvm@dev on a NixOS host, attach, isolation.
  host-vm-test = import ./host-vm-test.nix {
    inherit
      self
      lib
      pkgs
      system
      ;
  };
  # ENABLE_CRI=docker,podman with a local image; storage not vfs.
  vm-test-cri = import ./vm-test.nix {
    inherit
      self
      lib
      pkgs
      system
      ;
    cri = true;
  };
}
