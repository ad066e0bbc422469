# STAND-IN for NixOS: declares the NixOS options that our modules and
# microvm.nix's guest modules (its whole nixosModules.microvm list) set or
# read, so that lib.evalModules can type-check them without nixpkgs.
#
# Rule (a stand-in more lenient than NixOS proves nothing): a declaration with a nixpkgs file named above it is as
# strict as the NixOS one it mirrors: same type, same merge, same checks,
# same default (docs/nix.md lists the revisions read, the pin's nearest
# stored versions). The rest (users, fileSystems, environment.etc, the
# container modules' settings, programs.git, ...) only make the option path
# exist, with a type no stricter than NixOS' and possibly looser: a value
# they accept is not proven valid. Options NixOS declares but nothing here
# uses are left out, so a typo in an option path still fails.
# This is not NixOS: the real evaluation is `nix flake check` (checks/).
{
  config,
  options,
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

  # --- systemd: nixos/lib/systemd-lib.nix, nixos/lib/systemd-unit-options.nix

  boolValues = [
    true
    false
    "yes"
    "no"
  ];

  assertValueOneOf =
    name: values: group: attr:
    lib.optional (
      attr ? ${name} && !lib.elem attr.${name} values
    ) "Systemd ${group} field `${name}' cannot have value `${toString attr.${name}}'.";

  assertHasField =
    name: group: attr:
    lib.optional (!(attr ? ${name})) "Systemd ${group} field `${name}' must exist.";

  assertOnlyFields =
    fields: group: attr:
    let
      badFields = lib.filter (name: !lib.elem name fields) (lib.attrNames attr);
    in
    lib.optional (badFields != [ ]) "Systemd ${group} has extra fields [${lib.concatStringsSep " " badFields}].";

  # Applied by addCheck to each definition, so mkOverride / mkIf wrappers of
  # the values are still there and are looked through.
  checkUnitConfig =
    group: checks: attrs:
    let
      defs = lib.mapAttrs (
        _: v:
        if v._type or "" == "override" then
          v.content
        else if v._type or "" == "if" then
          v.content
        else
          v
      ) attrs;
      errors = lib.concatMap (c: c group defs) checks;
    in
    if errors == [ ] then true else builtins.trace (lib.concatStringsSep "\n" errors) false;

  # A unit name, as every dependency list takes (wantedBy, after, ...).
  unitNameType = types.strMatching "[a-zA-Z0-9@%:_.\\-]+[.](service|socket|device|mount|automount|swap|target|path|timer|scope|slice)";

  # List definitions concatenate, other values must agree.
  unitOption = lib.mkOptionType {
    name = "systemd option";
    merge =
      loc: defs:
      let
        defs' = lib.filterOverrides defs;
      in
      if lib.any (def: builtins.isList def.value) defs' then
        lib.concatMap (def: lib.toList def.value) defs'
      else
        lib.mergeEqualOption loc defs';
  };
  section = opt (types.attrsOf unitOption) { };
  checkedSection = check: opt (types.addCheck (types.attrsOf unitOption) check) { };

  checkService = checkUnitConfig "Service" [
    (assertValueOneOf "Type" [
      "exec"
      "simple"
      "forking"
      "oneshot"
      "dbus"
      "notify"
      "notify-reload"
      "idle"
    ])
    (assertValueOneOf "Restart" [
      "no"
      "on-success"
      "on-failure"
      "on-abnormal"
      "on-abort"
      "always"
    ])
  ];

  unitNames = opt (types.listOf unitNameType) [ ];

  # sharedOptions + commonUnitOptions + stage2CommonUnitOptions
  commonUnitOptions = {
    enable = opt types.bool true;
    overrideStrategy = opt (types.enum [
      "asDropinIfExists"
      "asDropin"
    ]) "asDropinIfExists";
    requiredBy = unitNames;
    upheldBy = unitNames;
    wantedBy = unitNames;
    aliases = unitNames;
    description = opt types.singleLineStr "";
    documentation = strs;
    requires = unitNames;
    wants = unitNames;
    upholds = unitNames;
    after = unitNames;
    before = unitNames;
    bindsTo = unitNames;
    partOf = unitNames;
    conflicts = unitNames;
    requisite = unitNames;
    unitConfig = section;
    onFailure = unitNames;
    onSuccess = unitNames;
    restartTriggers = opt (types.listOf types.unspecified) [ ];
    reloadTriggers = opt (types.listOf unitOption) [ ];
  };

  # stage2ServiceOptions (serviceOptions: environment, path, serviceConfig
  # with checkService, script and the other job scripts).
  # nixos/modules/system/boot/systemd/tmpfiles.nix: settings.<file>.<path>.<type>
  tmpfilesEntry = types.submodule (
    { name, ... }:
    {
      options = {
        type = opt types.str name;
        mode = opt types.str "-";
        user = opt types.str "-";
        group = opt types.str "-";
        age = opt types.str "-";
        argument = opt types.str "";
      };
    }
  );

  serviceType = types.submodule {
    options = commonUnitOptions // {
      environment = opt (types.attrsOf (
        types.nullOr (
          types.oneOf [
            types.str
            types.path
            types.package
          ]
        )
      )) { };
      path = opt (types.listOf (
        types.oneOf [
          types.package
          types.str
        ]
      )) [ ];
      serviceConfig = checkedSection checkService;
      script = opt types.lines "";
      scriptArgs = opt types.str "";
      preStart = opt types.lines "";
      postStart = opt types.lines "";
      reload = opt types.lines "";
      preStop = opt types.lines "";
      postStop = opt types.lines "";
      restartIfChanged = opt types.bool true;
      reloadIfChanged = flag;
      stopIfChanged = opt types.bool true;
    };
  };

  socketType = types.submodule {
    options = commonUnitOptions // {
      listenStreams = strs;
      listenDatagrams = strs;
      socketConfig = section;
    };
  };

  # stage2MountOptions: what and where are mandatory (no default).
  mountType = types.submodule {
    options = commonUnitOptions // {
      what = mkOption {
        type = types.str;
        description = "stand-in";
      };
      where = mkOption {
        type = types.str;
        description = "stand-in";
      };
      type = opt types.str "";
      options = opt types.commas "";
      mountConfig = section;
    };
  };

  # --- networkd: nixos/modules/system/boot/networkd.nix (check.network.*)
  checkNetworkSection = checkUnitConfig "Network" [
    (assertOnlyFields [
      "Description"
      "DHCP"
      "DHCPServer"
      "LinkLocalAddressing"
      "IPv4LLRoute"
      "DefaultRouteOnDevice"
      "LLMNR"
      "MulticastDNS"
      "DNSOverTLS"
      "DNSSEC"
      "DNSSECNegativeTrustAnchors"
      "LLDP"
      "EmitLLDP"
      "BindCarrier"
      "Address"
      "Gateway"
      "DNS"
      "Domains"
      "DNSDefaultRoute"
      "NTP"
      "IPForward"
      "IPMasquerade"
      "IPv6PrivacyExtensions"
      "IPv6AcceptRA"
      "IPv6DuplicateAddressDetection"
      "IPv6HopLimit"
      "IPv4ProxyARP"
      "IPv6ProxyNDP"
      "IPv6ProxyNDPAddress"
      "IPv6SendRA"
      "DHCPPrefixDelegation"
      "IPv6MTUBytes"
      "Bridge"
      "Bond"
      "VRF"
      "VLAN"
      "IPVLAN"
      "MACVLAN"
      "VXLAN"
      "Tunnel"
      "MACsec"
      "ActiveSlave"
      "PrimarySlave"
      "ConfigureWithoutCarrier"
      "IgnoreCarrierLoss"
      "Xfrm"
      "KeepConfiguration"
      "BatmanAdvanced"
    ])
    # both, none, v4, v6 are the deprecated spellings NixOS refuses.
    (assertValueOneOf "DHCP" [
      "yes"
      "no"
      "ipv4"
      "ipv6"
    ])
    (assertValueOneOf "LinkLocalAddressing" [
      "yes"
      "no"
      "ipv4"
      "ipv6"
      "fallback"
      "ipv4-fallback"
    ])
    (assertValueOneOf "IPv6AcceptRA" boolValues)
  ];
  checkNetworkLink = checkUnitConfig "Link" [
    (assertOnlyFields [
      "MACAddress"
      "MTUBytes"
      "ARP"
      "Multicast"
      "AllMulticast"
      "Unmanaged"
      "Group"
      "RequiredForOnline"
      "RequiredFamilyForOnline"
      "ActivationPolicy"
      "Promiscuous"
    ])
    (assertValueOneOf "RequiredForOnline" (
      boolValues
      ++ [
        "missing"
        "off"
        "no-carrier"
        "dormant"
        "degraded-carrier"
        "carrier"
        "degraded"
        "enslaved"
        "routable"
      ]
    ))
    (assertValueOneOf "ActivationPolicy" [
      "up"
      "always-up"
      "manual"
      "always-down"
      "down"
      "bound"
    ])
  ];
  # networkd.nix check.netdev.sectionNetdev
  checkNetdevSection = checkUnitConfig "Netdev" [
    (assertOnlyFields [
      "Description"
      "Name"
      "Kind"
      "MTUBytes"
      "MACAddress"
    ])
    (assertHasField "Name")
    (assertHasField "Kind")
    (assertValueOneOf "Kind" [
      "bond"
      "bridge"
      "dummy"
      "gre"
      "gretap"
      "erspan"
      "ip6gre"
      "ip6tnl"
      "ip6gretap"
      "ipip"
      "ipvlan"
      "ipvtap"
      "macvlan"
      "macvtap"
      "sit"
      "tap"
      "tun"
      "veth"
      "vlan"
      "vti"
      "vti6"
      "vxlan"
      "geneve"
      "l2tp"
      "macsec"
      "wlan"
      "vrf"
      "vcan"
      "vxcan"
      "wireguard"
      "netdevsim"
      "nlmon"
      "fou"
      "xfrm"
      "ifb"
      "batadv"
    ])
  ];
  netdevType = types.submodule {
    options = {
      enable = opt types.bool true;
      netdevConfig = checkedSection checkNetdevSection;
      extraConfig = opt types.lines "";
    };
  };

  # nixos/modules/services/networking/nftables.nix (tableSubmodule)
  nftTableType = types.submodule (
    { name, ... }:
    {
      options = {
        enable = opt types.bool true;
        name = mkOption {
          type = types.str;
          description = "stand-in";
        };
        content = mkOption {
          type = types.lines;
          description = "stand-in";
        };
        family = mkOption {
          type = types.enum [
            "ip"
            "ip6"
            "inet"
            "arp"
            "bridge"
            "netdev"
          ];
          description = "stand-in";
        };
      };
      config.name = lib.mkDefault name;
    }
  );

  networkType = types.submodule {
    options = {
      enable = opt types.bool true;
      matchConfig = section;
      networkConfig = checkedSection checkNetworkSection;
      linkConfig = checkedSection checkNetworkLink;
      address = strs;
      gateway = strs;
      dns = strs;
      ntp = strs;
      domains = opt (types.nullOr (types.listOf types.str)) null;
      extraConfig = opt types.lines "";
    };
  };

  # --- nixpkgs.config: nixos/modules/misc/nixpkgs.nix (configType). Not a
  # submodule: definitions are raw values, folded by mergeConfig; a nested
  # mkIf / mkDefault is not discharged, only the first definition of a
  # non-list attribute survives, lists concatenate.
  isConfig = x: builtins.isAttrs x || lib.isFunction x;
  optCall = f: x: if lib.isFunction f then f x else f;
  mergeConfig =
    lhs_: rhs_:
    let
      lhs = optCall lhs_ { inherit lib pkgs; };
      rhs = optCall rhs_ { inherit lib pkgs; };
    in
    (lib.zipAttrsWith (
      _: values:
      let
        rhs' = lib.elemAt values 0;
      in
      if builtins.isList rhs' then lib.concatLists values else rhs'
    ) [ lhs rhs ])
    // lib.optionalAttrs (lhs ? packageOverrides) {
      packageOverrides =
        pkgs:
        optCall lhs.packageOverrides pkgs // optCall (lib.attrByPath [ "packageOverrides" ] { } rhs) pkgs;
    };
  configType = lib.mkOptionType {
    name = "nixpkgs-config";
    description = "nixpkgs config";
    check = isConfig;
    merge = _: lib.foldr (def: mergeConfig def.value) { };
  };
  overlayType = lib.mkOptionType {
    name = "nixpkgs-overlay";
    description = "nixpkgs overlay";
    check = lib.isFunction;
    merge = lib.mergeOneOption;
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
      # nixos/modules/services/networking/ssh/sshd.nix (userOptions)
      openssh.authorizedKeys = {
        keys = opt (types.listOf types.singleLineStr) [ ];
        keyFiles = opt (types.listOf types.path) [ ];
      };
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
      # nixos/modules/system/boot/kernel.nix
      kernelPackages = opt types.raw { kernel = pkgs.linux; };
      kernelParams = strs;
      kernelModules = strs;
      blacklistedKernelModules = strs;
      consoleLogLevel = opt types.int 4;
      kernel.sysctl = opt (types.attrsOf (types.either types.int types.str)) { };
      # nixos/modules/system/boot/stage-2.nix
      postBootCommands = opt types.lines "";
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
      # nixos/modules/tasks/network-interfaces.nix: a checked host name.
      hostName = opt (types.strMatching "^$|^[[:alnum:]]([[:alnum:]_-]{0,61}[[:alnum:]])?$") "nixos";
      hostId = opt (types.nullOr types.str) null;
      useDHCP = opt types.bool true;
      useNetworkd = flag;
      firewall.enable = opt types.bool true;
      # nixos/modules/services/networking/firewall.nix
      firewall.trustedInterfaces = strs;
      # nixos/modules/services/networking/nftables.nix
      nftables = {
        enable = flag;
        tables = opt (types.attrsOf nftTableType) { };
      };
      resolvconf.enable = opt types.bool true;
    };

    systemd = {
      # nixos/modules/system/boot/systemd.nix
      package = opt types.package pkgs.systemd;
      services = opt (types.attrsOf serviceType) { };
      sockets = opt (types.attrsOf socketType) { };
      targets = anyAttrs;
      tmpfiles.settings = opt (types.attrsOf (types.attrsOf (types.attrsOf tmpfilesEntry))) { };
      mounts = opt (types.listOf mountType) [ ];
      generators = opt (types.attrsOf types.path) { };
      tpm2.enable = flag;
      # nixos/modules/system/boot/networkd.nix
      network = {
        enable = flag;
        netdevs = opt (types.attrsOf netdevType) { };
        wait-online.enable = opt types.bool true;
        networks = opt (types.attrsOf networkType) { };
      };
    };

    users = {
      mutableUsers = opt types.bool true;
      users = opt (types.attrsOf userType) { };
      groups = opt (types.attrsOf groupType) { };
    };

    security.sudo.enable = opt types.bool true;
    # nixos/modules/security/misc.nix
    security.virtualisation.flushL1DataCache = opt (types.nullOr (
      types.enum [
        "never"
        "cond"
        "always"
      ]
    )) null;
    # nixos/modules/services/networking/ssh/sshd.nix
    services.openssh = {
      enable = flag;
      hostKeys = opt (types.listOf types.attrs) [ ];
      settings = opt (types.submodule {
        freeformType = types.attrsOf types.anything;
        options = {
          PasswordAuthentication = opt (types.nullOr types.bool) true;
          KbdInteractiveAuthentication = opt (types.nullOr types.bool) true;
          PermitRootLogin = opt (types.nullOr (
            types.enum [
              "yes"
              "without-password"
              "prohibit-password"
              "forced-commands-only"
              "no"
            ]
          )) "prohibit-password";
        };
      }) { };
    };
    # Set by microvm.nix's host module (nixos-modules/host), never by ours:
    # declared only so that it evaluates.
    security.pam.loginLimits = opt (types.listOf types.attrs) [ ];
    security.wrappers = anyAttrs;
    hardware.ksm.enable = flag;

    # nixos/modules/system/boot/resolved.nix
    services.resolved.enable = flag;
    services.nix-daemon.enable = opt types.bool true;
    documentation.enable = opt types.bool true;

    programs.git = {
      enable = flag;
      config = anyAttrs;
    };

    environment = {
      systemPackages = opt (types.listOf types.package) [ ];
      variables = opt (types.attrsOf (types.either types.str (types.listOf types.str))) { };
      etc = opt (types.attrsOf etcFile) { };
    };

    # nixos/modules/misc/nixpkgs.nix
    nixpkgs = {
      config = opt configType { };
      overlays = opt (types.listOf overlayType) [ ];
      pkgs = mkOption {
        type = types.pkgs;
        description = "stand-in";
      };
      hostPlatform = mkOption {
        type = types.either types.str types.attrs;
        description = "stand-in";
      };
    };

    # nixos/modules/config/nix.nix and nixos/modules/services/system/nix-daemon.nix
    nix = {
      enable = opt types.bool true;
      package = opt types.package pkgs.nix;
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
      # nixos/modules/virtualisation/rosetta.nix (microvm.nix sets it for vfkit)
      rosetta.enable = flag;
      # read by microvm.nix's host module
      libvirtd.enable = flag;
    };

    system = {
      stateVersion = opt types.str "26.05";
      switch.enable = opt types.bool true;
      nixos.label = opt types.str "26.05-stand-in";
      build = opt (types.attrsOf types.raw) { };
      activationScripts = anyAttrs;
      # nixos/modules/system/activation/top-level.nix: the kernel's own
      # target since hostPlatform.linux-kernel left nixpkgs (2026-06).
      boot.loader = {
        kernelFile = opt types.str config.boot.kernelPackages.kernel.target;
        initrdFile = opt types.str "initrd";
      };
    };
  };

  config = lib.mkMerge [
    {
      system.build = {
        toplevel = pkgs.writeText "nixos-system-${config.networking.hostName}-stand-in" "";
        initialRamdisk = pkgs.writeText "initrd-stand-in" "";
      };

      # nixos/modules/misc/nixpkgs.nix: a consumer's own pkgs ignores
      # nixpkgs.config, and NixOS says so rather than dropping it.
      assertions = [
        {
          assertion = options.nixpkgs.pkgs.isDefined -> config.nixpkgs.config == { };
          message = ''
            Your system configures nixpkgs with an externally created instance.
            `nixpkgs.config` options should be passed when creating the instance instead.

            Current value:
            ${lib.generators.toPretty { multiline = true; } config.nixpkgs.config}

            Defined in:
            ${lib.concatMapStringsSep "\n" (file: "  - ${file}") options.nixpkgs.config.files}
          '';
        }
      ];
    }
    # nixos/modules/system/boot/networkd.nix: networkd brings resolved along
    # unless a module says otherwise at a higher priority.
    (lib.mkIf config.systemd.network.enable {
      services.resolved.enable = lib.mkDefault true;
    })
  ];
}
