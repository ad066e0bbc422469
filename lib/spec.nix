# The guest spec (schema: runner/src/microvm_run/spec.py, version 3), made
# from plain values. Pure: no pkgs, no module system, so tests/nix can check
# it with builtins only.
#
#   make { agent; guest; host; shares; network ? { allow; keyProxy; }; }
#                                          -> spec attrset (render with toml.nix)
#   fromConfig config                      -> the same, from an evaluated NixOS
#                                             config (agentVM.* and microvm.*)
let
  inherit (builtins)
    all
    any
    attrNames
    concatStringsSep
    elem
    elemAt
    fromJSON
    isInt
    isList
    isString
    length
    listToAttrs
    map
    match
    stringLength
    ;

  # The values the runner checks too (versions, machines, share sources,
  # key headers): lib/contract.nix.
  contract = import ./contract.nix;
  inherit (contract)
    specVersion
    contractVersion
    machines
    shareSources
    keyHeaders
    ;

  # One [[key_proxy]] entry (--inject-keys; runner/src/microvm_run/egress.py).
  mkKeyProxy =
    apiKeyVars: k:
    let
      path = k.baseUrlPath or "";
      # spec.py's defaults; lib/network.nix names them for every flavor.
      methods = k.methods or [
        "GET"
        "POST"
      ];
      paths = k.paths or [ "/v1/" ];
    in
    checked
      [
        {
          ok = elem k.var apiKeyVars;
          msg = "key proxy for '${k.var}': not one of the agent's API key variables";
        }
        {
          ok = match "https?://[A-Za-z0-9.-]+(:[0-9]+)?(/[^[:space:]?#]*)?" k.upstream != null;
          msg = "key proxy for '${k.var}': upstream '${k.upstream}' must be an http(s) URL";
        }
        {
          ok = elem k.header keyHeaders;
          msg = "key proxy for '${k.var}': header '${k.header}' must be one of ${concatStringsSep ", " keyHeaders}";
        }
        {
          ok = match "[A-Za-z_][A-Za-z0-9_]*" k.baseUrlVar != null;
          msg = "key proxy for '${k.var}': baseUrlVar '${k.baseUrlVar}' is not a variable name";
        }
        {
          ok = path == "" || match "/.*" path != null;
          msg = "key proxy for '${k.var}': baseUrlPath must be empty or start with /";
        }
        {
          # spec.py KEY_ROUTE_METHOD: an upper-case token, never one that
          # reflects the request (TRACE, TRACK) or opens a tunnel (CONNECT).
          ok =
            methods != [ ]
            && all (
              m: match "[A-Z]{1,16}" m != null && !(elem m [ "TRACE" "TRACK" "CONNECT" ])
            ) methods;
          msg = "key proxy for '${k.var}': methods must be upper-case HTTP methods, not TRACE, TRACK or CONNECT";
        }
        {
          # spec.py KEY_ROUTE_PATH: plain segments, starting and ending in /.
          ok =
            paths != [ ]
            && all (p: match "(/[A-Za-z0-9._~-]+)+/" p != null && match ".*/[.][.]?/.*" p == null) paths;
          msg = "key proxy for '${k.var}': paths must be like /v1/ (plain segments, ending in /)";
        }
      ]
      {
        inherit (k) var upstream header;
        inherit methods paths;
        base_url_var = k.baseUrlVar;
        base_url_path = path;
      };

  # An allowlist entry as netpolicy.parse_allow takes it: host, *.suffix,
  # either with :port (1..65535); a name of at most 253 characters.
  allowEntry = "(\\*\\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*)(:([0-9]{1,5}))?";
  validAllow =
    e:
    let
      m = match allowEntry e;
      # Groups: 1 the name, 6 the port digits.
      digits = elemAt m 6;
      port = fromJSON (elemAt (match "0*([0-9]+)" digits) 0);
    in
    m != null
    && stringLength (elemAt m 1) <= 253
    && (digits == null || (port >= 1 && port <= 65535));

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
      network ? { },
      criRuntimes ? [ ],
    }:
    let
      rendered = map mkShare shares;
      apiKeyVars = agent.apiKeyVars or [ ];
      allow = network.allow or [ ];
      badAllow = builtins.filter (e: !validAllow e) allow;
      keyProxies = map (mkKeyProxy apiKeyVars) (network.keyProxy or [ ]);
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
        {
          ok = stringList allow && badAllow == [ ];
          msg =
            if stringList allow then
              "network allow entry '${builtins.head badAllow}' is not a lower-case host name, *.suffix or either with :port (1..65535)"
            else
              "network allow must be a list of strings";
        }
        {
          ok = unique (map (k: k.var) keyProxies);
          msg = "two key proxies for the same variable";
        }
        {
          ok = criRuntimes == [ ] || any (s: s.source == "cri-storage") rendered;
          msg = "container runtimes need a share with source 'cri-storage'";
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
          cri_runtimes = criRuntimes;
        };
        host = {
          qemu = "${host.qemu}";
          virtiofsd = "${host.virtiofsd}";
        };
        shares = rendered;
        network = {
          inherit allow;
        };
      }
      # Only when there is one: `key_proxy = []` would be a scalar array.
      // (if keyProxies == [ ] then { } else { key_proxy = keyProxies; });

  # The evaluated NixOS config -> spec. Reads only resolved values:
  # agentVM.{agent,shares,host,network,cri} and microvm.{kernel,initrdPath,kernelParams,
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
      network = {
        allow = cfg.network.allow or [ ];
        keyProxy = cfg.network.keyProxy or [ ];
      };
      criRuntimes = if cfg.cri.enable or false then cfg.cri.runtimes else [ ];
    };
in
{
  inherit
    specVersion
    contractVersion
    machines
    shareSources
    keyHeaders
    make
    fromConfig
    ;
}
