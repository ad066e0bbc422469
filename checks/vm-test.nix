# Boots a real flavor inside a NixOS test VM: microvm-run starts virtiofsd
# and QEMU (KVM when the test VM has nested KVM, TCG otherwise), the guest
# runs a stand-in agent in /work as the agent user, and the runner exits
# with the agent's status. Proves the guest contract end to end: launch
# data, credentials, shares, uid mapping, the status port, poweroff.
{
  self,
  lib,
  pkgs,
  system,
}:
let
  flavor = self.lib.mkAgentVM {
    agent = "claude";
    inherit system;
    modules = [
      {
        # No agent package to build; a shell command stands in for it.
        agentVM.agent.package = lib.mkForce null;
        agentVM.agent.command = lib.mkForce [
          "sh"
          "-c"
          ''
            echo ok > /work/ok
            printf %s "$ANTHROPIC_API_KEY" > /work/key
            printf %s "$ANTHROPIC_BASE_URL" > /work/base-url
            cat /etc/resolv.conf > /work/resolv.conf
            # DNS over TCP to the runner's egress proxy (contract "Network").
            getent hosts api.anthropic.com > /work/dns || true
            id -u > /work/uid
            pwd > /work/pwd
            exit 7
          ''
        ];
        # Small enough to nest inside the test VM.
        agentVM.resources.memoryMiB = 1024;
        agentVM.resources.vcpus = 2;
      }
    ];
  };
in
pkgs.testers.runNixOSTest {
  name = "agent-microvm-boot";

  nodes.machine = {
    virtualisation = {
      memorySize = 3072;
      cores = 2;
      # The flavor's guest closure must be in the test VM's store.
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
    machine.wait_for_unit("multi-user.target")
    machine.succeed("install -d -o alice -g users /home/alice/project")

    accel = "kvm" if machine.execute("test -w /dev/kvm")[0] == 0 else "tcg"
    machine.log(f"booting the flavor with --accel {accel}")

    status, output = machine.execute(
        "su - alice -c 'cd /home/alice/project && "
        f"ANTHROPIC_API_KEY=s3cret claude-microvm --accel {accel} --boot-timeout 600 "
        "</dev/null'",
        timeout=1200,
    )
    machine.log(output)
    assert status == 7, f"expected the agent's exit status 7, got {status}"

    machine.succeed("grep -qx ok /home/alice/project/ok")
    # --inject-keys is the default: the guest sees a placeholder and the proxy URL.
    machine.succeed('test "$(cat /home/alice/project/key)" = microvm-run-placeholder')
    machine.succeed(
        'test "$(cat /home/alice/project/base-url)" = http://10.0.2.100:4180/anthropic-api-key'
    )
    machine.succeed("grep -qx 'nameserver 10.0.2.100' /home/alice/project/resolv.conf")
    machine.succeed("grep -q 'use-vc' /home/alice/project/resolv.conf")
    machine.succeed("grep -q '^10.0.2.100 ' /home/alice/project/dns")
    machine.succeed('test "$(cat /home/alice/project/pwd)" = /work')
    machine.succeed('test "$(cat /home/alice/project/uid)" = 1000')
    # virtiofsd maps the agent user to the invoking host user.
    machine.succeed('test "$(stat -c %U /home/alice/project/ok)" = alice')
  '';
}
