# Builtins-only tests of lib/ (no nixpkgs, no fetch): name -> { expr; expected; }.
# Run with tests/nix/run (any Nix >= 2.8).
let
  toml = import ../../lib/toml.nix;
  spec = import ../../lib/spec.nix;
  guest = import ../../lib/guest.nix;
  samples = import ./samples.nix;
  flavors = import ../../lib/flavors.nix;
  tables = import ./flavor-tables.nix;
  readme = builtins.readFile ../../README.md;
  nixDoc = builtins.readFile ../../docs/nix.md;
  hasInfix = needle: text: builtins.replaceStrings [ needle ] [ "" ] text != text;
  inherit (samples) store minimal twoKeys;

  # Does evaluating x throw? (tryEval catches throw/assert only.)
  throws = x: !(builtins.tryEval (builtins.deepSeq x x)).success;

  claudeSpec = spec.fromConfig samples.configs.claude;
  claudeCriSpec = spec.fromConfig samples.configs.claude-cri;

  withShares = shares: minimal // { inherit shares; };
in
{
  # --- lib/toml.nix -----------------------------------------------------
  tomlScalars = {
    expr = toml.render {
      b = true;
      f = false;
      i = 42;
      n = -7;
      s = "plain";
      l = [
        "a"
        "b"
      ];
      e = [ ];
    };
    expected = ''
      b = true
      e = []
      f = false
      i = 42
      l = ["a", "b"]
      n = -7
      s = "plain"
    '';
  };

  tomlEscapes = {
    expr = toml.render {
      s = "quote \" backslash \\ tab \t newline \n cr \r";
    };
    expected = ''
      s = "quote \" backslash \\ tab \t newline \n cr \r"
    '';
  };

  tomlControlCharacters = {
    expr = toml.escapeString (builtins.fromJSON ''"\u0001\u0008\u000c\u001f\u007f"'');
    expected = ''\u0001\b\f\u001F\u007F'';
  };

  tomlAllControlCharactersEscaped = {
    expr = toml.internal.controlCount;
    expected = 32;
  };

  tomlUnicodePassesThrough = {
    expr = toml.render { s = "grüße ✓"; };
    expected = "s = \"grüße ✓\"\n";
  };

  tomlKeysQuotedWhenNeeded = {
    expr = toml.render {
      "a b" = 1;
      "x.y" = 2;
      ok_key-1 = 3;
    };
    expected = ''
      "a b" = 1
      ok_key-1 = 3
      "x.y" = 2
    '';
  };

  tomlTablesAfterScalars = {
    expr = toml.render {
      z = 1;
      a = {
        k = "v";
        sub = {
          deep = true;
        };
      };
    };
    expected = ''
      z = 1

      [a]
      k = "v"

      [a.sub]
      deep = true
    '';
  };

  tomlQuotedTableNames = {
    expr = toml.render { plugins."io.containerd.cri.v1.runtime".x = 1; };
    expected = ''
      [plugins]

      [plugins."io.containerd.cri.v1.runtime"]
      x = 1
    '';
  };

  tomlArraysOfTables = {
    expr = toml.render {
      v = 1;
      shares = [
        {
          tag = "a";
          ro = true;
        }
        { tag = "b"; }
      ];
    };
    expected = ''
      v = 1

      [[shares]]
      ro = true
      tag = "a"

      [[shares]]
      tag = "b"
    '';
  };

  tomlRejectsNull = {
    expr = throws (toml.render { x = null; });
    expected = true;
  };
  tomlRejectsFloat = {
    expr = throws (toml.render { x = 1.5; });
    expected = true;
  };
  tomlRejectsNestedArrays = {
    expr = throws (toml.render {
      x = [
        [ "a" ]
      ];
    });
    expected = true;
  };
  tomlRejectsNonAttrsDocument = {
    expr = throws (toml.render [ ]);
    expected = true;
  };

  # --- lib/guest.nix ------------------------------------------------------
  defaultResources = {
    expr = guest.resources { };
    expected = {
      memoryMiB = 4096;
      vcpus = 4;
    };
  };
  criResources = {
    expr = guest.resources { cri = true; };
    expected = {
      memoryMiB = 8192;
      vcpus = 4;
    };
  };

  # --- lib/spec.nix ---------------------------------------------------------
  claudeSpecIsExact = {
    expr = claudeSpec;
    expected = {
      spec_version = 3;
      agent = {
        name = "claude";
        command = [
          "claude"
          "--settings"
          "/etc/agent-microvm/claude-settings.json"
          "--dangerously-skip-permissions"
        ];
        api_key_vars = [ "ANTHROPIC_API_KEY" ];
      };
      guest = {
        contract = 1;
        cri_runtimes = [ ];
        machine = "microvm";
        kernel = "${store "linux"}/bzImage";
        initrd = "${store "initrd"}/initrd";
        kernel_params = [
          "reboot=t"
          "init=${store "nixos-system-claude"}/init"
        ];
        memory_mib = 4096;
        vcpus = 4;
      };
      host = {
        qemu = "${store "qemu"}/bin/qemu-system-x86_64";
        virtiofsd = "${store "virtiofsd"}/bin/virtiofsd";
      };
      shares = [
        {
          tag = "ro-store";
          source = "nix-store";
          mount_point = "/nix/.ro-store";
          read_only = true;
        }
        {
          tag = "work";
          source = "work";
          mount_point = "/work";
          read_only = false;
        }
        {
          tag = "home";
          source = "home";
          mount_point = "/home/agent";
          read_only = false;
        }
      ];
      network.allow = [
        "api.anthropic.com"
        "statsig.anthropic.com"
        "console.anthropic.com"
        "claude.ai"
        "platform.claude.com"
      ];
      key_proxy = [
        {
          var = "ANTHROPIC_API_KEY";
          upstream = "https://api.anthropic.com";
          header = "x-api-key";
          base_url_var = "ANTHROPIC_BASE_URL";
          base_url_path = "";
          methods = [
            "GET"
            "POST"
          ];
          paths = [ "/v1/" ];
        }
      ];
    };
  };

  criSpecHas8GiBAndStorage = {
    expr = {
      inherit (claudeCriSpec.guest) memory_mib vcpus;
      cri = builtins.filter (s: s.source == "cri-storage") claudeCriSpec.shares;
    };
    expected = {
      memory_mib = 8192;
      vcpus = 4;
      cri = [
        {
          tag = "cri-storage";
          source = "cri-storage";
          mount_point = "/var/lib/containers";
          read_only = false;
        }
      ];
    };
  };

  # One sample per flavor and its -cri twin, each with its entry's keys.
  everySampleHasItsKeyVar = {
    expr = builtins.mapAttrs (_: c: (spec.fromConfig c).agent.api_key_vars) samples.configs;
    expected = builtins.listToAttrs (
      builtins.concatMap (name: [
        {
          inherit name;
          value = flavors.${name}.keyVars;
        }
        {
          name = "${name}-cri";
          value = flavors.${name}.keyVars;
        }
      ]) (builtins.attrNames flavors)
    );
  };

  claudeSpecToml = {
    expr = toml.render claudeSpec;
    expected = ''
      spec_version = 3

      [agent]
      api_key_vars = ["ANTHROPIC_API_KEY"]
      command = ["claude", "--settings", "/etc/agent-microvm/claude-settings.json", "--dangerously-skip-permissions"]
      name = "claude"

      [guest]
      contract = 1
      cri_runtimes = []
      initrd = "${store "initrd"}/initrd"
      kernel = "${store "linux"}/bzImage"
      kernel_params = ["reboot=t", "init=${store "nixos-system-claude"}/init"]
      machine = "microvm"
      memory_mib = 4096
      vcpus = 4

      [host]
      qemu = "${store "qemu"}/bin/qemu-system-x86_64"
      virtiofsd = "${store "virtiofsd"}/bin/virtiofsd"

      [network]
      allow = ["api.anthropic.com", "statsig.anthropic.com", "console.anthropic.com", "claude.ai", "platform.claude.com"]

      [[key_proxy]]
      base_url_path = ""
      base_url_var = "ANTHROPIC_BASE_URL"
      header = "x-api-key"
      methods = ["GET", "POST"]
      paths = ["/v1/"]
      upstream = "https://api.anthropic.com"
      var = "ANTHROPIC_API_KEY"

      [[shares]]
      mount_point = "/nix/.ro-store"
      read_only = true
      source = "nix-store"
      tag = "ro-store"

      [[shares]]
      mount_point = "/work"
      read_only = false
      source = "work"
      tag = "work"

      [[shares]]
      mount_point = "/home/agent"
      read_only = false
      source = "home"
      tag = "home"
    '';
  };

  specMinimalHasNoKeyProxyAndAnEmptyAllowlist = {
    expr = {
      inherit (spec.make minimal) network;
      keyProxy = (spec.make minimal) ? key_proxy;
    };
    expected = {
      network.allow = [ ];
      keyProxy = false;
    };
  };

  specAcceptsAllowlistForms = {
    expr =
      (spec.make (
        minimal
        // {
          network.allow = [
            "api.example.com"
            "*.example.com"
            "git.example.com:8443"
          ];
        }
      )).network.allow;
    expected = [
      "api.example.com"
      "*.example.com"
      "git.example.com:8443"
    ];
  };

  specRejectsBadAllowEntries = {
    expr = map (entry: throws (spec.make (minimal // { network.allow = [ entry ]; }))) [
      "http://x.example"
      "*"
      "Upper.Example"
      "a b"
      "a..example"
      "-a.example"
      "a.example:0"
      "a.example:65536"
      "a.example:123456"
      # 254 characters: one more than a DNS name may have.
      (builtins.concatStringsSep "." (builtins.genList (_: "abcdefghijklmnopqrstuvwxy") 9) + ".abcdefghijklmnopqrst")
    ];
    expected = builtins.genList (_: true) 10;
  };

  specAllowlistPortBounds = {
    expr =
      (spec.make (
        minimal
        // {
          network.allow = [
            "a.example:1"
            "a.example:65535"
            "a.example:08443"
          ];
        }
      )).network.allow;
    expected = [
      "a.example:1"
      "a.example:65535"
      "a.example:08443"
    ];
  };

  specRejectsNonListAllow = {
    expr = throws (spec.make (minimal // { network.allow = "api.example.com"; }));
    expected = true;
  };

  specRejectsBadKeyProxies =
    let
      ok = {
        var = "K";
        upstream = "https://api.example.com";
        header = "authorization";
        baseUrlVar = "K_BASE_URL";
      };
      withProxy =
        k:
        minimal
        // {
          agent = minimal.agent // {
            apiKeyVars = [ "K" ];
          };
          network.keyProxy = [ k ];
        };
    in
    {
      expr = {
        good = (spec.make (withProxy ok)).key_proxy;
        notAKeyVar = throws (spec.make (withProxy (ok // { var = "OTHER"; })));
        badUpstream = throws (spec.make (withProxy (ok // { upstream = "ftp://x"; })));
        badHeader = throws (spec.make (withProxy (ok // { header = "cookie"; })));
        badPath = throws (spec.make (withProxy (ok // { baseUrlPath = "v1"; })));
        spaceInUpstream = throws (spec.make (withProxy (ok // { upstream = "https://a.example/x y"; })));
        queryInUpstream = throws (spec.make (withProxy (ok // { upstream = "https://a.example/?k=1"; })));
        badBaseUrlVar = throws (spec.make (withProxy (ok // { baseUrlVar = "1X"; })));
        traceMethod = throws (spec.make (withProxy (ok // { methods = [ "TRACE" ]; })));
        lowerMethod = throws (spec.make (withProxy (ok // { methods = [ "get" ]; })));
        noMethods = throws (spec.make (withProxy (ok // { methods = [ ]; })));
        pathWithoutSlash = throws (spec.make (withProxy (ok // { paths = [ "/v1" ]; })));
        dotDotPath = throws (spec.make (withProxy (ok // { paths = [ "/v1/../" ]; })));
        rootPath = throws (spec.make (withProxy (ok // { paths = [ "/" ]; })));
        ownPaths =
          (spec.make (
            withProxy (
              ok
              // {
                methods = [ "POST" ];
                paths = [ "/v1beta/" ];
              }
            )
          )).key_proxy;
        twiceTheSameVar = throws (
          spec.make (
            withProxy ok
            // {
              network.keyProxy = [
                ok
                ok
              ];
            }
          )
        );
      };
      expected = {
        good = [
          {
            var = "K";
            upstream = "https://api.example.com";
            header = "authorization";
            base_url_var = "K_BASE_URL";
            base_url_path = "";
            methods = [
              "GET"
              "POST"
            ];
            paths = [ "/v1/" ];
          }
        ];
        notAKeyVar = true;
        badUpstream = true;
        badHeader = true;
        badPath = true;
        spaceInUpstream = true;
        queryInUpstream = true;
        badBaseUrlVar = true;
        traceMethod = true;
        lowerMethod = true;
        noMethods = true;
        pathWithoutSlash = true;
        dotDotPath = true;
        rootPath = true;
        ownPaths = [
          {
            var = "K";
            upstream = "https://api.example.com";
            header = "authorization";
            base_url_var = "K_BASE_URL";
            base_url_path = "";
            methods = [ "POST" ];
            paths = [ "/v1beta/" ];
          }
        ];
        twiceTheSameVar = true;
      };
    };

  # Two [[key_proxy]] tables after [network], each with its own header, and
  # the shares after them (arrays of tables sort by name).
  specTwoKeyProxiesToml = {
    expr = toml.render (spec.make twoKeys);
    expected = ''
      spec_version = 3

      [agent]
      api_key_vars = ["A_KEY", "B_KEY"]
      command = ["true"]
      name = "t"

      [guest]
      contract = 1
      cri_runtimes = []
      initrd = "i"
      kernel = "k"
      kernel_params = []
      machine = "q35"
      memory_mib = 512
      vcpus = 1

      [host]
      qemu = "q"
      virtiofsd = "v"

      [network]
      allow = ["*.a.example", "b.example:8443"]

      [[key_proxy]]
      base_url_path = ""
      base_url_var = "A_BASE_URL"
      header = "x-api-key"
      methods = ["GET", "POST"]
      paths = ["/v1/"]
      upstream = "https://a.example"
      var = "A_KEY"

      [[key_proxy]]
      base_url_path = "/v1"
      base_url_var = "B_BASE_URL"
      header = "authorization"
      methods = ["GET", "POST"]
      paths = ["/v1/"]
      upstream = "https://b.example:8443/api"
      var = "B_KEY"

      [[shares]]
      mount_point = "/work"
      read_only = false
      source = "work"
      tag = "work"
    '';
  };


  # Every flavor routes each of its API key variables through the key proxy.
  everyFlavorProxiesItsKeys = {
    expr = builtins.mapAttrs (
      _: c: map (p: p.var) (spec.fromConfig c).key_proxy == c.agentVM.agent.apiKeyVars
    ) samples.configs;
    expected = builtins.mapAttrs (_: _: true) samples.configs;
  };

  specMinimalDefaults = {
    expr = (spec.make minimal).agent.api_key_vars ++ (spec.make minimal).guest.kernel_params;
    expected = [ ];
  };

  specRejectsUnknownShareSource = {
    expr = throws (spec.make (withShares (minimal.shares ++ [
      {
        tag = "x";
        source = "elsewhere";
        mountPoint = "/x";
      }
    ])));
    expected = true;
  };
  specRejectsWritableStore = {
    expr = throws (spec.make (withShares (minimal.shares ++ [
      {
        tag = "s";
        source = "nix-store";
        mountPoint = "/nix/.ro-store";
      }
    ])));
    expected = true;
  };
  specRejectsMissingWorkShare = {
    expr = throws (spec.make (withShares [
      {
        tag = "home";
        source = "home";
        mountPoint = "/home/agent";
      }
    ]));
    expected = true;
  };
  specRejectsDuplicateTags = {
    expr = throws (spec.make (withShares (minimal.shares ++ [
      {
        tag = "work";
        source = "home";
        mountPoint = "/home/agent";
      }
    ])));
    expected = true;
  };
  specRejectsRelativeMountPoint = {
    expr = throws (spec.make (withShares [
      {
        tag = "work";
        source = "work";
        mountPoint = "work";
      }
    ]));
    expected = true;
  };
  specRejectsBadAgentName = {
    expr = throws (spec.make (minimal // { agent = minimal.agent // { name = "Claude"; }; }));
    expected = true;
  };
  specRejectsEmptyCommand = {
    expr = throws (spec.make (minimal // { agent = minimal.agent // { command = [ ]; }; }));
    expected = true;
  };
  specRejectsBadKeyVar = {
    expr = throws (spec.make (minimal // { agent = minimal.agent // { apiKeyVars = [ "1BAD" ]; }; }));
    expected = true;
  };
  specRejectsUnknownMachine = {
    expr = throws (spec.make (minimal // { guest = minimal.guest // { machine = "pc"; }; }));
    expected = true;
  };
  specRejectsTinyMemory = {
    expr = throws (spec.make (minimal // { guest = minimal.guest // { memoryMiB = 32; }; }));
    expected = true;
  };
  specRejectsTooManyVcpus = {
    expr = throws (spec.make (minimal // { guest = minimal.guest // { vcpus = 256; }; }));
    expected = true;
  };

  # Only a flavor with container storage lists runtimes; they need it.
  specCriRuntimesFollowTheCriFlavor = {
    expr = builtins.mapAttrs (_: c: (spec.fromConfig c).guest.cri_runtimes != [ ]) samples.configs;
    expected = builtins.mapAttrs (name: _: builtins.match ".*-cri" name != null) samples.configs;
  };
  specRejectsRuntimesWithoutStorage = {
    expr = throws (spec.make (minimal // { criRuntimes = [ "docker" ]; }));
    expected = true;
  };

  # --- lib/flavors.nix: a flavor is one entry ------------------------------
  everyFlavorEntryIsComplete = {
    expr = builtins.mapAttrs (_: f: {
      fields = builtins.all (n: f ? ${n}) [
        "title"
        "package"
        "command"
        "keyVars"
        "configDir"
        "allow"
        "keyProxy"
      ];
      routesUseItsOwnKeys = builtins.all (r: builtins.elem r.var f.keyVars) f.keyProxy;
      etcIsJson = builtins.all (e: e ? json) (builtins.attrValues (f.etc or { }));
    }) flavors;
    expected = builtins.mapAttrs (_: _: {
      fields = true;
      routesUseItsOwnKeys = true;
      etcIsJson = true;
    }) flavors;
  };
  # Modules, network defaults and samples: one per entry, none by hand.
  everyFlavorHasItsModuleNetworkAndSample = {
    expr = {
      modules = builtins.attrNames (import ../../lib/agents.nix);
      network = builtins.attrNames (import ../../lib/network.nix);
      samples = builtins.attrNames samples.agents;
    };
    expected = {
      modules = tables.names;
      network = tables.names;
      samples = tables.names;
    };
  };
  # The docs' tables made from the entries are in the docs as they are
  # (expected: the table to paste).
  readmeKeyProxyTableIsTheFlavors = {
    expr =
      if hasInfix tables.rendered.keyProxy readme then tables.rendered.keyProxy else "not in README.md";
    expected = tables.rendered.keyProxy;
  };
  docsAgentTableIsTheFlavors = {
    expr =
      if hasInfix tables.rendered.agents nixDoc then tables.rendered.agents else "not in docs/nix.md";
    expected = tables.rendered.agents;
  };
  # The README's hand-written flavor tables have one row per flavor.
  readmeAgentTablesListEveryFlavor = {
    expr =
      map
        (header: builtins.sort builtins.lessThan (tables.firstColumn readme header))
        [
          "| flavor | CLI | tested with (npm, in CI) | key | first start in a new project |"
          "| flavor | the login lives in (agent home) | with a login and an exported key | to use the key instead |"
        ];
    expected = [
      tables.names
      tables.names
    ];
  };
  # The real-CLI tests install one npm package per flavor (setup-host).
  cliVersionsListEveryFlavor = {
    expr = builtins.sort builtins.lessThan (
      map (m: builtins.head m) (
        builtins.filter (m: m != null) (
          map (builtins.match "([a-z][a-z0-9-]*) @?[a-z0-9./@-]+ [0-9][0-9A-Za-z.+-]*") (
            builtins.filter builtins.isString (
              builtins.split "\n" (builtins.readFile ../clis/versions.env)
            )
          )
        )
      )
    );
    expected = tables.names;
  };
  # nix.mk's targets come from the entries, not from a list of names.
  nixMkAgentsComeFromTheFlavors = {
    expr = map (l: builtins.match ".*lib/flavors.nix.*" l != null) (
      builtins.filter (l: builtins.match "AGENTS *[:?]?=.*" l != null) (
        builtins.filter builtins.isString (builtins.split "\n" (builtins.readFile ../../nix.mk))
      )
    );
    expected = [ true ];
  };
}
