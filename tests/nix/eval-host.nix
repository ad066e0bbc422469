# lib.evalModules over a host configuration with services.agent-microvm:
# microvm.nix's real host module (nixos-modules/host), our host module, the
# NixOS stand-in, and each VM's guest evaluated the same way (stand-in +
# microvm.nix's guest module + our modules) through the module's evalGuest.
# Returns plain data: the derived addresses, the nftables tables, networkd,
# the services our module adds, the registry and each guest's view.
#
#   nix-instantiate --eval --strict --json tests/nix/eval-host.nix \
#     --arg lib NIXPKGS_LIB/lib --arg microvm MICROVM_SRC [--arg extraModules '[ ... ]']
{
  lib,
  microvm,
  # More host modules (a clash, a bad name, ...).
  extraModules ? [ ],
  # The two VMs of the test host; replaced to test other sets.
  vms ? null,
}:
let
  nixpkgsLib = import lib;
  pkgs = import ./stand-in-pkgs.nix { lib = nixpkgsLib; };
  agents = import ../../lib/agents.nix;

  evalGuest =
    modules:
    nixpkgsLib.evalModules {
      modules = [
        ./nixos-stand-in.nix
        (microvm + "/nixos-modules/microvm")
        { _module.args.pkgs = pkgs; }
      ]
      ++ modules;
    };

  testVMs = {
    # open: public addresses, NAT; no key routes used (no key files).
    alpha = {
      flavor = "codex";
      workspace = "/home/alice/src/alpha";
      user = "alice";
      network.mode = "open";
    };
    # allowlist with a key: the test's upstreams (tests/integration/test_host_network.py).
    beta = {
      flavor = "claude";
      workspace = "/home/alice/src/beta";
      user = "alice";
      network.mode = "allowlist";
      network.allow = [ "allowed.amvm.test:8080" ];
      apiKeyFiles.ANTHROPIC_API_KEY = "/run/agenix/anthropic";
      packages = [ pkgs.socat ];
      modules = [
        {
          agentVM.network.keyProxy = [
            {
              var = "ANTHROPIC_API_KEY";
              upstream = "http://keys.amvm.test:8081/api";
              header = "x-api-key";
              baseUrlVar = "ANTHROPIC_BASE_URL";
              paths = [ "/api/v1/" ];
            }
          ];
        }
      ];
    };
  };

  eval = nixpkgsLib.evalModules {
    modules = [
      ./nixos-stand-in.nix
      (microvm + "/nixos-modules/host")
      ../../modules/host.nix
      {
        _module.args.pkgs = pkgs;
        networking.hostName = "workstation";
        users.users.alice = {
          isNormalUser = true;
          uid = 1001;
          openssh.authorizedKeys.keys = [ "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHostUserKeyForTheTest alice@workstation" ];
        };
        services.agent-microvm = {
          enable = true;
          package = pkgs.microvm-run;
          guestModules = [ ../../modules/base.nix ];
          flavorModules = agents;
          inherit evalGuest;
          bridge.externalInterface = nixpkgsLib.mkDefault "ext0";
          vms = if vms == null then testVMs else vms;
        };
      }
    ]
    ++ extraModules;
  };
  inherit (eval) config;
  cfg = config.services.agent-microvm;

  failed = builtins.filter (a: !a.assertion) config.assertions;

  ourServices = nixpkgsLib.filterAttrs (
    n: _: nixpkgsLib.hasPrefix "agent-microvm-" n || nixpkgsLib.hasPrefix "microvm@" n
  ) config.systemd.services;

  guestView =
    name:
    let
      g = config.microvm.vms.${name}.evaluatedConfig.config;
      gFailed = builtins.filter (a: !a.assertion) g.assertions;
    in
    if gFailed != [ ] then
      throw "guest ${name}: assertions failed:\n${nixpkgsLib.concatMapStringsSep "\n" (a: a.message) gFailed}"
    else
      {
        inherit (g.networking) hostName;
        persistent = {
          inherit (g.agentVM.persistent)
            address
            mac
            tap
            gateway
            nameservers
            useVc
            environment
            guestKeyVars
            uid
            authorizedKeys
            ;
        };
        microvm = {
          inherit (g.microvm)
            hypervisor
            mem
            vcpu
            credentialFiles
            ;
          interfaces = map (i: { inherit (i) type id mac; }) g.microvm.interfaces;
          guest = g.microvm.guest.enable;
          shares = map (s: {
            inherit (s)
              tag
              source
              mountPoint
              proto
              readOnly
              posixAcl
              cache
              extraArgs
              ;
          }) g.microvm.shares;
          # What microvm.nix's virtiofsd-run builds each share's command line from
          # (nixos-modules/microvm/virtiofsd/default.nix).
          virtiofsd = {
            inherit (g.microvm.virtiofsd)
              extraArgs
              threadPoolSize
              inodeFileHandles
              group
              ;
          };
        };
        network = g.systemd.network.networks;
        resolvConf = g.environment.etc."resolv.conf".text;
        openssh = {
          inherit (g.services.openssh) enable hostKeys;
          inherit (g.services.openssh.settings) PasswordAuthentication PermitRootLogin;
        };
        agentUser = {
          inherit (g.users.users.agent) uid extraGroups;
          keys = g.users.users.agent.openssh.authorizedKeys.keys;
        };
        sudo = g.security.sudo.enable;
        # What the console-bound throw-away guest would run: absent here.
        throwawayService = g.systemd.services ? agent-microvm;
        session = {
          inherit (g.systemd.services.agent-microvm-session) wantedBy;
          inherit (g.systemd.services.agent-microvm-session.serviceConfig) User Type ExecStart;
          poweroff = g.systemd.services.agent-microvm-session.unitConfig ? SuccessAction;
        };
        packages = map nixpkgsLib.getName g.environment.systemPackages;
        unfree = g.nixpkgs.config;
      };
