# The guest every flavor shares: a microvm.nix guest on QEMU that boots
# straight into the agent in /work and powers off when the agent exits.
#
# It implements the guest contract (runner/src/microvm_run/contract.py):
# the launch fragment and the API key credentials come in over fw_cfg, the
# status lines `ready` / `exit N` go out on the virtio-serial port
# org.agent-microvm.status, and the command runs in /work as uid 1000.
#
# Needs microvm.nix's guest module (the flake's nixosModules.base adds it).
{
  config,
  options,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.agentVM;
  spec = import ../lib/spec.nix;
  toml = import ../lib/toml.nix;
  guest = import ../lib/guest.nix;
  contract = import ../lib/contract.nix;
  net = contract.network;

  user = guest.user.name;
  inherit (guest.user) uid home;

  launchFwCfg = "/sys/firmware/qemu_fw_cfg/by_name/${contract.fwCfg.launch}/raw";
  statusPort = "/dev/virtio-ports/${contract.statusPort}";
  # systemd's device units for the console and the status port (udev tags
  # hvc* and vport* for systemd; names as `systemd-escape --path` gives).
  consoleDevice = "dev-hvc0.device";
  statusDevice = "dev-virtio\\x2dports-${
    lib.replaceStrings [ "-" ] [ "\\x2d" ] contract.statusPort
  }.device";
  # How long the agent waits for networkd to configure the uplink.
  uplinkTimeoutSec = 60;
  runDir = "/run/agent-microvm";

  # Runs as the agent user: the agent's environment, then the command.
  sessionText = ''
    # The environment of a login shell (PATH, environment.variables), without
    # an interactive shell: nothing here runs twice in nested shells.
    . /etc/profile
    cd ${contract.workDir} || {
      echo "agent-microvm: ${contract.workDir} is not available" >&2
      exit ${toString contract.guestFailureStatus}
    }
    # The runner's launch data (values quoted by the runner): exports the
    # agent's environment and ends with `set -- COMMAND ARGS...`.
    . ${runDir}/launch
    # The host terminal's size at launch ("ROWS COLS"); resizes come later
    # over the status port.
    if [ -n "''${MICROVM_TTY_SIZE:-}" ]; then
      stty rows "''${MICROVM_TTY_SIZE% *}" cols "''${MICROVM_TTY_SIZE#* }" 2>/dev/null || true
    fi
    ${lib.optionalString (cfg.agent.configDir != null) ''
      mkdir -p "$HOME/${cfg.agent.configDir}"
    ''}
    ${cfg.launch.agentPreStart}
    exec "$@"
  '';
  session = pkgs.writeShellScript "agent-microvm-session" sessionText;

  # Runs as root on hvc0: fetch launch data and secrets, report, run the
  # session as the agent, report its exit status. The unit's SuccessAction /
  # FailureAction power the VM off afterwards, whatever happened here.
  launcherText = ''
    set -u
    PATH=${
      lib.makeBinPath [
        pkgs.coreutils
        pkgs.util-linux
      ]
    }:$PATH

    # The unit starts only once systemd has the status port's device (it
    # requires and is ordered after it), so a port that will not open is an
    # error, not a skip. It is opened once, on fd 3, for both directions: a
    # virtio port opens only once.
    if ! exec 3<>${statusPort}; then
      echo "agent-microvm: cannot open the status port ${statusPort}" >&2
      exit 1 # no status line: the runner reports a guest failure
    fi
    # From the host: `size ROWS COLS`, so the agent's terminal follows the
    # host's (TIOCSWINSZ sends the agent SIGWINCH); `denied TEXT`, a refusal
    # of the egress proxy, appended to ${runDir}/denied for the agent to read
    # (only root writes it).
    mkdir -p ${runDir}
    install -m 0644 /dev/null ${runDir}/denied
    (
      while read -r word rest; do
        case "$word" in
          size)
            read -r rows cols _ <<<"$rest"
            case "$rows $cols" in
              [0-9]*" "[0-9]*) stty -F /dev/hvc0 rows "$rows" cols "$cols" 2>/dev/null ;;
            esac
            ;;
          denied) printf '%s\n' "$rest" >>${runDir}/denied ;;
        esac
      done <&3
    ) &

    report() {
      printf '%s\n' "$1" >&3 ||
        echo "agent-microvm: could not write '$1' to the status port" >&2
    }

    if [ ! -r ${launchFwCfg} ]; then
      echo "agent-microvm: no launch data (fw_cfg ${contract.fwCfg.launch});" \
        "start this VM with microvm-run" >&2
      exit 1 # no status line: the runner reports a guest failure
    fi
    install -m 0640 -o root -g ${user} ${launchFwCfg} ${runDir}/launch

    # The uplink is static but comes up asynchronously: the agent starts
    # once networkd has configured it, unless the runner gave no network
    # device at all (MICROVM_NET=none).
    net=$(. ${runDir}/launch >/dev/null 2>&1; printf '%s' "''${MICROVM_NET:-}")
    if [ "$net" != none ]; then
      if ! ${config.systemd.package}/lib/systemd/systemd-networkd-wait-online \
        --any --operational-state=routable --timeout=${toString uplinkTimeoutSec} >/dev/null; then
        echo "agent-microvm: the network (MICROVM_NET=$net) was not configured within ${toString uplinkTimeoutSec} s" >&2
        exit 1 # no status line: the runner reports a guest failure
      fi
    fi

    # "The agent needs you": the agent writes a line to the FIFO ${runDir}/notify
    # (agent-microvm-notify does; the claude flavor's hooks call it), and
    # it goes to the host as `notify TEXT`. Held open read-write here, so a
    # writer never blocks and the reader never sees end of file.
    mkfifo -m 0620 ${runDir}/notify
    chown root:${user} ${runDir}/notify
    exec 4<>${runDir}/notify
    (
      while read -r line <&4; do
        report "notify $(printf '%s' "$line" | tr -cd '\040-\176' | cut -c1-200)"
      done
    ) &
    # Local directories (contract.py "Local directories"): build trees of
    # /work on the guest's own disk, formatted here the first time.
    local_dirs=$(. ${runDir}/launch >/dev/null 2>&1; printf '%s' "''${MICROVM_LOCAL_DIRS:-}")
    if [ -n "$local_dirs" ]; then
      if ! ${localDirsSetup} "$local_dirs"; then
        exit 1 # no status line: the runner reports a guest failure
      fi
    fi

    ${cfg.launch.rootPreStart}

    # API keys: systemd imported them as credentials; they reach the agent as
    # environment variables only, never as files in a share.
    for var in ${lib.escapeShellArgs cfg.agent.apiKeyVars}; do
      if [ -r "''${CREDENTIALS_DIRECTORY:-/nonexistent}/$var" ]; then
        export "$var=$(cat "$CREDENTIALS_DIRECTORY/$var")"
      fi
    done

    # Ctrl+Z: a TUI that suspends itself (SIGSTOP) would wait for a shell's
    # `fg` that the VM does not have, and the session would freeze. So a
    # stopped agent is resumed (SIGCONT to its process group) within half a
    # second, with one line on its terminal. (SIGTSTP from the terminal
    # stops nothing: the agent's process group is orphaned.)
    resume_stopped() {
      local pid stat
      while [ ! -s ${runDir}/agent.pid ]; do sleep 0.2; done
      read -r pid <${runDir}/agent.pid
      while read -r stat 2>/dev/null <"/proc/$pid/stat"; do
        # shellcheck disable=SC2086 # the fields after "(comm) ": state ppid pgrp ...
        set -- ''${stat##*) }
        case "$1" in
          Z | X) break ;;
          T)
            [ "$3" -gt 1 ] && kill -CONT -- -"$3" 2>/dev/null
            echo "agent-microvm: the agent stopped itself (Ctrl+Z?) and the VM has no shell" \
              "to resume it from: resumed it" >&2
            ;;
        esac
        sleep 0.5
      done
    }

    # Ctrl-C on the console belongs to the agent; a handled (not ignored)
    # signal is reset in the child, so the agent still receives it.
    trap : INT QUIT
    report ready
    resume_stopped &
    (
      read -r self _ </proc/self/stat
      echo "$self" >${runDir}/agent.pid
      # Not the status port (3) nor the notification FIFO (4): the agent
      # speaks to the host only through agent-microvm-notify.
      exec setpriv --reuid=${toString uid} --regid=${toString uid} --init-groups \
        --inh-caps=-all --bounding-set=-all ${session} 3>&- 4>&-
    )
    status=$?
    report "exit $status"
    exit 0
  '';
  launcher = pkgs.writeShellScript "agent-microvm-launcher" launcherText;

  # agent-microvm-notify [MESSAGE]: "the agent needs you", to the host (its
  # first argument only: codex-style callers append a JSON payload).
  notifyCommand = pkgs.writeShellScriptBin "agent-microvm-notify" ''
    printf '%s\n' "''${1:-the agent needs you}" >${runDir}/notify
  '';
  # Root's side of the local directories: find the disk by its serial, make
  # an ext4 on it if it has none, mount it, bind its directories over /work.
  localMount = "/run/microvm-local";
  localDirsSetupText = ''
    set -u
    PATH=${
      lib.makeBinPath [
        pkgs.coreutils
        pkgs.util-linux
        pkgs.e2fsprogs
      ]
    }
    fail() {
      echo "agent-microvm: local directories: $*" >&2
      exit 1
    }
    no_symlink() { # BASE DIR: no component of BASE/DIR is a symlink
      path=$1
      for part in $(printf '%s' "$2" | tr / ' '); do
        path=$path/$part
        [ -L "$path" ] && fail "$1/$2 is or passes through a symlink"
      done
      return 0
    }
    disk=
    for _ in $(seq 250); do
      for blk in /sys/block/*; do
        # read, not $(cat): no process per try (each costs under TCG).
        serial=
        read -r serial 2>/dev/null <"$blk/serial"
        [ "$serial" = agent-microvm-local ] && disk=/dev/''${blk##*/}
      done
      [ -n "$disk" ] && [ -e "$disk" ] && break
      sleep 0.02
    done
    [ -n "$disk" ] || fail "no disk with serial agent-microvm-local"
    if ! blkid -p -n ext2,ext3,ext4 "$disk" >/dev/null 2>&1; then
      # lazy_itable_init: a sparse 16 GiB image stays small and quick to make.
      mkfs.ext4 -q -m 0 -L microvm-local "$disk" || fail "cannot format $disk"
    fi
    mkdir -p ${localMount}
    mount -t ext4 -o noatime "$disk" ${localMount} || fail "cannot mount $disk"
    install -d -o ${toString uid} -g ${toString uid} ${localMount}/dirs ${localMount}/pycache
    # The directory list (and each path in no_symlink) is split on spaces,
    # never globbed; only from here on: the disk search above globs /sys/block.
    set -f
    for dir in $1; do
      case "/$dir/" in
        *[!A-Za-z0-9._/-]* | */../* | */./* | *//* | /.git/*) fail "bad directory '$dir'" ;;
      esac
      # A symlink the agent planted in an earlier run: a bind mount follows it.
      no_symlink /work "$dir"
      no_symlink ${localMount}/dirs "$dir"
      setpriv --reuid=${toString uid} --regid=${toString uid} --init-groups \
        mkdir -p "/work/$dir" "${localMount}/dirs/$dir" || fail "cannot create /work/$dir"
      no_symlink /work "$dir"
      no_symlink ${localMount}/dirs "$dir"
      mount --bind "${localMount}/dirs/$dir" "/work/$dir" || fail "cannot bind /work/$dir"
    done
  '';
  localDirsSetup = pkgs.writeShellScript "agent-microvm-local-dirs" localDirsSetupText;

  registration = pkgs.closureInfo { rootPaths = [ config.system.build.toplevel ]; };
  registerStore = pkgs.writeShellScript "agent-microvm-register-store" ''
    for param in $(cat /proc/cmdline); do
      case "$param" in
        regInfo=*) exec ${config.nix.package.out}/bin/nix-store --load-db < "''${param#regInfo=}" ;;
      esac
    done
  '';

  keyProxyType = lib.types.submodule {
    options = {
      var = lib.mkOption {
        type = lib.types.str;
        example = "ANTHROPIC_API_KEY";
        description = "The API key variable (one of `agentVM.agent.apiKeyVars`).";
      };
      upstream = lib.mkOption {
        type = lib.types.strMatching "https?://.*";
        example = "https://api.anthropic.com";
        description = "Where the key proxy sends the agent's requests, with the real key.";
      };
      header = lib.mkOption {
        type = lib.types.enum spec.keyHeaders;
        description = "How the key is presented upstream (`authorization` means `Bearer KEY`).";
      };
      baseUrlVar = lib.mkOption {
        type = lib.types.strMatching "[A-Za-z_][A-Za-z0-9_]*";
        example = "ANTHROPIC_BASE_URL";
        description = "The guest variable through which the agent is pointed at the key proxy.";
      };
      baseUrlPath = lib.mkOption {
        type = lib.types.str;
        default = "";
        example = "/v1";
        description = "Appended to the proxy URL in `baseUrlVar` (e.g. `/v1` for OpenAI clients).";
      };
      # lib/spec.nix checks the rest (not empty; no TRACE, TRACK, CONNECT;
      # no `.`/`..` segments), as spec.py does.
      methods = lib.mkOption {
        type = lib.types.listOf (lib.types.strMatching "[A-Z]{1,16}");
        default = [
          "GET"
          "POST"
        ];
        description = "All the HTTP methods the key route forwards with the real key.";
      };
      paths = lib.mkOption {
        type = lib.types.listOf (lib.types.strMatching "(/[A-Za-z0-9._~-]+)+/");
        default = [ "/v1/" ];
        example = [ "/v1beta/" ];
        description = "Prefixes of the upstream path the key route forwards; anything else is refused.";
      };
    };
  };

  shareType = lib.types.submodule {
    options = {
      tag = lib.mkOption {
        type = lib.types.strMatching "[A-Za-z0-9_-]{1,32}";
        description = "virtiofs tag of the share.";
      };
      source = lib.mkOption {
        type = lib.types.enum spec.shareSources;
        description = ''
          What the runner shares from the host (spec.py SHARE_SOURCES):
          `work` (the project), `home` (the per-project agent home),
          `nix-store` (the host's /nix/store, read-only) or `cri-storage`
          (container storage under the agent home).
        '';
      };
      mountPoint = lib.mkOption {
        type = lib.types.str;
        description = "Where the guest mounts the share.";
      };
      readOnly = lib.mkOption {
        type = lib.types.bool;
        default = false;
        description = "Whether the runner exports the share read-only.";
      };
    };
  };
in
{
  imports = [
    ./cri.nix
    ./devshell.nix
    ./persistent.nix
  ];

  options.agentVM = {
    enable = lib.mkEnableOption ''
      the agent-microvm guest: this NixOS system becomes a throw-away
      microVM that boots into the agent and powers off when it exits (never
      set it on a host). `mkAgentVM` sets it'';

    agent = {
      name = lib.mkOption {
        type = lib.types.strMatching "[a-z][a-z0-9-]{0,31}";
        example = "claude";
        description = "Name of the agent; names the spec, the host name and the wrapper `<name>-microvm`.";
      };
      package = lib.mkOption {
        type = lib.types.nullOr lib.types.package;
        default = null;
        description = "Package that provides the agent's command; installed in the guest.";
      };
      command = lib.mkOption {
        type = lib.types.nonEmptyListOf lib.types.str;
        example = [
          "claude"
          "--dangerously-skip-permissions"
        ];
        description = "Command and arguments the guest runs in /work as the agent user.";
      };
      apiKeyVars = lib.mkOption {
        type = lib.types.listOf (lib.types.strMatching "[A-Za-z_][A-Za-z0-9_]*");
        default = [ ];
        example = [ "ANTHROPIC_API_KEY" ];
        description = ''
          Host environment variables passed to the agent as secrets (systemd
          credentials over fw_cfg, exported to the agent's process only).
        '';
      };
      configDir = lib.mkOption {
        type = lib.types.nullOr lib.types.str;
        default = null;
        example = ".claude";
        description = ''
          The agent's configuration directory, relative to its home. The home
          is the persistent per-project share, so this survives the VM.
        '';
      };
      unfreePackages = lib.mkOption {
        type = lib.types.listOf lib.types.str;
        default = [ ];
        example = [ "claude-code" ];
        description = ''
          Names (`lib.getName`) of unfree packages the guest may use; they go
          to nixpkgs' `allowUnfreePackages`, so a consumer's own list or
          predicate still applies. Ignored when the consumer sets
          `nixpkgs.pkgs`: allow them in that package set instead.
        '';
      };
    };

    resources = {
      memoryMiB = lib.mkOption {
        type = lib.types.ints.between 64 (1024 * 1024);
        default = (guest.resources { cri = cfg.cri.enable; }).memoryMiB;
        defaultText = lib.literalExpression "if config.agentVM.cri.enable then 8192 else 4096";
        description = "Guest memory in MiB (sets microvm.mem).";
      };
      vcpus = lib.mkOption {
        type = lib.types.ints.between 1 255;
        default = (guest.resources { }).vcpus;
        defaultText = lib.literalExpression "4";
        description = "Number of virtual CPUs (sets microvm.vcpu).";
      };
    };

    network = {
      allow = lib.mkOption {
        type = lib.types.listOf lib.types.str;
        default = [ ];
        example = [
          "api.anthropic.com"
          "*.githubusercontent.com"
          "git.example.com:8443"
        ];
        description = ''
          The flavor's default allowlist for `--net allowlist` (the spec's
          `[network] allow`): host names, `*.suffix`, either with `:port`
          (without a port: 80 and 443). Users extend it at run time with
          `--allow`, `MICROVM_ALLOW` and a per-project file.
        '';
      };
      keyProxy = lib.mkOption {
        type = lib.types.listOf keyProxyType;
        default = [ ];
        description = ''
          How `--inject-keys` serves each API key variable (the spec's
          `[[key_proxy]]`): the guest gets a placeholder key and a base URL
          pointing at the runner's key proxy, which adds the real key.
        '';
      };
    };

    shares = lib.mkOption {
      type = lib.types.listOf shareType;
      description = ''
        The virtiofs shares the runner provides. Each becomes a
        `microvm.shares` entry (guest side) and a `[[shares]]` entry of the
        spec (host side); the modules fill this in.
      '';
    };

    host = {
      qemu = lib.mkOption {
        type = lib.types.str;
        default = "${config.microvm.qemu.package}/bin/qemu-system-${pkgs.stdenv.hostPlatform.qemuArch}";
        defaultText = lib.literalExpression ''"''${config.microvm.qemu.package}/bin/qemu-system-''${qemuArch}"'';
        description = "QEMU binary the runner starts on the host.";
      };
      virtiofsd = lib.mkOption {
        type = lib.types.str;
        default = "${config.microvm.virtiofsd.package}/bin/virtiofsd";
        defaultText = lib.literalExpression ''"''${config.microvm.virtiofsd.package}/bin/virtiofsd"'';
        description = "virtiofsd binary the runner starts on the host, one per share.";
      };
    };

    launch = {
      rootPreStart = lib.mkOption {
        type = lib.types.lines;
        default = "";
        internal = true;
        description = ''
          Shell run as root after the launch fragment is copied to
          ${runDir}/launch and before `ready` is reported. Exiting non-zero
          after `report "exit N"` aborts the launch.
        '';
      };
      agentPreStart = lib.mkOption {
        type = lib.types.lines;
        default = "";
        internal = true;
        description = "Shell run as the agent after the launch fragment is sourced, just before the command.";
      };
      scripts = lib.mkOption {
        type = lib.types.attrsOf lib.types.str;
        readOnly = true;
        internal = true;
        default = {
          launcher = launcherText;
          session = sessionText;
          local-dirs = localDirsSetupText;
        };
        description = "The texts of the launcher (root), session (agent) and local-directories (root) scripts, for tests.";
      };
    };

    spec = lib.mkOption {
      # raw: a generated value, never merged (readOnly: one definition).
      type = lib.types.raw;
      readOnly = true;
      default = spec.fromConfig config;
      defaultText = lib.literalMD "generated by `lib/spec.nix` from the resolved configuration";
      description = "The guest spec (runner/src/microvm_run/spec.py, version 2) as an attribute set.";
    };

    specFile = lib.mkOption {
      type = lib.types.package;
      readOnly = true;
      default = pkgs.writeText "${cfg.agent.name}-spec.toml" (toml.render cfg.spec);
      defaultText = lib.literalMD "`agentVM.spec` rendered as TOML";
      description = "The spec file the flavor package points `MICROVM_RUN_SPEC` at.";
    };
  };

  config = lib.mkMerge [
    # microvm.nix's guest module is imported with ours; it too acts only
    # when this is a guest.
    { microvm.guest.enable = lib.mkDefault cfg.enable; }
    (lib.mkIf cfg.enable {
      agentVM.shares = guest.baseShares;

      # The runner starts a virtiofsd only for the spec's shares; a share
      # added to microvm.shares directly would leave the guest waiting.
      assertions = [
        {
          assertion = lib.all (s: lib.elem s.tag (map (a: a.tag) cfg.shares)) config.microvm.shares;
          message = "agent-microvm: add shares through agentVM.shares (the runner provides only those), not microvm.shares";
        }
      ];

      networking.hostName = lib.mkDefault "${cfg.agent.name}-vm";

      microvm = {
        hypervisor = "qemu";
        # Consumers can still set microvm.mem/vcpu directly; the spec reads
        # the resolved microvm.* values either way.
        mem = lib.mkDefault cfg.resources.memoryMiB;
        vcpu = lib.mkDefault cfg.resources.vcpus;
        # The runner builds QEMU's command line and runs one virtiofsd per
        # share; microvm.nix only shapes the guest. Its store share is ours.
        shares = map (s: {
          proto = "virtiofs";
          inherit (s) tag mountPoint readOnly;
          # Only the store share's source matters to microvm.nix (it detects
          # the host store by it); the runner resolves the rest at run time.
          source = if s.source == "nix-store" then "/nix/store" else "agent-microvm:${s.source}";
        }) cfg.shares;
        # /nix/store = host store (read-only) + tmpfs upper layer on /.
        writableStoreOverlay = "/nix/.rw-store";
        # hvc0 is the terminal; an emulated UART makes TUIs flicker.
        qemu.serialConsole = false;
      };

      # Read-only in the guest too, not only in virtiofsd.
      fileSystems."/nix/.ro-store".options = [ "ro" ];

      # /nix/store and its lower layer stay mounted until the very end of
      # shutdown; systemd's attempt to unmount them (busy) otherwise stalls
      # poweroff. microvm.nix does the same for its non-overlay store.
      systemd.mounts = [
        {
          what = "overlay";
          where = "/nix/store";
          overrideStrategy = "asDropin";
          unitConfig.DefaultDependencies = false;
        }
        {
          what = "ro-store";
          where = "/nix/.ro-store";
          overrideStrategy = "asDropin";
          unitConfig.DefaultDependencies = false;
        }
      ];

      boot.kernelParams = [
        # The runner adds panic=-1 and QEMU runs with -no-reboot: a reboot of
        # any kind ends QEMU. A triple-fault reboot works on every machine.
        "reboot=t"
        "quiet"
      ];
      boot.consoleLogLevel = lib.mkDefault 3;
      # fw_cfg carries the launch data and systemd's credentials; systemd
      # imports credentials early, so the module must be in the initrd.
      boot.initrd.availableKernelModules = [ "qemu_fw_cfg" ];
      boot.kernelModules = [ "qemu_fw_cfg" ];

      # The guest contract's network (contract.py "Network"): QEMU user
      # networking with restrict=on, a fixed address, and every name resolved
      # by the runner's egress proxy at 10.0.2.100 over TCP (use-vc), since
      # nothing else, UDP included, leaves the VM. Static: nothing waits.
      networking.useDHCP = false;
      networking.useNetworkd = true;
      systemd.network.enable = true;
      systemd.network.wait-online.enable = false;
      systemd.network.networks."10-uplink" = {
        matchConfig = {
          Type = "ether";
          # Physical devices only: container veths are "ether" too.
          Kind = "!*";
        };
        address = [ "${net.guestAddr}/${toString net.prefixLength}" ];
        gateway = [ net.gatewayAddr ];
        networkConfig.DHCP = "no";
        # The launcher's systemd-networkd-wait-online --any waits for this
        # link: wait-online ignores every link that is not required for
        # online, so with "no" it would wait out its timeout (found by the
        # systemd test guest). Nothing else waits: wait-online.service is off.
        linkConfig.RequiredForOnline = "routable";
      };
      # /etc/resolv.conf is a plain file, not networking.nameservers: with
      # networkd and no resolved, nothing would hand those to resolvconf.
      services.resolved.enable = false;
      networking.resolvconf.enable = false;
      environment.etc."resolv.conf".text = ''
        nameserver ${net.egressAddr}
        options use-vc
      '';
      # Behind QEMU's NAT with nothing listening: no firewall to set up.
      networking.firewall.enable = lib.mkDefault false;

      # The console belongs to the agent, not to a login prompt.
      systemd.services."serial-getty@hvc0".enable = false;
      systemd.services."getty@tty1".enable = false;
      systemd.services."autovt@".enable = false;

      users.groups.${user}.gid = uid;
      users.users.${user} = {
        isNormalUser = true;
        inherit uid home;
        group = user;
        # The home is a share from the host; never create or chown it here.
        createHome = false;
        shell = pkgs.bashInteractive;
        # No password, not in wheel, no sudo rules: no way to root.
        hashedPassword = "!";
      };
      security.sudo.enable = lib.mkDefault false;

      # The project belongs to the host user; git must not refuse it.
      programs.git = {
        enable = true;
        config.safe.directory = [ "/work" ];
      };

      environment.systemPackages = lib.optional (cfg.agent.package != null) cfg.agent.package ++ [
        pkgs.git
        pkgs.cacert
        pkgs.curl
        notifyCommand
      ];

      # nixpkgs.config is not a submodule (nixos/modules/misc/nixpkgs.nix):
      # a mkIf inside it is never discharged by NixOS, and of two modules'
      # allowUnfreePredicate only one survives. So the condition sits on the
      # option itself, and the allowance is nixpkgs' additive list, which
      # concatenates with a consumer's list and composes with a consumer's
      # predicate (pkgs/stdenv/generic/check-meta.nix). With their own
      # nixpkgs.pkgs, consumers allow the agent's package there themselves:
      # NixOS refuses nixpkgs.config next to nixpkgs.pkgs.
      nixpkgs.config =
        lib.mkIf (cfg.agent.unfreePackages != [ ] && !options.nixpkgs.pkgs.isDefined)
          {
            allowUnfreePackages = cfg.agent.unfreePackages;
          };

      # The guest's Nix database learns the system closure (so `nix` in the
      # guest does not rebuild what the shared store already holds), but not
      # on the boot path: microvm.nix's registerClosure loads it in stage 2,
      # before systemd starts anything, on every boot. Here a unit loads it
      # beside the agent's start, and nix-daemon (socket-activated, the
      # agent's only way into Nix) waits for it. The registration is passed
      # as a kernel parameter, as microvm.nix does: the closure cannot name
      # itself inside the system it describes.
      microvm.registerClosure = lib.mkDefault false;
      microvm.kernelParams = lib.mkIf config.nix.enable [ "regInfo=${registration}/registration" ];
      systemd.services.agent-microvm-register-store = lib.mkIf config.nix.enable {
        description = "Register the system closure in the guest's Nix database";
        wantedBy = [ "multi-user.target" ];
        before = [ "nix-daemon.service" ];
        unitConfig.ConditionKernelCommandLine = "regInfo";
        serviceConfig = {
          Type = "oneshot";
          RemainAfterExit = true;
          ExecStart = registerStore;
        };
      };
      systemd.services.nix-daemon = lib.mkIf config.nix.enable {
        after = [ "agent-microvm-register-store.service" ];
        wants = [ "agent-microvm-register-store.service" ];
      };

      nix.settings.experimental-features = [
        "nix-command"
        "flakes"
      ];
      # Incompatible with the store overlay (microvm.nix asserts it).
      nix.optimise.automatic = false;
      nix.gc.automatic = false;
      documentation.enable = lib.mkDefault false;

      systemd.services.agent-microvm = {
        description = "The agent on the console (agent-microvm guest contract ${toString spec.contractVersion})";
        wantedBy = [ "multi-user.target" ];
        # virtio_console is a module: without the devices, the unit would
        # race udev, fail on its TTY (208/STDIN) and power off silently.
        requires = [
          consoleDevice
          statusDevice
        ];
        after = [
          "local-fs.target"
          consoleDevice
          statusDevice
        ];
        unitConfig = {
          RequiresMountsFor = map (s: s.mountPoint) cfg.shares;
          # The agent ending (or this unit failing) ends the VM; the exit
          # status was reported on the status port before.
          SuccessAction = "poweroff";
          FailureAction = "poweroff";
        };
        serviceConfig = {
          Type = "exec";
          ExecStart = launcher;
          StandardInput = "tty-force";
          StandardOutput = "tty";
          StandardError = "tty";
          TTYPath = "/dev/hvc0";
          TTYReset = true;
          TTYVHangup = true;
          ImportCredential = cfg.agent.apiKeyVars;
          Restart = "no";
        };
        environment = {
          HOME = home;
          USER = user;
          LOGNAME = user;
          SHELL = "${pkgs.bashInteractive}/bin/bash";
        };
      };

      system.stateVersion = lib.mkDefault "26.05";
    })
  ];
}
