# lib.evalModules over microvm.nix's real guest options (and the guest
# modules that derive microvm.kernelParams, the store mounts and the boot
# optimisations from them) plus our modules, with the NixOS stand-in
# (nixos-stand-in.nix) and a stand-in pkgs. Type-checks our modules against
# microvm.nix, checks assertions, and returns plain data: the resolved
# microvm.* values, the spec and its TOML, microvm.nix's own QEMU command
# line for comparison, and the guest scripts.
#
#   nix-instantiate --eval --strict --json tests/nix/eval-modules.nix \
#     --arg lib NIXPKGS_LIB/lib --arg microvm MICROVM_SRC \
#     --argstr flavor claude --arg cri false
{
  lib,
  microvm,
  flavor,
  cri ? false,
  # false: the modules imported as a host would import them by mistake.
  enable ? true,
  # For negative checks: more modules, e.g. one that must trip an assertion.
  extraModules ? [ ],
}:
let
  nixpkgsLib = import lib;
  pkgs = import ./stand-in-pkgs.nix { lib = nixpkgsLib; };
  # Every flavor's package (lib/flavors.nix), for the unfree check.
  flavors = import ../../lib/flavors.nix;
  flavorPackages = map (f: f.package) (builtins.attrValues flavors);
  microvmLib = import (microvm + "/lib") { lib = nixpkgsLib; };
  microvmModule = name: microvm + "/nixos-modules/microvm/${name}.nix";

  eval = nixpkgsLib.evalModules {
    modules = [
      ./nixos-stand-in.nix
      # microvm.nix's nixosModules.microvm: its whole guest module list
      # (nixos-modules/microvm/default.nix), as the flake's base imports it.
      (microvm + "/nixos-modules/microvm")
      ../../modules/base.nix
      (import ../../lib/agents.nix).${flavor}
      {
        _module.args.pkgs = pkgs;
        agentVM.enable = enable;
        agentVM.cri.enable = cri;
      }
    ]
    ++ extraModules;
  };
  inherit (eval) config;
  mv = config.microvm;

  failed = builtins.filter (a: !a.assertion) config.assertions;

  # microvm.nix's generated QEMU command for the same config (we do not use
  # it: the runner builds its own from the spec; this shows they agree).
  qemuRunner = import (microvm + "/lib/runners/qemu.nix") {
    inherit pkgs;
    microvmConfig = mv // {
      inherit (config.networking) hostName;
      hypervisor = "qemu";
    };
    macvtapFds = { };
    inherit (microvmLib) withDriveLetters extractOptValues extractParamValue;
    # As microvm.nix's lib/runner.nix picks it.
    linuxTarget = pkgs.linux.target;
  };

  shareView = s: {
    inherit (s)
      tag
      source
      mountPoint
      proto
      readOnly
      socket
      ;
  };
in
if failed != [ ] then
  throw "assertions failed:\n${nixpkgsLib.concatMapStringsSep "\n" (a: a.message) failed}"
