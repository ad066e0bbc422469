# Boots a real flavor inside a NixOS test VM: microvm-run starts virtiofsd
# and QEMU (KVM when the test VM has nested KVM, TCG otherwise), the guest
# runs a stand-in agent in /work as the agent user, and the runner exits
# with the agent's status. Proves the guest contract end to end: launch
# data, credentials, shares, uid mapping, the status port, poweroff.
#
#   import ./vm-test.nix { inherit self lib pkgs system; }              the plain flavor
#   import ./vm-test.nix { inherit self lib pkgs system; cri = true; }  the -cri flavor:
#     ENABLE_CRI=docker,podman, a container from a local image (no
#     registry) in each, storage on the cri-storage share, not vfs
{
  self,
  lib,
  pkgs,
  system,
  cri ? false,
}:
let
  contract = import ../lib/contract.nix;
  net = contract.network;
  proxyUrl = "http://${net.egressAddr}:${toString net.ports.keyProxy}";

  # An image built from store paths: `docker load` / `podman load` take it
  # from the shared store, nothing is pulled.
  image = pkgs.dockerTools.buildImage {
    name = "agent-microvm-test";
    tag = "local";
    copyToRoot = [ pkgs.busybox ];
    config.Cmd = [ "/bin/sh" ];
  };

  agentScript =
    if cri then
      ''
        set -e
        docker load -i ${image}
        docker run --rm --network none agent-microvm-test:local sh -c 'echo docker-ok' > ${contract.workDir}/docker-run
        docker info --format '{{.Driver}}' > ${contract.workDir}/docker-driver
        podman load -i ${image}
        podman run --rm --network none agent-microvm-test:local sh -c 'echo podman-ok' > ${contract.workDir}/podman-run
        podman info --format '{{.Store.GraphDriverName}}' > ${contract.workDir}/podman-driver
        exit 7
      ''
    else
      ''
        echo ok > ${contract.workDir}/ok
        printf %s "$ANTHROPIC_API_KEY" > ${contract.workDir}/key
        printf %s "$ANTHROPIC_BASE_URL" > ${contract.workDir}/base-url
        cat /etc/resolv.conf > ${contract.workDir}/resolv.conf
        # DNS over TCP to the runner's egress proxy (contract "Network").
        getent hosts api.anthropic.com > ${contract.workDir}/dns || true
        id -u > ${contract.workDir}/uid
        pwd > ${contract.workDir}/pwd
        exit 7
      '';

  flavor = self.lib.mkAgentVM {
    agent = "claude";
    inherit system cri;
    modules = [
      {
        # No agent package to build; a shell command stands in for it.
        agentVM.agent.package = lib.mkForce null;
        agentVM.agent.command = lib.mkForce [
          "sh"
          "-c"
          agentScript
        ];
        # Small enough to nest inside the test VM.
        agentVM.resources.memoryMiB = if cri then 2048 else 1024;
        agentVM.resources.vcpus = 2;
      }
    ];
  };

  runEnv = lib.optionalString cri "ENABLE_CRI=docker,podman ";

  plainAsserts = ''
    machine.succeed("grep -qx ok /home/alice/project/ok")
    # --inject-keys is the default: the guest sees a placeholder and the proxy URL.
    machine.succeed('test "$(cat /home/alice/project/key)" = ${net.keyPlaceholder}')
    machine.succeed(
        'test "$(cat /home/alice/project/base-url)" = ${proxyUrl}/anthropic-api-key'
    )
    machine.succeed("grep -qx 'nameserver ${net.egressAddr}' /home/alice/project/resolv.conf")
    machine.succeed("grep -q 'use-vc' /home/alice/project/resolv.conf")
    machine.succeed("grep -q '^${net.egressAddr} ' /home/alice/project/dns")
    machine.succeed('test "$(cat /home/alice/project/pwd)" = ${contract.workDir}')
    machine.succeed('test "$(cat /home/alice/project/uid)" = ${toString contract.guestUser.uid}')
    # virtiofsd maps the agent user to the invoking host user.
    machine.succeed('test "$(stat -c %U /home/alice/project/ok)" = alice')
  '';

  criAsserts = ''
    machine.succeed("grep -qx docker-ok /home/alice/project/docker-run")
    machine.succeed("grep -qx podman-ok /home/alice/project/podman-run")
    # overlayfs on the virtiofs cri-storage share, not a copy per layer.
    docker_driver = machine.succeed("cat /home/alice/project/docker-driver").strip()
    podman_driver = machine.succeed("cat /home/alice/project/podman-driver").strip()
    machine.log(f"storage drivers: docker {docker_driver}, podman {podman_driver}")
    assert docker_driver in ("overlay2", "overlayfs"), f"docker storage driver {docker_driver}"
    assert podman_driver == "overlay", f"podman storage driver {podman_driver}"
    # The layers are on the host, under the agent home's container storage.
    machine.succeed(
        "find /home/alice/.local/share -path '*/cri-storage/docker/overlay2/*' -name diff -type d"
        " | grep -q ."
    )
  '';
in
pkgs.testers.runNixOSTest {
  name = "agent-microvm-boot${lib.optionalString cri "-cri"}";

  # Hosted CI runners do not promise nested KVM: the inner guest may run
  # under TCG, a boot of a few minutes; the default global timeout is 1 h.
  globalTimeout = 2 * 60 * 60;

  nodes.machine = {
    virtualisation = {
      memorySize = if cri then 4096 else 3072;
      cores = 2;
      diskSize = if cri then 4096 else 1024;
      # The flavor's guest closure (and the test image) must be in the test
      # VM's store: the guest sees that store.
      additionalPaths = [ flavor ];
    };
    boot.kernelModules = [
      "kvm-intel"
      "kvm-amd"
    ];
    environment.systemPackages = [ flavor ];
    users.users.alice = {
      isNormalUser = true;
      extraGroups = [ "kvm" ];
    };
  };

  testScript = ''
    from datetime import timedelta

    machine.wait_for_unit("multi-user.target")
    machine.succeed("install -d -o alice -g users /home/alice/project")

    accel = "kvm" if machine.execute("test -w /dev/kvm")[0] == 0 else "tcg"
    machine.log(f"booting the flavor with --accel {accel}")

    # The runner's output goes to a file, not to the driver's pipe: a child
    # that outlived the runner would hold the pipe open and execute() would
    # wait for its timeout instead of returning the runner's status.
    status, _ = machine.execute(
        "su - alice -c 'cd /home/alice/project && "
        "${runEnv}ANTHROPIC_API_KEY=s3cret claude-microvm "
        f"--accel {accel} --boot-timeout 900 </dev/null >/tmp/run.log 2>&1'",
        timeout=timedelta(minutes=40),
    )
    machine.log(machine.succeed("cat /tmp/run.log"))
    assert status == 7, f"expected the agent's exit status 7, got {status}"
    # Nothing of the run is left behind.
    machine.fail("pgrep -u alice -f 'qemu-system|virtiofsd'")

    ${if cri then criAsserts else plainAsserts}
  '';
}
