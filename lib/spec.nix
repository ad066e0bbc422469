# The guest spec (schema: runner/src/microvm_run/spec.py, version 1), made
# from plain values. Pure: no pkgs, no module system, so tests/nix can check
# it with builtins only.
#
#   make { agent; guest; host; shares; }  -> spec attrset (render with toml.nix)
#   fromConfig config                      -> the same, from an evaluated NixOS
#                                             config (agentVM.* and microvm.*)
let
  inherit (builtins)
    all
    any
    attrNames
    concatStringsSep
    elem
    isInt
    isList
    isString
    length
    listToAttrs
    map
    match
    ;

  specVersion = 1;
  contractVersion = 1;
  machines = [
    "microvm"
    "q35"
  ];
  # spec.py SHARE_SOURCES: where the runner takes each share from on the host.
  shareSources = [
    "work"
    "home"
    "nix-store"
    "cri-storage"
  ];

  # The first failing { ok; msg; } throws; otherwise value.
  checked =
    checks: value:
    builtins.foldl' (
      acc: c: if c.ok then acc else throw "agent-microvm spec: ${c.msg}"
    ) value checks;

  stringList = v: isList v && all isString v;
  nonEmptyString = v: isString v && v != "";

  unique =
    xs:
    length (attrNames (listToAttrs (map (k: {
      name = k;
      value = null;
    }) xs))) == length xs;

  mkShare =
    s:
    let
      readOnly = s.readOnly or false;
    in
    checked
      [
        {
          ok = match "[A-Za-z0-9_-]{1,32}" s.tag != null;
          msg = "share tag '${s.tag}' must match [A-Za-z0-9_-]{1,32}";
        }
        {
          ok = elem s.source shareSources;
          msg = "share '${s.tag}': source '${s.source}' must be one of ${concatStringsSep ", " shareSources}";
        }
        {
          ok = match "/.*" s.mountPoint != null;
          msg = "share '${s.tag}': mount point '${s.mountPoint}' must be absolute";
        }
        {
          ok = s.source != "nix-store" || readOnly;
          msg = "share '${s.tag}': the nix-store share must be read-only";
        }
      ]
      {
        inherit (s) tag source;
        mount_point = s.mountPoint;
        read_only = readOnly;
      };

  make =
    {
      agent,
      guest,
      host,
      shares,
    }:
    let
      rendered = map mkShare shares;
      apiKeyVars = agent.apiKeyVars or [ ];
    in
    checked
      [
        {
          ok = match "[a-z][a-z0-9-]{0,31}" agent.name != null;
          msg = "agent name '${agent.name}' must match [a-z][a-z0-9-]{0,31}";
        }
        {
          ok = stringList agent.command && agent.command != [ ];
          msg = "agent command must be a non-empty list of strings";
        }
        {
          ok = stringList apiKeyVars && all (v: match "[A-Za-z_][A-Za-z0-9_]*" v != null) apiKeyVars;
          msg = "API key variables must be valid environment variable names";
        }
        {
          ok = elem guest.machine machines;
          msg = "QEMU machine '${guest.machine}' is not one the runner supports (${concatStringsSep ", " machines})";
        }
        {
          ok = isInt guest.memoryMiB && guest.memoryMiB >= 64;
          msg = "memory must be an integer >= 64 (MiB)";
        }
        {
          ok = isInt guest.vcpus && guest.vcpus >= 1 && guest.vcpus <= 255;
          msg = "vcpus must be an integer in 1..255";
        }
        {
          ok = all nonEmptyString [
            "${guest.kernel}"
            "${guest.initrd}"
            "${host.qemu}"
            "${host.virtiofsd}"
          ];
          msg = "kernel, initrd, qemu and virtiofsd must be non-empty paths";
        }
        {
          ok = unique (map (s: s.tag) rendered);
          msg = "two shares have the same tag";
        }
        {
          ok = unique (map (s: s.mount_point) rendered);
          msg = "two shares have the same mount point";
        }
        {
          ok = unique (map (s: s.source) rendered);
          msg = "two shares have the same source";
        }
        {
          ok = any (s: s.source == "work") rendered;
          msg = "no share with source 'work' (the project must be shared)";
        }
      ]
      {
        spec_version = specVersion;
        agent = {
          inherit (agent) name command;
          api_key_vars = apiKeyVars;
        };
        guest = {
          contract = contractVersion;
          inherit (guest) machine vcpus;
          kernel = "${guest.kernel}";
          initrd = "${guest.initrd}";
          kernel_params = guest.kernelParams or [ ];
          memory_mib = guest.memoryMiB;
        };
        host = {
          qemu = "${host.qemu}";
          virtiofsd = "${host.virtiofsd}";
        };
        shares = rendered;
      };

  # The evaluated NixOS config -> spec. Reads only resolved values:
  # agentVM.{agent,shares,host} and microvm.{kernel,initrdPath,kernelParams,
  # mem,vcpu,qemu.machine}, plus system.boot.loader.kernelFile.
  fromConfig =
    config:
    let
      cfg = config.agentVM;
      mv = config.microvm;
    in
    make {
      agent = {
        inherit (cfg.agent) name command apiKeyVars;
      };
      guest = {
        inherit (mv.qemu) machine;
        kernel = "${mv.kernel.out or mv.kernel}/${config.system.boot.loader.kernelFile}";
        initrd = mv.initrdPath;
        inherit (mv) kernelParams;
        memoryMiB = mv.mem;
        vcpus = mv.vcpu;
      };
      host = {
        inherit (cfg.host) qemu virtiofsd;
      };
      inherit (cfg) shares;
    };
in
{
  inherit
    specVersion
    contractVersion
    machines
    shareSources
    make
    fromConfig
    ;
}