else
  {
    flavor = "${flavor}${nixpkgsLib.optionalString cri "-cri"}";
    # What the modules do to a system that is not a guest (enable = false).
    hostView = {
      guest = mv.guest.enable;
      inherit (config.networking) hostName useNetworkd;
      services = builtins.attrNames config.systemd.services;
      mounts = builtins.length config.systemd.mounts;
      kernelParams = config.boot.kernelParams;
      nixpkgsConfig = config.nixpkgs.config;
      users = builtins.attrNames config.users.users;
      etc = builtins.attrNames config.environment.etc;
    };
    # Claude Code's managed settings (the notification hooks), if any.
    claudeSettings = config.environment.etc."claude-code/managed-settings.json".text or null;
    # The /etc files of the flavor's entry (lib/flavors.nix), as NixOS has them.
    flavorEtc = builtins.mapAttrs (
      path: _:
      let
        file = config.environment.etc.${path} or null;
      in
      if file == null then null else { inherit (file) text mode; }
    ) (flavors.${flavor}.etc or { });
    systemPackages = map nixpkgsLib.getName config.environment.systemPackages;
    microvm = {
      inherit (mv)
        hypervisor
        mem
        vcpu
        kernelParams
        initrdPath
        writableStoreOverlay
        storeOnDisk
        machineId
        ;
      kernel = "${mv.kernel}";
      qemu = {
        inherit (mv.qemu) machine serialConsole;
        package = "${mv.qemu.package}";
      };
      shares = map shareView mv.shares;
    };
    agentVM = {
      inherit (config.agentVM) resources;
      agent = {
        inherit (config.agentVM.agent)
          name
          command
          apiKeyVars
          configDir
          unfreePackages
          ;
      };
      cri = {
        inherit (config.agentVM.cri) enable runtimes;
      };
    };
    fileSystems = nixpkgsLib.mapAttrs (_: fs: {
      inherit (fs) device fsType options neededForBoot;
      overlay = fs.overlay;
    }) config.fileSystems;
    # Which packages nixpkgs would let this configuration use
    # (stand-in-unfree.nix: nixpkgs' own config evaluation and check-meta).
    unfreeAllowed =
      let
        allowed = import ./stand-in-unfree.nix { lib = nixpkgsLib; } config.nixpkgs.config;
      in
      nixpkgsLib.mapAttrs (_: allowed) (
        nixpkgsLib.genAttrs (
          flavorPackages
          ++ [
            "unfree-other"
            "git"
          ]
        ) (name: pkgs.${name})
      );
    agentGroups = config.users.users.agent.extraGroups;
    networking = {
      inherit (config.networking) hostName useNetworkd;
      firewall = config.networking.firewall.enable;
      waitOnline = config.systemd.network.wait-online.enable;
      resolved = config.services.resolved.enable;
      resolvconf = config.networking.resolvconf.enable;
      resolvConf = config.environment.etc."resolv.conf".text or null;
      uplink = config.systemd.network.networks."10-uplink" or null;
    };
    sudo = config.security.sudo.enable;
    # The container runtimes' configuration (cri flavors).
    criView = nixpkgsLib.optionalAttrs cri {
      dockerSettings = config.virtualisation.docker.daemon.settings;
      containersStorage = config.virtualisation.containers.storage.settings;
      systemPackages = map nixpkgsLib.getName config.environment.systemPackages;
      containerdCrunPath = map nixpkgsLib.getName config.systemd.services.containerd-crun.path;
    };
    # Forced as NixOS forces them when it writes the units.
    mounts = map (m: {
      inherit (m)
        what
        where
        type
        options
        overrideStrategy
        unitConfig
        ;
    }) config.systemd.mounts;
    agentService = {
      inherit (config.systemd.services.agent-microvm)
        wantedBy
        requires
        after
        unitConfig
        serviceConfig
        ;
    };
    # The guest's Nix database: how and when the closure is registered.
    storeRegistration = {
      inherit (mv) registerClosure;
      postBootCommands = config.boot.postBootCommands;
      unit =
        let
          u = config.systemd.services.agent-microvm-register-store or null;
        in
        if u == null then
          null
        else
          {
            inherit (u)
              wantedBy
              before
              after
              unitConfig
              serviceConfig
              ;
            script = u.serviceConfig.ExecStart.text;
          };
      nixDaemonAfter = config.systemd.services.nix-daemon.after or [ ];
    };
    inherit (config.agentVM) spec;
    specToml = config.agentVM.specFile.text;
    scripts = config.agentVM.launch.scripts;
    microvmQemuCommand = qemuRunner.command;
    inherit (config) warnings;
    # What NixOS would install for the agent, for the systemd test guest
    # (tests/guest-systemd/render turns it into unit files and scripts).
    systemdGuest =
      let
        svc = config.systemd.services.agent-microvm;
        # The one normal user: the agent (lib/guest.nix names it).
        agentName = nixpkgsLib.head (
          builtins.attrNames (nixpkgsLib.filterAttrs (_: u: u.isNormalUser) config.users.users)
        );
        agentUser = config.users.users.${agentName};
      in
      {
        agentService = {
          inherit (svc)
            description
            wantedBy
            requires
            wants
            after
            before
            bindsTo
            partOf
            conflicts
            requisite
            unitConfig
            serviceConfig
            environment
            path
            ;
        };
        # writeShellScript's text, as nixpkgs writes it: runtimeShell first.
        scripts = nixpkgsLib.mapAttrs' (
          name: text: nixpkgsLib.nameValuePair "agent-microvm-${name}" "#!${pkgs.runtimeShell}\n${text}"
        ) config.agentVM.launch.scripts;
        networkd = config.systemd.network.enable;
        networks = config.systemd.network.networks;
        etc = nixpkgsLib.mapAttrs (_: f: f.text) (
          nixpkgsLib.filterAttrs (_: f: f.text or null != null) config.environment.etc
        );
        fileSystems = nixpkgsLib.mapAttrs (_: fs: {
          inherit (fs) device fsType options neededForBoot;
        }) config.fileSystems;
        user = {
          name = agentName;
          inherit (agentUser) uid home group;
          gid = config.users.groups.${agentUser.group}.gid;
          shell = "${agentUser.shell}/bin/bash";
        };
        disabledServices = builtins.attrNames (
          nixpkgsLib.filterAttrs (_: s: !s.enable) config.systemd.services
        );
      };
  }
