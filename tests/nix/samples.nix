# Sample flavors as plain attrsets shaped like the evaluated NixOS config
# that lib/spec.nix's fromConfig reads, built from the same pure defaults
# (lib/guest.nix) the modules use. Store paths are made up.
let
  guest = import ../../lib/guest.nix;
  network = import ../../lib/network.nix;
  store = name: "/nix/store/00000000000000000000000000000000-${name}";

  agents = {
    claude = {
      command = [
        "claude"
        "--dangerously-skip-permissions"
      ];
      apiKeyVars = [ "ANTHROPIC_API_KEY" ];
    };
    gemini = {
      command = [
        "gemini"
        "--yolo"
      ];
      apiKeyVars = [ "GEMINI_API_KEY" ];
    };
    codex = {
      command = [
        "codex"
        "--dangerously-bypass-approvals-and-sandbox"
      ];
      apiKeyVars = [ "OPENAI_API_KEY" ];
    };
  };

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
in
{
  inherit agents store;
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
