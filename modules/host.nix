# services.agent-microvm: agent VMs declared in a NixOS host's configuration.
# Each `vms.<name>` becomes microvm.nix's `microvm.vms.<name>` (a long-lived
# `microvm@NAME`) running our guest modules in their persistent variant
# (modules/persistent.nix), on a bridge made with systemd-networkd, with the
# isolation the runner gives a throw-away VM: nftables on the bridge lets a VM
# reach neither this host (except its own egress proxy port) nor the LAN nor
# another VM; `open` reaches public addresses only; `allowlist` goes through
# the runner's egress proxy (microvm-run-egress, a hardened service per VM),
# whose key proxy adds the API keys; a proxy that is down lets nothing out.
#
# The flake's nixosModules.host imports this with microvm.nix's host module
# and fills in `guestModules`, `flavorModules` and `package`.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.services.agent-microvm;
  hostnet = import ../lib/hostnet.nix { inherit lib; };
  guest = import ../lib/guest.nix;
  contract = import ../lib/contract.nix;
  inherit (config.microvm) stateDir;

  net = hostnet.subnet cfg.bridge;
  # The runner's: what a guest sees instead of a key, and its proxy's ports.
  placeholder = contract.network.keyPlaceholder;
  keyProxyPort = contract.network.ports.keyProxy;
  httpProxyPort = contract.network.ports.proxy;

  vmOptions =
    { name, config, ... }:
    {
      options = {
        flavor = lib.mkOption {
          type = lib.types.nullOr (lib.types.enum (builtins.attrNames cfg.flavorModules));
          default = null;
          example = "claude";
          description = "The agent flavor (claude, gemini, codex), or null for a VM with a shell only.";
        };
        workspace = lib.mkOption {
          type = lib.types.strMatching "/.+";
          example = "/home/alice/src/project";
          description = "The host directory shared read-write at /work.";
        };
        user = lib.mkOption {
          type = lib.types.str;
          example = "alice";
          description = ''
            The host user the VM works for: their authorized SSH keys log in
            as the guest's `agent` user, whose uid is theirs (when set), so
            files in /work keep their owner.
          '';
        };
        authorizedKeys = lib.mkOption {
          type = lib.types.listOf lib.types.singleLineStr;
          default = config.hostUserKeys;
          defaultText = lib.literalExpression "config.users.users.<user>.openssh.authorizedKeys.keys";
          description = "SSH public keys that log in to the VM (`microvm-run attach` uses yours).";
        };
        hostUserKeys = lib.mkOption {
          type = lib.types.listOf lib.types.singleLineStr;
          internal = true;
          description = "The host user's authorized keys (filled in by the module).";
        };
        packages = lib.mkOption {
          type = lib.types.listOf lib.types.package;
          default = [ ];
          description = "Extra packages in the VM.";
        };
        modules = lib.mkOption {
          type = lib.types.listOf lib.types.deferredModule;
          default = [ ];
          description = "Extra NixOS modules of the VM.";
        };
        resources = {
          memoryMiB = lib.mkOption {
            type = lib.types.ints.between 64 (1024 * 1024);
            default = (guest.resources { }).memoryMiB;
            description = "Guest memory in MiB.";
          };
          vcpus = lib.mkOption {
            type = lib.types.ints.between 1 255;
            default = (guest.resources { }).vcpus;
            description = "Virtual CPUs.";
          };
        };
        address = lib.mkOption {
          type = lib.types.nullOr lib.types.str;
          default = null;
          example = "10.77.0.10";
          description = "The VM's address on the bridge; derived from the name when null.";
        };
        mac = lib.mkOption {
          type = lib.types.nullOr (lib.types.strMatching "02(:[0-9a-f]{2}){5}");
          default = null;
          description = "The VM's MAC address (locally administered, 02:...); derived from the name when null.";
        };
        autostart = lib.mkOption {
          type = lib.types.bool;
          default = true;
          description = "Start `microvm@NAME` at boot.";
        };
        network = {
          mode = lib.mkOption {
            type = lib.types.enum [
              "open"
              "allowlist"
              "none"
            ];
            default = "allowlist";
            description = ''
              `open`: public addresses only, routed with NAT; `allowlist`:
              only the flavor's endpoints and `allow`, through the egress
              proxy; `none`: nothing beyond SSH from this host.
            '';
          };
          allow = lib.mkOption {
            type = lib.types.listOf lib.types.str;
            default = [ ];
            example = [ "github.com" ];
            description = "Allowlist entries added to the flavor's (host, `*.suffix`, `:port`).";
          };
          nameservers = lib.mkOption {
            type = lib.types.listOf lib.types.str;
            default = [
              "9.9.9.9"
              "1.1.1.1"
            ];
            description = "Public resolvers of an `open` VM (the LAN's are out of its reach).";
          };
        };
        apiKeyFiles = lib.mkOption {
          type = lib.types.attrsOf (lib.types.strMatching "/.+");
          default = { };
          example = {
            ANTHROPIC_API_KEY = "/run/agenix/anthropic";
          };
          description = ''
            API keys by variable, as paths of files readable by root (agenix,
            sops-nix): strings, never copied to the store. Read by systemd as
            credentials of the VM's egress proxy (keys with a key proxy route:
            the guest sees a placeholder) or of `microvm@NAME` (others).
          '';
        };
      };
      config.hostUserKeys = lib.attrByPath [
        "users"
        "users"
        config.user
        "openssh"
        "authorizedKeys"
        "keys"
      ] [ ] hostConfig;
    };
  hostConfig = config;

  # Everything derived per VM, one place (values listed once).
  resolved = lib.mapAttrs (
    name: vm:
    let
      address = if vm.address != null then vm.address else hostnet.derivedAddress net name;
      index = hostnet.indexOf net address;
      guestConfig = config.microvm.vms.${name}.evaluatedConfig.config;
      routes = if vm.flavor == null then [ ] else guestConfig.agentVM.network.keyProxy;
      proxied = vm.network.mode != "none";
      routeVars = if proxied then map (r: r.var) routes else [ ];
    in
    {
      inherit name address index;
      mac = if vm.mac != null then vm.mac else hostnet.derivedMac name;
      tap = hostnet.tapName name;
      inherit (vm.network) mode;
      proxyPort = cfg.proxyPortBase + (if index == null then 0 else index);
      proxyKeys = lib.filterAttrs (var: _: lib.elem var routeVars) vm.apiKeyFiles;
      guestKeys = lib.filterAttrs (var: _: !lib.elem var routeVars) vm.apiKeyFiles;
      inherit routes guestConfig;
      allow =
        (if vm.flavor == null then [ ] else guestConfig.agentVM.network.allow) ++ vm.network.allow;
    }
  ) cfg.vms;
  vmList = lib.attrValues resolved;

  # The proxy's configuration (microvm_run.hostegress reads it).
  egressConfig = vm: {
    version = 1;
    instance = vm.name;
    listen = cfg.bridge.address;
    port = vm.proxyPort;
    peer = vm.address;
    inherit (vm) mode allow;
    log = "/var/log/agent-microvm/${vm.name}/egress.log";
    key_routes = map (r: {
      inherit (r)
        var
        upstream
        header
        methods
        paths
        ;
    }) (builtins.filter (r: vm.proxyKeys ? ${r.var}) vm.routes);
  };
  egressConfigFile =
    vm: pkgs.writeText "agent-microvm-egress-${vm.name}.json" (builtins.toJSON (egressConfig vm));

  # Each route's placeholder and base URL, as the runner sets them.
  guestEnvironment =
    vm:
    let
      gw = cfg.bridge.address;
    in
    lib.optionalAttrs (vm.mode == "allowlist") {
      HTTP_PROXY = "http://${gw}:${toString httpProxyPort}";
      HTTPS_PROXY = "http://${gw}:${toString httpProxyPort}";
      http_proxy = "http://${gw}:${toString httpProxyPort}";
      https_proxy = "http://${gw}:${toString httpProxyPort}";
      NO_PROXY = gw;
    }
    // lib.listToAttrs (
      lib.concatMap (
        r:
        lib.optionals (vm.proxyKeys ? ${r.var}) [
          (lib.nameValuePair r.var placeholder)
          (lib.nameValuePair r.baseUrlVar (
            "http://${gw}:${toString keyProxyPort}/${
              builtins.replaceStrings [ "_" ] [ "-" ] (lib.toLower r.var)
            }${r.baseUrlPath}"
          ))
        ]
      ) vm.routes
    );

  guestModule =
    name: vm:
    let
      r = resolved.${name};
      hostUser = config.users.users.${vm.user} or { };
    in
    {
      imports =
        cfg.guestModules
        ++ lib.optional (vm.flavor != null) cfg.flavorModules.${vm.flavor}
        ++ vm.modules;
      agentVM.resources = {
        inherit (vm.resources) memoryMiB vcpus;
      };
      agentVM.persistent = {
        enable = true;
        inherit name;
        inherit (vm) flavor workspace authorizedKeys;
        inherit (r) address mac tap;
        inherit (cfg.bridge) prefixLength;
        gateway = cfg.bridge.address;
        nameservers = if vm.network.mode == "open" then vm.network.nameservers else [ cfg.bridge.address ];
        useVc = vm.network.mode != "open";
        stateDir = "${stateDir}/${name}";
        uid = if (hostUser.uid or null) != null && hostUser.uid >= 1000 then hostUser.uid else guest.user.uid;
        environment = guestEnvironment r;
        guestKeyVars = builtins.attrNames r.guestKeys;
      };
      environment.systemPackages = vm.packages;
    };

  # Clashes are evaluation errors naming both VMs.
  clashes =
    let
      pairs = lib.concatMap (
        a: map (b: { inherit a b; }) (builtins.filter (b: a.name < b.name) vmList)
      ) vmList;
      same = what: lib.filter (p: p.a.${what} == p.b.${what}) pairs;
    in
    map (
      p:
      "services.agent-microvm: VMs ${p.a.name} and ${p.b.name} have the same address ${p.a.address}; set vms.${p.b.name}.address"
    ) (same "address")
    ++ map (
      p:
      "services.agent-microvm: VMs ${p.a.name} and ${p.b.name} have the same MAC ${p.a.mac}; set vms.${p.b.name}.mac"
    ) (same "mac");

  # Host keys made on the first start, kept in the state directory across
  # rebuilds; a known_hosts line for `microvm-run attach`. This runs as
  # root in directories that are not root's: microvm.nix's tmpfiles rules
  # make the state directory and the shares' sources (NAME/ssh, NAME/home)
  # its `microvm` user's, which every VM's QEMU runs as, and a QEMU escaped
  # from may leave symlinks there. So it enters a directory only when that
  # name is the directory itself (same inode, no link), works relative to it
  # from then on, makes ssh root's before reading or writing in it, and
  # removes from it whatever is not a regular file of root's.
  prepareState =
    vm:
    pkgs.writeShellScript "agent-microvm-prepare-${vm.name}" ''
      set -eu
      # microvm.nix empties microvm@'s path (path = mkForce [ ]).
      PATH=${
        lib.makeBinPath [
          pkgs.coreutils
          pkgs.findutils
        ]
      }
      fail() {
        echo "agent-microvm: $1; not starting ${vm.name}" >&2
        exit 1
      }
      enter() {
        seen=$(stat -c %F:%d:%i -- "$1") || fail "no $1 in $(pwd -P)"
        cd -P -- "$1" || fail "cannot enter $1"
        [ "$seen" = "directory:$(stat -c %d:%i .)" ] || fail "$1 is not a directory (a symlink?)"
      }
      cd -P -- ${stateDir}
      enter ${vm.name}
      [ -e ssh ] || [ -L ssh ] || mkdir -m 0755 ssh
      [ -e home ] || [ -L home ] || mkdir -m 0700 home
      (
        enter home
        chown ${toString vm.guestConfig.agentVM.persistent.uid} .
        chmod 0700 .
      )
      (
        enter ssh
        chown 0:0 .
        chmod 0755 .
        find . -mindepth 1 -maxdepth 1 \( ! -type f -o ! -user 0 -o -links +1 \) -exec rm -rf -- {} +
        if [ ! -e ssh_host_ed25519_key ] || [ ! -e ssh_host_ed25519_key.pub ]; then
          rm -f ssh_host_ed25519_key ssh_host_ed25519_key.pub
          ${pkgs.openssh}/bin/ssh-keygen -q -t ed25519 -N "" -C "agent-microvm ${vm.name}" \
            -f ./ssh_host_ed25519_key
        fi
        chmod 0600 ssh_host_ed25519_key
        chmod 0644 ssh_host_ed25519_key.pub
        printf '%s %s\n' ${vm.address} "$(cut -d' ' -f1,2 ssh_host_ed25519_key.pub)" >known_hosts
        chmod 0644 known_hosts
      )
    '';

  # What `microvm-run ps` / `attach` read.
  registry = {
    version = 1;
    vms = map (vm: {
      inherit (vm) name address;
      user = cfg.vms.${vm.name}.user;
      known_hosts = "${stateDir}/${vm.name}/ssh/known_hosts";
    }) vmList;
  };
