# A stand-in for nixpkgs' `pkgs` in tests/nix/eval-modules.nix: fake
# derivations (attrsets with a made-up store path) for exactly the packages
# the modules and microvm.nix's evaluated parts use. Nothing here builds;
# writeText / writeShellScript keep their text so tests can read it.
{ lib }:
let
  # A plausible store path: 32 characters of nix32 alphabet, then the name.
  fakeHash =
    name:
    builtins.replaceStrings [ "e" "o" "t" "u" ] [ "g" "p" "v" "w" ] (
      builtins.substring 0 32 (builtins.hashString "sha256" name)
    );

  mkFake =
    name: extra:
    let
      self = {
        type = "derivation";
        inherit name;
        pname = name;
        version = "0-stand-in";
        outPath = "/nix/store/${fakeHash name}-${name}";
        drvPath = "/nix/store/${fakeHash "${name}.drv"}-${name}.drv";
        meta = {
          mainProgram = name;
        };
        configureFlags = [ ];
        override = _: self;
        overrideAttrs = _: self;
      }
      // extra;
      out = self // {
        inherit out;
      };
    in
    out;

  # Every flavor's package (lib/flavors.nix), unfree where the entry says
  # so, and the other packages the modules use.
  flavors = builtins.attrValues (import ../../lib/flavors.nix);
  names = [
    "bashInteractive"
    "cacert"
    "cni-plugins"
    "containerd"
    "coreutils"
    "cri-tools"
    "crun"
    "curl"
    "docker-compose"
    "e2fsprogs"
    "findutils"
    "git"
    "iptables"
    "jq"
    "nerdctl"
    "netcat"
    "nix"
    "python3"
    "qemu"
    "qemu_kvm"
    "runc"
    "socat"
    "systemd"
    "tmux"
    "openssh"
    "microvm-run"
    "util-linux"
    "virtiofsd"
  ];

  hostPlatform = {
    system = "x86_64-linux";
    isLinux = true;
    isDarwin = false;
    qemuArch = "x86_64";
    # No linux-kernel: nixpkgs removed hostPlatform.linux-kernel (2026-06);
    # the kernel's own `target` names the image (pkgs.linux.target).
  };

  # meta.license as nixpkgs has it (claude-code is unfree); "unfree-other"
  # stands for any other unfree package (nothing may allow it by accident).
  unfree = {
    shortName = "unfree";
    free = false;
  };
  licensed =
    name: license:
    let
      p = mkFake name { };
    in
    p // { meta = p.meta // { inherit license; }; };

  pkgs =
    lib.genAttrs names (n: mkFake n { })
    // builtins.listToAttrs (
      map (f: {
        name = f.package;
        value = if f.unfree or false then licensed f.package unfree else mkFake f.package { };
      }) flavors
    )
    // {
      unfree-other = licensed "unfree-other" unfree;
      inherit lib;
      _type = "pkgs"; # what types.pkgs checks
      buildPackages = pkgs;
      stdenv = {
        inherit hostPlatform;
        buildPlatform = hostPlatform;
        targetPlatform = hostPlatform;
      };
      linux = mkFake "linux" {
        version = "6.18.0";
        target = "bzImage";
      };
      runtimeShell = "/nix/store/${fakeHash "bash"}-bash/bin/bash";
      writeText = name: text: mkFake name { inherit text; };
      # microvm.nix's store-disk.nix: the closure's registration for the
      # guest's Nix database (microvm.registerClosure).
      closureInfo = { rootPaths }: mkFake "closure-info" { inherit rootPaths; };
      # microvm.nix's lib/runner.nix: the runner package with its passthru
      # (the host module reads registerWithMachined, supportsNotifySocket).
      runCommand = name: attrs: script: mkFake name ((attrs.passthru or { }) // { inherit script; });
      writeShellScriptBin =
        name: text:
        mkFake name {
          text = "#!/bin/sh\n${text}";
        };
      writeShellScript =
        name: text:
        mkFake name {
          text = "#!/bin/sh\n${text}";
        };
    };
in
pkgs
