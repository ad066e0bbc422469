# The Nix half of the seam with the runner: every value that Nix and the
# runner must agree on, written once on this side (the runner's half is in
# runner/src/microvm_run/spec.py, contract.py and netpolicy.py). Pure data:
# the modules, lib/spec.nix and the tests import it instead of repeating a
# literal. `make nix-test` writes it as JSON (tests/nix/run --emit-spec DIR
# writes DIR/contract.json) and tests/nix/validate_specs.py fails when a
# runner constant differs, so neither side can drift alone.
{
  # spec.py SPEC_VERSION: the schema of the generated spec.
  specVersion = 3;
  # contract.py CONTRACT_VERSION: what the guest implements.
  contractVersion = 1;
  # spec.py MACHINES, SHARE_SOURCES, KEY_HEADERS (in the runner's order).
  machines = [
    "microvm"
    "q35"
  ];
  shareSources = [
    "work"
    "home"
    "nix-store"
    "cri-storage"
  ];
  keyHeaders = [
    "x-api-key"
    "authorization"
    "x-goog-api-key"
  ];

  # contract.py LAUNCH_FW_CFG, CREDENTIAL_FW_CFG_PREFIX, STATUS_PORT.
  fwCfg = {
    launch = "opt/org.agent-microvm/launch";
    credentialPrefix = "opt/io.systemd.credentials/";
  };
  statusPort = "org.agent-microvm.status";
  # contract.py CONSOLE: the virtio console the runner names in console=,
  # the agent's terminal.
  console = "hvc0";

  # contract.py LAUNCH_VAR_*: the launch fragment's variables the guest
  # reads (render_launch writes the first three, plan.py exports the others
  # with the agent's environment).
  launchVars = {
    net = "MICROVM_NET";
    localDirs = "MICROVM_LOCAL_DIRS";
    ttySize = "MICROVM_TTY_SIZE";
    devshell = "MICROVM_DEVSHELL";
    enableCri = "ENABLE_CRI";
  };

  # contract.py LOCAL_DISK_SERIAL, LOCAL_MOUNT: the local directories' disk
  # and where the guest mounts it.
  localDisk = {
    serial = "agent-microvm-local";
    mount = "/run/microvm-local";
  };

  # contract.py GUEST_UID, GUEST_HOME, GUEST_WORK_DIR: who runs the command,
  # where; hostvms.py GUEST_USER: the user `microvm-run attach` logs in as.
  guestUser = {
    name = "agent";
    uid = 1000;
    home = "/home/agent";
  };
  workDir = "/work";
  # hostvms.py ATTACH_COMMAND: what `microvm-run attach` runs over SSH in a
  # host-declared VM (modules/persistent.nix provides it).
  attachCommand = "agent-microvm-attach";

  # contract.py EXIT_NO_STATUS: what the guest reports when it cannot even
  # start the command (no /work), the status the runner gives a guest failure.
  guestFailureStatus = 125;

  # netpolicy.py: QEMU user networking's fixed addresses and the ports of
  # the runner's egress proxy on EGRESS_ADDR (prefixLength and gatewayAddr
  # are QEMU's defaults, which the runner never names: not compared).
  network = {
    guestAddr = "10.0.2.15";
    prefixLength = 24;
    gatewayAddr = "10.0.2.2";
    egressAddr = "10.0.2.100";
    ports = {
      dns = 53;
      http = 80;
      tls = 443;
      proxy = 3128;
      keyProxy = 4180;
    };
    # netpolicy.py KEY_PLACEHOLDER: the API key a guest sees while the key
    # proxy holds the real one.
    keyPlaceholder = "microvm-run-placeholder";
  };

  # ENABLE_CRI's names, sorted (modules/cri.nix gives each its units); since spec
  # version 3 the spec carries them (guest.cri_runtimes), so the runner
  # checks ENABLE_CRI against the flavor it runs. spec.py
  # SPEC_V2_CRI_RUNTIMES is what a version 2 spec with a cri-storage share
  # implies.
  criRuntimes = [
    "containerd"
    "cri-o"
    "crun"
    "docker"
    "podman"
  ];
}
