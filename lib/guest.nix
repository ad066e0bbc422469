# Guest facts and defaults shared by the modules and the builtins-only tests,
# kept pure so the defaults the README promises are tested as values.
let
  contract = import ./contract.nix;
  # virtiofsd maps its uid to the host user.
  user = contract.guestUser;
in
{
  inherit user;

  # Resolved defaults of agentVM.resources: one place decides, no competing
  # mkDefaults (a mkDefault 8192 loses to a plain 4096 elsewhere).
  resources =
    {
      cri ? false,
    }:
    {
      memoryMiB = if cri then 8192 else 4096;
      vcpus = 4;
    };

  # Every flavor's shares; `source` names what the runner shares (spec.py
  # SHARE_SOURCES). The store goes where microvm.nix puts a host store that
  # lies under a writable overlay.
  baseShares = [
    {
      tag = "ro-store";
      source = "nix-store";
      mountPoint = "/nix/.ro-store";
      readOnly = true;
    }
    {
      tag = "work";
      source = "work";
      mountPoint = contract.workDir;
      readOnly = false;
    }
    {
      tag = "home";
      source = "home";
      mountPoint = user.home;
      readOnly = false;
    }
  ];

  criShares = [
    {
      tag = "cri-storage";
      source = "cri-storage";
      mountPoint = "/var/lib/containers";
      readOnly = false;
    }
  ];
}
