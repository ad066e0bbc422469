# Sample flavors as plain attrsets shaped like the evaluated NixOS config
# that lib/spec.nix's fromConfig reads, one per flavor, built from the same
# pure data (lib/flavors.nix, lib/guest.nix, lib/network.nix) the modules
# use, and two inputs for lib/spec.nix's make: the smallest, and one with
# two key proxy routes.
# Store paths are made up.
let
  guest = import ../../lib/guest.nix;
  network = import ../../lib/network.nix;
  contract = import ../../lib/contract.nix;
  store = name: "/nix/store/00000000000000000000000000000000-${name}";

  # Every flavor of lib/flavors.nix, as its module sets agentVM.agent.
  agents = builtins.mapAttrs (_: f: {
    inherit (f) command;
    apiKeyVars = f.keyVars;
  }) (import ../../lib/flavors.nix);

  config =
    name: cri:
    let
      resources = guest.resources { inherit cri; };
    in
    {
      agentVM = {
        agent = agents.${name} // {
          inherit name;
        };
        host = {
          qemu = "${store "qemu"}/bin/qemu-system-x86_64";
          virtiofsd = "${store "virtiofsd"}/bin/virtiofsd";
        };
        shares = guest.baseShares ++ (if cri then guest.criShares else [ ]);
        network = network.${name};
        # modules/cri.nix's read-only agentVM.cri.runtimes.
        cri = {
          enable = cri;
          runtimes = contract.criRuntimes;
        };
      };
      microvm = {
        kernel = {
          out = store "linux";
        };
        initrdPath = "${store "initrd"}/initrd";
        kernelParams = [
          "reboot=t"
          "init=${store "nixos-system-${name}"}/init"
        ];
        mem = resources.memoryMiB;
        vcpu = resources.vcpus;
        qemu.machine = "microvm";
      };
      system.boot.loader.kernelFile = "bzImage";
    };
  # The smallest spec input lib/spec.nix accepts: no network, no keys.
  minimal = {
    agent = {
      name = "t";
      command = [ "true" ];
    };
    guest = {
      machine = "q35";
      kernel = "k";
      initrd = "i";
      memoryMiB = 512;
      vcpus = 1;
    };
    host = {
      qemu = "q";
      virtiofsd = "v";
    };
    shares = [
      {
        tag = "work";
        source = "work";
        mountPoint = "/work";
      }
    ];
  };

  # Two API keys, two key proxy routes, a wildcard and a port in the allowlist.
  twoKeys =
    minimal
    // {
      agent = minimal.agent // {
        apiKeyVars = [
          "A_KEY"
          "B_KEY"
        ];
      };
      network = {
        allow = [
          "*.a.example"
          "b.example:8443"
        ];
        keyProxy = [
          {
            var = "A_KEY";
            upstream = "https://a.example";
            header = "x-api-key";
            baseUrlVar = "A_BASE_URL";
          }
          {
            var = "B_KEY";
            upstream = "https://b.example:8443/api";
            header = "authorization";
            baseUrlVar = "B_BASE_URL";
            baseUrlPath = "/v1";
          }
        ];
      };
    };
in
{
  inherit agents store minimal twoKeys;
  configs = builtins.listToAttrs (
    builtins.concatMap (name: [
      {
        inherit name;
        value = config name false;
      }
      {
        name = "${name}-cri";
        value = config name true;
      }
    ]) (builtins.attrNames agents)
  );
}
