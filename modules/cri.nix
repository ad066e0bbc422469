# Container runtimes in the guest: all installed, none started at boot. The
# launch fragment's ENABLE_CRI (comma- or space-separated names, see
# `runtimes` below) says which to start before the agent runs. Their storage
# lives on the cri-storage share (under the agent home on the host), mounted
# at /var/lib/containers; the agent reaches every socket through group
# membership, never sudo.
#
# Those groups are root in the guest: whoever talks to a rootful daemon can
# mount / into a privileged container. That is the point of the throw-away
# VM (the guest's root reaches no more of the host than the agent does: the
# shares), not a boundary inside it.
#
# No nerdctl: it goes rootless for every non-root user (it needs
# rootlesskit and a user containerd), so it could not reach these daemons.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.agentVM.cri;
  toml = import ../lib/toml.nix;
  contract = import ../lib/contract.nix;
  storage = (builtins.head (import ../lib/guest.nix).criShares).mountPoint;
  runDir = "/run/agent-microvm";

  # name in ENABLE_CRI -> units to start and what the agent's tools need.
  runtimes = {
    docker = {
      units = [
        "docker.socket"
        "docker.service"
      ];
      env = { };
    };
    podman = {
      units = [ "podman.socket" ];
      # podman talks to the rootful service instead of running rootless.
      env.CONTAINER_HOST = "unix:///run/podman/podman.sock";
    };
    # crictl reads CONTAINER_RUNTIME_ENDPOINT before /etc/crictl.yaml, which
    # the cri-o module writes with cri-o's socket.
    containerd = {
      units = [ "containerd.service" ];
      env.CONTAINERD_ADDRESS = "/run/containerd/containerd.sock";
      env.CONTAINER_RUNTIME_ENDPOINT = "unix:///run/containerd/containerd.sock";
    };
    crun = {
      # A containerd of its own whose CRI runtime is crun (crictl); `ctr`
      # containers there use runc, containerd's built-in default.
      units = [ "containerd-crun.service" ];
      env.CONTAINERD_ADDRESS = "/run/containerd-crun/containerd.sock";
      env.CONTAINER_RUNTIME_ENDPOINT = "unix:///run/containerd-crun/containerd.sock";
    };
    cri-o = {
      units = [ "crio.service" ];
      env.CONTAINER_RUNTIME_ENDPOINT = "unix:///run/crio/crio.sock";
    };
  };
  # The names are the contract's (the runner reads them from the spec): each
  # needs an entry above, and an entry without a name would never start.
  names =
    if contract.criRuntimes == builtins.attrNames runtimes then
      contract.criRuntimes
    else
      throw "modules/cri.nix: runtimes must have one entry per lib/contract.nix criRuntimes name";

  # Hand a root-owned socket to a group once the daemon is up.
  shareSocket = group: socket: "+${pkgs.writeShellScript "share-socket-${group}" ''
    for _ in $(${pkgs.coreutils}/bin/seq 100); do
      [ -S ${socket} ] && break
      ${pkgs.coreutils}/bin/sleep 0.05
    done
    ${pkgs.coreutils}/bin/chgrp ${group} ${socket}
    ${pkgs.coreutils}/bin/chmod 0660 ${socket}
  ''}";

  containerdCrunConfig = pkgs.writeText "containerd-crun.toml" (
    toml.render {
      version = 3;
      root = "${storage}/containerd-crun";
      state = "/run/containerd-crun";
      grpc.address = "/run/containerd-crun/containerd.sock";
      plugins."io.containerd.cri.v1.runtime" = {
        containerd = {
          default_runtime_name = "crun";
          runtimes.crun = {
            runtime_type = "io.containerd.runc.v2";
            options.BinaryName = "${pkgs.crun}/bin/crun";
          };
        };
        cni = {
          bin_dirs = [ "${pkgs.cni-plugins}/bin" ];
          conf_dir = "/etc/cni/net.d";
        };
      };
    }
  );

  # One bridge network for the CNI users (containerd's CRI plugin, cri-o).
  cniBridge = builtins.toJSON {
    cniVersion = "1.0.0";
    name = "agent-bridge";
    plugins = [
      {
        type = "bridge";
        bridge = "cni0";
        isGateway = true;
        ipMasq = true;
        hairpinMode = true;
        ipam = {
          type = "host-local";
          routes = [ { dst = "0.0.0.0/0"; } ];
          ranges = [
            [
              {
                subnet = "10.85.0.0/16";
                gateway = "10.85.0.1";
              }
            ]
          ];
        };
      }
      {
        type = "portmap";
        capabilities.portMappings = true;
      }
    ];
  };

  caseArm =
    name: rt:
    lib.concatMapStrings (line: "    ${line}\n") (
      [
        "${name})"
        "  systemctl start ${lib.escapeShellArgs rt.units} || {"
        "    echo \"agent-microvm: could not start ${name} (see: systemctl status ${toString rt.units})\" >&2"
        "    exit 1"
        "  }"
      ]
      ++ lib.mapAttrsToList (
        k: v: "  echo ${lib.escapeShellArg "export ${k}=${lib.escapeShellArg v}"} >> ${runDir}/cri.env"
      ) rt.env
      ++ [ "  ;;" ]
    );

  # The runner checks the names on the host before boot; this is the guest's
  # own check, for VMs started some other way.
  readEnableCri = ''
    enable_cri=$(. ${runDir}/launch >/dev/null 2>&1; printf '%s' "''${${contract.launchVars.enableCri}:-}")
  '';