in
if failed != [ ] then
  throw "assertions failed:\n${nixpkgsLib.concatMapStringsSep "\n" (a: a.message) failed}"
else
  {
    vms = nixpkgsLib.mapAttrs (name: _: guestView name) cfg.vms;
    microvmVms = nixpkgsLib.mapAttrs (_: v: { inherit (v) autostart; }) config.microvm.vms;
    autostart = config.microvm.autostart;
    inherit (cfg) registry egressConfigs;
    # The root-run script before each microvm@NAME, and the directories
    # microvm.nix's tmpfiles rules make (owner, mode) before it runs.
    prepare = nixpkgsLib.mapAttrs (_: s: s.text) cfg.prepareScripts;
    tmpfiles = config.systemd.tmpfiles.settings."10-microvm";
    nftables = {
      inherit (config.networking.nftables) enable;
      tables = nixpkgsLib.mapAttrs (_: t: { inherit (t) family content name; }) config.networking.nftables.tables;
    };
    # The ruleset as NixOS' nftables.nix writes it.
    ruleset = (import ../../lib/hostnet.nix { lib = nixpkgsLib; }).renderTables config.networking.nftables.tables;
    trustedInterfaces = config.networking.firewall.trustedInterfaces;
    networkd = {
      inherit (config.systemd.network) enable;
      netdevs = nixpkgsLib.mapAttrs (_: n: { inherit (n) netdevConfig; }) config.systemd.network.netdevs;
      networks = nixpkgsLib.mapAttrs (_: n: {
        inherit (n)
          matchConfig
          networkConfig
          linkConfig
          address
          ;
      }) config.systemd.network.networks;
    };
    sysctl = config.boot.kernel.sysctl;
    services = nixpkgsLib.mapAttrs (_: s: {
      inherit (s)
        description
        wantedBy
        before
        after
        serviceConfig
        ;
    }) ourServices;
    etc = config.environment.etc."agent-microvm/vms.json".text;
  }
