# STAND-IN for NixOS: declares only the NixOS options that our modules and
# the microvm.nix guest modules evaluated in tests/nix/eval-modules.nix set
# or read, so that lib.evalModules can type-check them without nixpkgs.
# Types are as loose as the real ones or looser; every value our modules set
# still has to be *declared* here, so a typo in an option path fails.
# This is not NixOS: the real evaluation is `nix flake check` (checks/).
{
  config,
  lib,
  pkgs,
  ...
}:
let
  inherit (lib) mkOption types;

  opt =
    type: default:
    mkOption {
      inherit type default;
      description = "stand-in";
    };
  flag = opt types.bool false;
  strs = opt (types.listOf types.str) [ ];
  anyAttrs = opt (types.attrsOf types.anything) { };

  # Like NixOS' systemd unit options: list definitions concatenate, other
  # values must agree.
  unitOption = lib.mkOptionType {
    name = "systemd option (stand-in)";
    merge =
      loc: defs:
      let
        defs' = lib.filterOverrides defs;
      in
      if lib.any (d: builtins.isList d.value) defs' then
        lib.concatMap (d: lib.toList d.value) defs'
      else
        lib.mergeEqualOption loc defs';
  };
  unitSection = opt (types.attrsOf unitOption) { };

  unit = types.submodule {
    options = {
      enable = opt types.bool true;
      description = opt types.str "";
      wantedBy = strs;
      requiredBy = strs;
      after = strs;
      before = strs;
      wants = strs;
      requires = strs;
      path = opt (types.listOf (types.either types.package types.str)) [ ];
      environment = opt (types.attrsOf (types.nullOr (types.either types.str types.package))) { };
      script = opt types.lines "";
      unitConfig = unitSection;
      serviceConfig = unitSection;
      socketConfig = unitSection;
      listenStreams = strs;
    };
  };

  fileSystem = types.submodule {
    freeformType = types.attrsOf types.anything;
    options = {
      device = opt (types.nullOr types.str) null;
      fsType = opt types.str "auto";
      options = opt (types.nonEmptyListOf types.str) [ "defaults" ];
      neededForBoot = flag;
      noCheck = flag;
      overlay = {
        lowerdir = opt (types.nullOr (types.listOf types.str)) null;
        upperdir = opt (types.nullOr types.str) null;
        workdir = opt (types.nullOr types.str) null;
      };
    };
  };

  userType = types.submodule {
    options = {
      isNormalUser = flag;
      isSystemUser = flag;
      uid = opt (types.nullOr types.int) null;
      group = opt types.str "";
      extraGroups = strs;
      home = opt types.str "/var/empty";
      createHome = flag;
      shell = opt (types.nullOr (types.either types.package types.str)) null;
      hashedPassword = opt (types.nullOr types.str) null;
    };
  };

  groupType = types.submodule {
    options = {
      gid = opt (types.nullOr types.int) null;
      members = strs;
    };
  };

  etcFile = types.submodule {
    options = {
      text = opt (types.nullOr types.lines) null;
      source = opt (types.nullOr types.path) null;
      mode = opt types.str "symlink";
    };
  };
in
{
  options = {
    assertions = opt (types.listOf types.unspecified) [ ];
    warnings = strs;

    boot = {
      kernelPackages = opt types.raw { kernel = pkgs.linux; };
      kernelParams = strs;
      kernelModules = strs;
      blacklistedKernelModules = strs;
      consoleLogLevel = opt types.int 4;
      kernel.sysctl = opt (types.attrsOf (types.either types.int types.str)) { };
      loader.grub.enable = opt types.bool true;
      swraid.enable = flag;
      initrd = {
        kernelModules = strs;
        availableKernelModules = strs;
        systemd.enable = flag;
        systemd.tpm2.enable = flag;
      };
    };

    fileSystems = opt (types.attrsOf fileSystem) { };

    networking = {
      hostName = opt types.str "nixos";
      hostId = opt (types.nullOr types.str) null;
      useDHCP = opt types.bool true;
      useNetworkd = flag;
      firewall.enable = opt types.bool true;
      resolvconf.enable = opt types.bool true;
    };

    systemd = {
      services = opt (types.attrsOf unit) { };
      sockets = opt (types.attrsOf unit) { };
      mounts = opt (types.listOf (types.attrsOf types.anything)) [ ];
      generators = opt (types.attrsOf types.str) { };
      tpm2.enable = flag;
      network = {
        enable = flag;
        wait-online.enable = opt types.bool true;
        networks = opt (types.attrsOf (types.attrsOf types.anything)) { };
      };
    };

    users = {
      mutableUsers = opt types.bool true;
      users = opt (types.attrsOf userType) { };
      groups = opt (types.attrsOf groupType) { };
    };

    security.sudo.enable = opt types.bool true;
    services.openssh.enable = flag;
    services.resolved.enable = flag;
    documentation.enable = opt types.bool true;

    programs.git = {
      enable = flag;
      config = anyAttrs;
    };

    environment = {
      systemPackages = opt (types.listOf types.package) [ ];
      variables = opt (types.attrsOf types.str) { };
      etc = opt (types.attrsOf etcFile) { };
    };

    nixpkgs = {
      config = opt (types.submodule { freeformType = types.attrsOf types.raw; }) { };
      overlays = opt (types.listOf types.raw) [ ];
    };

    nix = {
      enable = opt types.bool true;
      settings = opt (types.submodule {
        freeformType = types.attrsOf types.anything;
        options.auto-optimise-store = flag;
      }) { };
      optimise.automatic = flag;
      gc.automatic = flag;
    };

    virtualisation = {
      containers = {
        enable = flag;
        storage.settings = anyAttrs;
      };
      docker = {
        enable = flag;
        enableOnBoot = opt types.bool true;
        daemon.settings = anyAttrs;
      };
      podman = {
        enable = flag;
        dockerCompat = flag;
      };
      containerd = {
        enable = flag;
        settings = anyAttrs;
      };
      cri-o.enable = flag;
    };

    system = {
      stateVersion = opt types.str "26.05";
      switch.enable = opt types.bool true;
      build = opt (types.attrsOf types.raw) { };
      boot.loader = {
        kernelFile = opt types.str pkgs.stdenv.hostPlatform.linux-kernel.target;
        initrdFile = opt types.str "initrd";
      };
    };
  };

  config.system.build = {
    toplevel = pkgs.writeText "nixos-system-${config.networking.hostName}-stand-in" "";
    initialRamdisk = pkgs.writeText "initrd-stand-in" "";
  };
}