in
{
  options.services.agent-microvm = {
    enable = lib.mkEnableOption "agent VMs declared on this host (`microvm@NAME`, see vms)";

    bridge = {
      name = lib.mkOption {
        type = lib.types.strMatching "[a-zA-Z0-9_-]{1,15}";
        default = "microbr";
        description = "The bridge the VMs' taps join.";
      };
      address = lib.mkOption {
        type = lib.types.str;
        default = "10.77.0.1";
        description = "This host's address on the bridge: the VMs' gateway and egress proxy.";
      };
      prefixLength = lib.mkOption {
        type = lib.types.ints.between 16 30;
        default = 24;
        description = "The bridge subnet's prefix length.";
      };
      externalInterface = lib.mkOption {
        type = lib.types.nullOr lib.types.str;
        default = null;
        example = "enp3s0";
        description = "The uplink `open` VMs are NATed out of (null: open VMs reach nothing).";
      };
    };

    proxyPortBase = lib.mkOption {
      type = lib.types.port;
      default = 40000;
      description = "A VM's egress proxy listens on the bridge address at this port plus the VM's host number.";
    };

    vms = lib.mkOption {
      type = lib.types.attrsOf (
        lib.types.submodule vmOptions
      );
      default = { };
      description = "The agent VMs, by name (lowercase, at most 12 characters).";
    };

    package = lib.mkOption {
      type = lib.types.package;
      description = "The microvm-run package (its microvm-run-egress is the egress proxy).";
    };

    guestModules = lib.mkOption {
      type = lib.types.listOf lib.types.deferredModule;
      internal = true;
      description = "The guest's base modules (microvm.nix's guest module and ours); the flake sets them.";
    };

    flavorModules = lib.mkOption {
      type = lib.types.attrsOf lib.types.deferredModule;
      internal = true;
      default = { };
      description = "Agent modules by flavor name; the flake sets them.";
    };

    evalGuest = lib.mkOption {
      type = lib.types.functionTo lib.types.raw;
      internal = true;
      default =
        modules:
        import (pkgs.path + "/nixos/lib/eval-config.nix") {
          system = null;
          modules = modules ++ [ { nixpkgs.hostPlatform = lib.mkDefault pkgs.stdenv.hostPlatform.system; } ];
        };
      defaultText = lib.literalMD "nixpkgs' `nixos/lib/eval-config.nix` with this host's platform";
      description = "Evaluates a VM's modules (the tests put a stand-in here).";
    };

    registry = lib.mkOption {
      type = lib.types.raw;
      readOnly = true;
      internal = true;
      default = registry;
      description = "What /etc/agent-microvm/vms.json holds.";
    };

    nftTables = lib.mkOption {
      type = lib.types.raw;
      readOnly = true;
      internal = true;
      default = hostnet.nftTables {
        bridge = cfg.bridge;
        vms = vmList;
      };
      description = "The nftables tables, for tests.";
    };

    prepareScripts = lib.mkOption {
      type = lib.types.raw;
      readOnly = true;
      internal = true;
      default = lib.mapAttrs (_: prepareState) resolved;
      description = "Each VM's state preparation (run as root before microvm@NAME), for tests.";
    };

    egressConfigs = lib.mkOption {
      type = lib.types.raw;
      readOnly = true;
      internal = true;
      default = lib.mapAttrs (_: egressConfig) (lib.filterAttrs (_: vm: vm.mode != "none") resolved);
      description = "Each proxied VM's egress proxy configuration, for tests.";
    };
  };

  config = lib.mkIf cfg.enable {
    assertions =
      map (message: {
        assertion = false;
        inherit message;
      }) clashes
      ++ lib.concatMap (vm: [
        {
          # A name is a host name, a unit instance and (with vm-) a tap.
          assertion = builtins.match "[a-z][a-z0-9-]{0,11}" vm.name != null;
          message = "services.agent-microvm: VM name ${vm.name} must be lowercase letters, digits and -, at most 12 characters, starting with a letter";
        }
        {
          assertion = vm.index != null && vm.index > 0 && vm.index < net.size - 1;
          message = "services.agent-microvm: VM ${vm.name}'s address ${vm.address} is not a host address of ${cfg.bridge.address}/${toString cfg.bridge.prefixLength}";
        }
        {
          assertion = vm.address != cfg.bridge.address;
          message = "services.agent-microvm: VM ${vm.name} has the bridge's own address ${vm.address}; set vms.${vm.name}.address";
        }
        {
          assertion = vm.proxyPort < 65536;
          message = "services.agent-microvm: VM ${vm.name}'s proxy port ${toString vm.proxyPort} is over 65535; lower proxyPortBase";
        }
        {
          assertion = lib.all (f: !lib.hasPrefix builtins.storeDir f) (lib.attrValues cfg.vms.${vm.name}.apiKeyFiles);
          message = "services.agent-microvm: VM ${vm.name}'s apiKeyFiles are in the Nix store (world-readable); use agenix/sops paths";
        }
      ]) vmList;

    microvm.vms = lib.mapAttrs (name: vm: {
      inherit (vm) autostart;
      # Declared here: a rebuild that changes the VM restarts it.
      restartIfChanged = true;
      evaluatedConfig = cfg.evalGuest [ (guestModule name vm) ];
    }) cfg.vms;

    # The bridge, with systemd-networkd (for these links only: the rest of
    # the host's network stays as it is); taps named vm-* join it.
    systemd.network = {
      enable = true;
      netdevs."20-${cfg.bridge.name}".netdevConfig = {
        Kind = "bridge";
        Name = cfg.bridge.name;
      };
      networks."20-${cfg.bridge.name}" = {
        matchConfig.Name = cfg.bridge.name;
        address = [ "${cfg.bridge.address}/${toString cfg.bridge.prefixLength}" ];
        networkConfig.ConfigureWithoutCarrier = true;
        linkConfig.RequiredForOnline = "no";
      };
      networks."21-agent-microvm-taps" = {
        matchConfig.Name = "vm-*";
        networkConfig.Bridge = cfg.bridge.name;
        linkConfig.RequiredForOnline = "no";
      };
    };
    boot.kernel.sysctl."net.ipv4.conf.all.forwarding" = lib.mkIf (cfg.bridge.externalInterface != null) 1;

    # Our tables filter the bridge; NixOS' firewall leaves it to them.
    networking.nftables.enable = true;
    networking.nftables.tables = cfg.nftTables;
    networking.firewall.trustedInterfaces = [ cfg.bridge.name ];

    environment.etc."agent-microvm/vms.json".text = builtins.toJSON registry;

    # microvm.nix's tmpfiles rule makes a share's missing source directory
    # its `microvm` user's, group kvm, mode 0775: the user every VM's QEMU
    # runs as would own the user's new workspace, where the agent (the
    # user's uid) could not write. A workspace made here is the VM user's.
    systemd.tmpfiles.settings."10-microvm" = lib.mapAttrs' (
      name: vm:
      let
        uid = toString vm.guestConfig.agentVM.persistent.uid;
      in
      lib.nameValuePair cfg.vms.${name}.workspace {
        d = {
          user = lib.mkForce ":${uid}";
          group = lib.mkForce ":${uid}";
          mode = lib.mkForce ":0700";
        };
      }
    ) resolved;

    systemd.services = lib.mkMerge (
      map (vm: {
        "microvm@${vm.name}" = {
          serviceConfig = {
            ExecStartPre = [ "+${prepareState vm}" ];
            LoadCredential = lib.mapAttrsToList (var: file: "${var}:${file}") vm.guestKeys;
          };
        };
      }) vmList
      ++ map (vm: {
        # One proxy per VM, the runner's own code; microvm@NAME needs it
        # (its traffic has no other way out), and nothing listens when it
        # is down: the redirected connections are refused.
        "agent-microvm-egress-${vm.name}" = {
          description = "Egress proxy of agent VM ${vm.name}";
          wantedBy = [ "microvm@${vm.name}.service" ];
          before = [ "microvm@${vm.name}.service" ];
          after = [
            "network.target"
            "systemd-networkd.service"
          ];
          serviceConfig = {
            ExecStart = "${cfg.package}/bin/microvm-run-egress ${egressConfigFile vm}";
            LoadCredential = lib.mapAttrsToList (var: file: "${var}:${file}") vm.proxyKeys;
            Restart = "always";
            RestartSec = "2s";
            DynamicUser = true;
            # One directory per VM: each proxy has a dynamic user of its own.
            LogsDirectory = "agent-microvm/${vm.name}";
            LogsDirectoryMode = "0750";
            CapabilityBoundingSet = [ "" ];
            AmbientCapabilities = [ "" ];
            NoNewPrivileges = true;
            ProtectSystem = "strict";
            ProtectHome = true;
            PrivateTmp = true;
            PrivateDevices = true;
            ProtectKernelTunables = true;
            ProtectKernelModules = true;
            ProtectKernelLogs = true;
            ProtectControlGroups = true;
            ProtectClock = true;
            ProtectHostname = true;
            ProtectProc = "invisible";
            ProcSubset = "pid";
            # AF_NETLINK: glibc's getaddrinfo asks the kernel for the
            # host's address families.
            RestrictAddressFamilies = [
              "AF_INET"
              "AF_INET6"
              "AF_UNIX"
              "AF_NETLINK"
            ];
            RestrictNamespaces = true;
            RestrictRealtime = true;
            RestrictSUIDSGID = true;
            LockPersonality = true;
            MemoryDenyWriteExecute = true;
            SystemCallArchitectures = "native";
            SystemCallFilter = [
              "@system-service"
              "~@privileged @resources"
            ];
            UMask = "0077";
          };
        };
      }) (builtins.filter (vm: vm.mode != "none") vmList)
    );
  };
}
