# The persistent variant of the guest, for VMs declared on a NixOS host
# (modules/host.nix makes one per `services.agent-microvm.vms.<name>`): a
# long-lived `microvm@NAME` with a tap on the host's bridge, sshd with host
# keys the host generated into the VM's state directory, the host user's
# authorized keys, and the agent in a tmux session (`agent-microvm-attach`)
# instead of on the console. The agent exiting powers nothing off.
#
# Uses the flavor's agentVM.agent.* and agentVM.network.* (with
# agentVM.enable false: none of the throw-away guest's runner contract).
{
  config,
  options,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.agentVM.persistent;
  agent = config.agentVM.agent;
  guest = import ../lib/guest.nix;
  contract = import ../lib/contract.nix;
  user = guest.user.name;
  inherit (guest.user) home;
  inherit (contract) workDir;
  withAgent = cfg.flavor != null;
  keyDir = "/etc/ssh/agent-microvm";

  # The session's environment: keys from systemd credentials (only those
  # the host did not keep for its key proxy), placeholders and base URLs
  # for those it keeps, then the agent (or a shell) in /work.
  sessionScript = pkgs.writeShellScript "agent-microvm-session" ''
    . /etc/profile
    cd ${workDir} || exit ${toString contract.guestFailureStatus}
    ${lib.concatMapStrings (var: ''
      if [ -r /run/agent-microvm/credentials/${var} ]; then
        export ${var}="$(cat /run/agent-microvm/credentials/${var})"
      fi
    '') cfg.guestKeyVars}
    ${lib.concatStrings (
      lib.mapAttrsToList (var: value: ''
        export ${var}=${lib.escapeShellArg value}
      '') cfg.environment
    )}
    ${lib.optionalString (withAgent && agent.configDir != null) ''
      mkdir -p "$HOME/${agent.configDir}"
    ''}
    ${
      if withAgent then
        ''
          ${lib.escapeShellArgs agent.command}
          echo "agent-microvm: the agent exited ($?); this shell stays (exit closes the window, the VM stays up)"
        ''
      else
        ""
    }
    exec ${pkgs.bashInteractive}/bin/bash -l
  '';

  # microvm.nix's microvm-virtiofsd@NAME runs virtiofsd as root on the host,
  # with no ID mapping: what guest root did in a writable share, host root
  # did (set-uid root programs, device nodes, file capabilities, root-owned
  # files in the user's workspace). So every guest uid and gid becomes the
  # agent's (the host user's) on the host, and virtiofsd keeps neither
  # CAP_MKNOD nor CAP_SETFCAP. microvm.nix refuses --translate-* with
  # posixAcl (`--posix-acl --xattr`), which these shares therefore go without.
  # Every guest id (0 up to 2^32 - 2) to one host id: the agent's uid, which
  # is also its group's gid.
  squashed = "squash-guest:0:${toString cfg.uid}:4294967295";
  writableShare = {
    posixAcl = false;
    extraArgs = [
      "--translate-uid=${squashed}"
      "--translate-gid=${squashed}"
      "--modcaps=-mknod:-setfcap"
    ];
  };

  tmux = "${pkgs.tmux}/bin/tmux -L agent-microvm";
  # What `microvm-run attach NAME` runs over SSH: the session, started when
  # it is not running (the agent exited and its shell was closed).
  attachScript = pkgs.writeShellScriptBin contract.attachCommand ''
    ${tmux} has-session -t agent 2>/dev/null ||
      ${tmux} new-session -d -s agent -c ${workDir} ${sessionScript}
    exec ${tmux} attach-session -t agent
  '';
in
{
  options.agentVM.persistent = {
    enable = lib.mkEnableOption "the persistent guest of a VM declared with services.agent-microvm (set by the host module)";
    name = lib.mkOption {
      type = lib.types.strMatching "[a-z][a-z0-9-]{0,11}";
      description = "The VM's name (`microvm@NAME`).";
    };
    flavor = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      description = "The agent flavor (its module sets agentVM.agent), or null for none.";
    };
    address = lib.mkOption {
      type = lib.types.str;
      description = "The VM's IPv4 address on the host's bridge.";
    };
    prefixLength = lib.mkOption {
      type = lib.types.ints.between 8 30;
      description = "The bridge subnet's prefix length.";
    };
    gateway = lib.mkOption {
      type = lib.types.str;
      description = "The bridge's address on the host: the gateway and the egress proxy.";
    };
    mac = lib.mkOption {
      type = lib.types.strMatching "([0-9a-f]{2}:){5}[0-9a-f]{2}";
      description = "The MAC address of the VM's interface.";
    };
    tap = lib.mkOption {
      type = lib.types.strMatching "[a-zA-Z0-9-]{1,15}";
      description = "The host's tap interface of the VM.";
    };
    nameservers = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      description = "The VM's resolvers (the gateway, over TCP, when its traffic goes through the egress proxy).";
    };
    useVc = lib.mkOption {
      type = lib.types.bool;
      description = "Resolve over TCP (the egress proxy answers DNS over TCP only).";
    };
    environment = lib.mkOption {
      type = lib.types.attrsOf lib.types.str;
      default = { };
      description = "Variables of the agent's session (proxy, placeholder keys, base URLs).";
    };
    guestKeyVars = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ ];
      description = "API key variables handed to the guest itself as systemd credentials (those without a key proxy route).";
    };
    workspace = lib.mkOption {
      type = lib.types.str;
      description = "The host directory shared at /work.";
    };
    stateDir = lib.mkOption {
      type = lib.types.str;
      description = "The VM's state directory on the host (home and SSH host keys).";
    };
    uid = lib.mkOption {
      type = lib.types.ints.between 1000 60000;
      default = guest.user.uid;
      description = "The agent user's uid (the host user's, so files in /work keep their owner).";
    };
    authorizedKeys = lib.mkOption {
      type = lib.types.listOf lib.types.singleLineStr;
      default = [ ];
      description = "SSH public keys that may log in as the agent user.";
    };
  };

  config = lib.mkIf cfg.enable {
    assertions = [
      {
        assertion = !config.agentVM.enable;
        message = "agent-microvm: agentVM.persistent and agentVM.enable (the throw-away guest) exclude each other";
      }
    ];

    microvm = {
      guest.enable = true;
      hypervisor = "qemu";
      mem = lib.mkDefault config.agentVM.resources.memoryMiB;
      vcpu = lib.mkDefault config.agentVM.resources.vcpus;
      interfaces = [
        {
          type = "tap";
          id = cfg.tap;
          inherit (cfg) mac;
        }
      ];
      shares = [
        {
          proto = "virtiofs";
          tag = "ro-store";
          source = "/nix/store";
          mountPoint = "/nix/.ro-store";
          readOnly = true;
        }
        (
          writableShare
          // {
            proto = "virtiofs";
            tag = "work";
            source = cfg.workspace;
            mountPoint = workDir;
          }
        )
        (
          writableShare
          // {
            proto = "virtiofs";
            tag = "home";
            source = "${cfg.stateDir}/home";
            mountPoint = home;
          }
        )
        {
          proto = "virtiofs";
          tag = "ssh-host-keys";
          source = "${cfg.stateDir}/ssh";
          mountPoint = keyDir;
          readOnly = true;
        }
      ];
      writableStoreOverlay = "/nix/.rw-store";
      # Keys the guest itself gets: files systemd loaded for microvm@NAME on
      # the host (host.nix), passed as credentials over fw_cfg.
      credentialFiles = lib.genAttrs cfg.guestKeyVars (
        var: "/run/credentials/microvm@${cfg.name}.service/${var}"
      );
    };
    fileSystems."/nix/.ro-store".options = [ "ro" ];

    networking.hostName = lib.mkDefault cfg.name;
    networking.useDHCP = false;
    networking.useNetworkd = true;
    systemd.network.enable = true;
    systemd.network.networks."10-bridge" = {
      matchConfig.MACAddress = cfg.mac;
      address = [ "${cfg.address}/${toString cfg.prefixLength}" ];
      gateway = [ cfg.gateway ];
      networkConfig.DHCP = "no";
      linkConfig.RequiredForOnline = "routable";
    };
    services.resolved.enable = false;
    networking.resolvconf.enable = false;
    environment.etc."resolv.conf".text =
      lib.concatMapStrings (ns: "nameserver ${ns}\n") cfg.nameservers
      + lib.optionalString cfg.useVc "options use-vc\n";

    # SSH with the host keys the host generated into the VM's state
    # directory on its first start (kept across rebuilds): the host knows
    # them, so `microvm-run attach` checks them strictly.
    services.openssh = {
      enable = true;
      hostKeys = [
        {
          path = "${keyDir}/ssh_host_ed25519_key";
          type = "ed25519";
        }
      ];
      settings = {
        PasswordAuthentication = false;
        KbdInteractiveAuthentication = false;
        PermitRootLogin = "no";
      };
    };

    users.groups.${user}.gid = cfg.uid;
    users.users.${user} = {
      isNormalUser = true;
      inherit (cfg) uid;
      inherit home;
      group = user;
      createHome = false;
      shell = pkgs.bashInteractive;
      hashedPassword = "!";
      openssh.authorizedKeys.keys = cfg.authorizedKeys;
    };
    security.sudo.enable = lib.mkDefault false;

    programs.git = {
      enable = true;
      config.safe.directory = [ workDir ];
    };

    environment.systemPackages =
      lib.optional (withAgent && agent.package != null) agent.package
      ++ [
        attachScript
        pkgs.tmux
        pkgs.git
        pkgs.cacert
        pkgs.curl
      ];

    nixpkgs.config =
      lib.mkIf (withAgent && agent.unfreePackages != [ ] && !options.nixpkgs.pkgs.isDefined)
        {
          allowUnfreePackages = agent.unfreePackages;
        };

    # The agent's session, started at boot in tmux (not on the console):
    # `agent-microvm-attach` joins it; the agent exiting leaves a shell and
    # the VM up.
    systemd.services.agent-microvm-session = {
      description = "The agent's tmux session";
      wantedBy = [ "multi-user.target" ];
      after = [
        "network-online.target"
        "local-fs.target"
      ];
      wants = [ "network-online.target" ];
      unitConfig.RequiresMountsFor = [
        workDir
        home
      ];
      serviceConfig = {
        Type = "forking";
        User = user;
        Group = user;
        ExecStartPre = lib.mkIf (cfg.guestKeyVars != [ ]) "+${pkgs.writeShellScript "agent-microvm-credentials" ''
          PATH=${lib.makeBinPath [ pkgs.coreutils ]}
          install -d -m 0700 -o ${user} -g ${user} /run/agent-microvm/credentials
          for var in ${lib.escapeShellArgs cfg.guestKeyVars}; do
            if [ -r "$CREDENTIALS_DIRECTORY/$var" ]; then
              install -m 0400 -o ${user} -g ${user} "$CREDENTIALS_DIRECTORY/$var" /run/agent-microvm/credentials/
            fi
          done
        ''}";
        ExecStart = "${tmux} new-session -d -s agent -c ${workDir} ${sessionScript}";
        ExecStop = "${tmux} kill-server";
        ImportCredential = cfg.guestKeyVars;
        Restart = "no";
      };
      environment = {
        HOME = home;
        USER = user;
        LOGNAME = user;
        SHELL = "${pkgs.bashInteractive}/bin/bash";
      };
    };

    nix.settings.experimental-features = [
      "nix-command"
      "flakes"
    ];
    nix.optimise.automatic = false;
    nix.gc.automatic = false;
    documentation.enable = lib.mkDefault false;
    system.stateVersion = lib.mkDefault "26.05";
  };
}