in
{
  options.agentVM.cri = {
    enable = lib.mkEnableOption ''
      container runtimes in the guest (${lib.concatStringsSep ", " names}),
      started at run time by ENABLE_CRI, with storage on the cri-storage
      share; raises the default memory to 8 GiB
    '';
    runtimes = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      readOnly = true;
      default = names;
      description = "Names ENABLE_CRI accepts.";
    };
  };

  config = lib.mkMerge [
    (lib.mkIf (config.agentVM.enable && !cfg.enable) {
      agentVM.launch.rootPreStart = ''
        ${readEnableCri}
        if [ -n "$enable_cri" ]; then
          echo "agent-microvm: ENABLE_CRI=$enable_cri, but this flavor has no container runtimes (build it with agentVM.cri.enable)" >&2
          exit 1
        fi
      '';
    })
    (lib.mkIf (config.agentVM.enable && cfg.enable) {
      agentVM.shares = lib.mkAfter (import ../lib/guest.nix).criShares;

      agentVM.launch.rootPreStart = ''
        ${readEnableCri}
        : > ${runDir}/cri.env
        chmod 0644 ${runDir}/cri.env
        for name in $(printf '%s' "$enable_cri" | tr ',' ' '); do
          case "$name" in
          ${lib.concatStrings (lib.mapAttrsToList caseArm runtimes)}  *)
            echo "agent-microvm: unknown container runtime '$name' in ENABLE_CRI (known: ${lib.concatStringsSep ", " names})" >&2
            exit 1
            ;;
          esac
        done
      '';
      agentVM.launch.agentPreStart = ''
        if [ -r ${runDir}/cri.env ]; then . ${runDir}/cri.env; fi
      '';

      virtualisation.containers.enable = true;
      virtualisation.containers.storage.settings.storage = {
        driver = "overlay";
        graphroot = "${storage}/storage";
        runroot = "/run/containers/storage";
      };

      virtualisation.docker = {
        enable = true;
        enableOnBoot = false;
        daemon.settings = {
          data-root = "${storage}/docker";
          # Named, so that docker fails to start when overlayfs on the share
          # does not work, instead of silently falling back to vfs (a full
          # copy per layer).
          storage-driver = "overlay2";
        };
      };
      virtualisation.podman = {
        enable = true;
        dockerCompat = false; # docker is the real one here
      };
      virtualisation.containerd = {
        enable = true;
        settings.root = "${storage}/containerd";
      };
      virtualisation.cri-o.enable = true;

      # Installed, not started: ENABLE_CRI decides (sockets included, so
      # nothing starts by socket activation either).
      systemd.sockets.docker.wantedBy = lib.mkForce [ ];
      systemd.sockets.podman.wantedBy = lib.mkForce [ ];
      systemd.services.docker.wantedBy = lib.mkForce [ ];
      systemd.services.containerd.wantedBy = lib.mkForce [ ];
      systemd.services.crio.wantedBy = lib.mkForce [ ];

      systemd.sockets.podman.socketConfig = {
        SocketGroup = "podman";
        SocketMode = "0660";
      };
      systemd.services.containerd.serviceConfig.ExecStartPost = [
        (shareSocket "containerd" "/run/containerd/containerd.sock")
      ];
      systemd.services.crio.serviceConfig.ExecStartPost = [
        (shareSocket "crio" "/run/crio/crio.sock")
      ];
      systemd.services.containerd-crun = {
        description = "containerd with crun as its runtime";
        after = [ "network.target" ];
        path = [
          pkgs.containerd
          pkgs.crun
          # io.containerd.runc.v2 runs `runc` from PATH for `ctr` containers.
          pkgs.runc
          pkgs.iptables
        ];
        serviceConfig = {
          Type = "notify";
          ExecStart = "${pkgs.containerd}/bin/containerd --config ${containerdCrunConfig}";
          ExecStartPost = [ (shareSocket "containerd" "/run/containerd-crun/containerd.sock") ];
          Delegate = "yes";
          KillMode = "process";
          LimitNOFILE = 1048576;
        };
      };

      environment.etc."cni/net.d/10-agent-bridge.conflist".text = cniBridge;
      environment.systemPackages = [
        pkgs.docker-compose
        pkgs.cri-tools
        pkgs.crun
        pkgs.cni-plugins
      ];

      users.groups.containerd = { };
      users.groups.crio = { };
      users.groups.podman = { };
      users.users.agent.extraGroups = [
        "docker"
        "podman"
        "containerd"
        "crio"
      ];

      boot.kernelModules = [
        "overlay"
        "br_netfilter"
      ];
      boot.kernel.sysctl = {
        "net.ipv4.ip_forward" = 1;
        "net.bridge.bridge-nf-call-iptables" = 1;
      };
    })
  ];
}
