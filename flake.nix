{
  description = "Run an AI coding agent (lib/flavors.nix lists them) in a throw-away NixOS microVM";

  inputs = {
    nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";
    microvm = {
      url = "github:microvm-nix/microvm.nix";
      inputs.nixpkgs.follows = "nixpkgs";
    };
  };

  outputs =
    {
      self,
      nixpkgs,
      microvm,
    }:
    let
      inherit (nixpkgs) lib;

      # The guest spec knows QEMU's x86 machines only (spec.py MACHINES).
      systems = [ "x86_64-linux" ];
      forAllSystems = f: lib.genAttrs systems (system: f system nixpkgs.legacyPackages.${system});

      # name -> module (modules/flavor.nix); a new agent is one entry in
      # lib/flavors.nix, and its packages, apps and modules follow.
      agents = import ./lib/agents.nix;

      base = {
        imports = [
          microvm.nixosModules.microvm
          ./modules/base.nix
        ];
      };

      # A flavor package from an agent (a name from lib/flavors.nix, or a
      # module of your own setting agentVM.agent.*), extra NixOS modules and
      # extra guest packages (a list, or a function from the guest's pkgs).
      mkAgentVM =
        {
          agent,
          modules ? [ ],
          packages ? [ ],
          cri ? false,
          system ? "x86_64-linux",
        }:
        let
          agentModule = if builtins.isString agent then self.nixosModules.${agent} else agent;
          nixos = lib.nixosSystem {
            modules = [
              base
              agentModule
              (
                { pkgs, ... }:
                {
                  nixpkgs.hostPlatform = lib.mkDefault system;
                  agentVM.enable = true;
                  agentVM.cri.enable = lib.mkIf cri true;
                  environment.systemPackages = if builtins.isFunction packages then packages pkgs else packages;
                }
              )
            ]
            ++ modules;
          };
        in
        nixpkgs.legacyPackages.${system}.callPackage ./pkgs/flavor.nix {
          inherit nixos;
          inherit (self.packages.${system}) microvm-run;
        };
    in
    {
      lib = {
        inherit mkAgentVM;
        agents = builtins.attrNames agents;
        # Each flavor's entry (lib/flavors.nix says what each field means).
        flavors = import ./lib/flavors.nix;
        spec = import ./lib/spec.nix;
        toml = import ./lib/toml.nix;
        # Each flavor's default allowlist and key proxy routes, to extend.
        network = import ./lib/network.nix;
      };

      # Each is usable on its own and acts only with `agentVM.enable = true`
      # (a guest module imported into a host by mistake changes nothing).
      # base carries cri and devshell (agentVM.cri.enable,
      # agentVM.devshell.enable); an agent module is base + that agent.
      nixosModules = {
        inherit base;
        # For a host's configuration: services.agent-microvm.vms.<name>
        # become microvm.nix's microvm@NAME (modules/host.nix, README
        # "Agent VMs on a NixOS host").
        host =
          { pkgs, ... }:
          {
            imports = [
              microvm.nixosModules.host
              ./modules/host.nix
            ];
            services.agent-microvm = {
              package = lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.microvm-run;
              guestModules = [ base ];
              flavorModules = agents;
            };
          };
      }
      // lib.mapAttrs (_: module: {
        imports = [
          base
          module
        ];
      }) agents;

      packages = forAllSystems (
        system: pkgs:
        let
          flavors = lib.concatMapAttrs (name: _: {
            ${name} = mkAgentVM {
              agent = name;
              inherit system;
            };
            "${name}-cri" = mkAgentVM {
              agent = name;
              cri = true;
              inherit system;
            };
          }) agents;
        in
        flavors
        // {
          microvm-run = pkgs.callPackage ./pkgs/microvm-run.nix { };
          default = flavors.claude;
        }
      );

      apps = forAllSystems (
        system: _:
        lib.mapAttrs (_: pkg: {
          type = "app";
          program = lib.getExe pkg;
          meta.description = pkg.meta.description;
        }) self.packages.${system}
      );

      devShells = forAllSystems (
        system: pkgs: {
          default = pkgs.mkShell {
            packages = [
              self.packages.${system}.microvm-run
              (pkgs.python3.withPackages (ps: [
                ps.plumbum
                ps.xdg-base-dirs
                ps.tomli-w
                ps.pytest
              ]))
              pkgs.ruff
              pkgs.nixfmt
              pkgs.shellcheck
              pkgs.qemu_kvm
              pkgs.virtiofsd
              # microvm-run check evaluates every agent VM with it.
              pkgs.nix-eval-jobs
            ];
          };
        }
      );

      formatter = forAllSystems (_: pkgs: pkgs.nixfmt-tree);

      checks = forAllSystems (
        system: pkgs:
        import ./checks {
          inherit
            self
            lib
            pkgs
            system
            ;
        }
      );
    };
}
