# The host module on a real NixOS host (a test VM): one agent VM declared
# with services.agent-microvm, started as microvm@dev by microvm.nix, reached
# with `microvm-run attach`, and its isolation checked from inside (over SSH,
# as the agent user): not the host's services, not the LAN, nothing while
# its egress proxy is stopped; `microvm-run ps` shows it.
#
#   import ./host-vm-test.nix { inherit self lib pkgs system; }
{
  self,
  lib,
  pkgs,
  system,
}:
let
  contract = import ../lib/contract.nix;
  # nixpkgs' test keys (never used outside tests).
  sshKeys = import (pkgs.path + "/nixos/tests/ssh-keys.nix") pkgs;
in
pkgs.testers.runNixOSTest {
  name = "agent-microvm-host";
  globalTimeout = 2 * 60 * 60;

  nodes.lan = {
    # A LAN neighbour with a service the VM must not reach.
    networking.firewall.allowedTCPPorts = [ 8080 ];
    systemd.services.lan-web = {
      wantedBy = [ "multi-user.target" ];
      script = "exec ${pkgs.python3}/bin/python3 -m http.server 8080";
    };
  };

  nodes.host = {
    imports = [
      self.nixosModules.host
      # The VM (its own file: make eval-modules evaluates it too).
      ./host-vm-dev.nix
    ];
    virtualisation = {
      memorySize = 3072;
      cores = 2;
      diskSize = 2048;
    };
    boot.kernelModules = [
      "kvm-intel"
      "kvm-amd"
    ];
    users.users.alice = {
      isNormalUser = true;
      openssh.authorizedKeys.keys = [ sshKeys.snakeOilPublicKey ];
    };
    environment.systemPackages = [
      self.packages.${system}.microvm-run
      pkgs.jq
      pkgs.util-linux
    ];
    # A service of the host's own that the VM must not reach.
    systemd.services.host-web = {
      wantedBy = [ "multi-user.target" ];
      script = "exec ${pkgs.python3}/bin/python3 -m http.server 9000";
    };
    systemd.tmpfiles.rules = [
      "d /home/alice/project 0755 alice users -"
      "d /run/keys 0750 root root -"
      "f /run/keys/anthropic 0400 root root - s3cret-canary"
    ];
  };

  testScript = ''
    import shlex

    start_all()
    lan.wait_for_unit("lan-web.service")
    host.wait_for_unit("multi-user.target")
    host.wait_for_unit("agent-microvm-egress-dev.service")
    host.wait_for_unit("microvm@dev.service", timeout=900)
    host.wait_until_succeeds("test -s /home/alice/project/started", timeout=900)

    address = host.succeed("jq -r '.vms[0].address' /etc/agent-microvm/vms.json").strip()
    lan_ip = lan.succeed("ip -4 -o addr show eth1 | awk '{print $4}' | cut -d/ -f1").strip()
    host.succeed("install -d -m 700 -o alice /home/alice/.ssh")
    host.succeed(
        "install -m 600 -o alice ${sshKeys.snakeOilPrivateKey} /home/alice/.ssh/id_ecdsa"
    )

    # ps: the declared VM, active, at its address
    ps = host.succeed("su - alice -c 'microvm-run ps'")
    assert "dev" in ps and "active" in ps and address in ps, ps

    # attach: SSH (host key checked against the one the host generated) into
    # the agent's tmux session; the screen shows the agent's output.
    host.wait_until_succeeds(
        "su - alice -c \"timeout 20 script -qec 'microvm-run attach dev' /tmp/attach.log\"; "
        "grep -q AGENT-SCREEN /tmp/attach.log",
        timeout=300,
    )
    host.succeed("grep -q 'key=${contract.network.keyPlaceholder}' /tmp/attach.log")
    host.fail("grep -q s3cret-canary /tmp/attach.log")

    def inside(command):
        ssh = (
            "ssh -o StrictHostKeyChecking=yes "
            "-o UserKnownHostsFile=/var/lib/microvms/dev/ssh/known_hosts "
            f"${contract.guestUser.name}@{address} {shlex.quote(command)}"
        )
        return host.execute(f"su - alice -c {shlex.quote(ssh)}")

    # Not the host's own service, nor its SSH, nor the LAN
    status, out = inside("curl -sS --noproxy '*' --max-time 5 http://10.77.0.1:9000/")
    assert status != 0 or "403" in out, out
    status, out = inside("curl -sS --noproxy '*' --max-time 5 telnet://10.77.0.1:22 </dev/null")
    assert "SSH-" not in out, out
    status, out = inside(f"curl -sS --noproxy '*' --max-time 5 http://{lan_ip}:8080/")
    assert status != 0 or "403" in out, out
    lan.fail("journalctl -u lan-web | grep -q GET")
    host.fail("journalctl -u host-web | grep -q GET")

    # The key stays on the host: the guest has the placeholder only
    status, out = inside("env; cat /proc/cmdline")
    assert "s3cret-canary" not in out, out

    # The proxy stopped: nothing at all (connections are refused)
    host.succeed("systemctl stop agent-microvm-egress-dev.service")
    status, out = inside("curl -sS --max-time 5 http://api.anthropic.com/")
    assert status != 0, out
    status, out = inside("getent hosts api.anthropic.com")
    assert status != 0, out

    # The agent exiting powers nothing off; stopping is systemctl's
    host.succeed("systemctl is-active microvm@dev.service")
    host.succeed("systemctl stop microvm@dev.service")
    host.fail("systemctl is-active microvm@dev.service")
  '';
}
