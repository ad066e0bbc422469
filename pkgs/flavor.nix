# One agent flavor: microvm-run wrapped with the spec generated from the
# flavor's evaluated NixOS configuration (`nixos`, from lib.nixosSystem).
# `<agent>-microvm` (or `<agent>-cri-microvm`) runs the agent on the current
# directory; building it builds the guest (kernel, initrd, system).
# Its arguments reach microvm-run unchanged, so it follows microvm-run's rule:
# a first bare word is a subcommand, then options, then `--` and the agent's
# arguments (`claude-microvm -- --resume`); tests/unit/test_cli.py covers both.
{
  lib,
  runCommand,
  makeBinaryWrapper,
  microvm-run,
  nixos,
}:
let
  cfg = nixos.config.agentVM;
  name = "${cfg.agent.name}${lib.optionalString cfg.cri.enable "-cri"}";
  # The CLI's name from its entry in lib/flavors.nix (an agent module of
  # your own: its agent name).
  title = (import ../lib/flavors.nix).${cfg.agent.name}.title or cfg.agent.name;
  exe = "${name}-microvm";
in
runCommand exe
  {
    nativeBuildInputs = [ makeBinaryWrapper ];
    passthru = {
      inherit nixos;
      inherit (cfg) spec specFile;
    };
    meta = {
      description = "${title} in a throw-away NixOS microVM${lib.optionalString cfg.cri.enable " with container runtimes"}";
      license = lib.licenses.mit;
      platforms = [ nixos.pkgs.stdenv.hostPlatform.system ];
      mainProgram = exe;
    };
  }
  ''
    # makeBinaryWrapper's makeWrapper (same flags): a compiled wrapper, where
    # a shell one would start a bash before microvm-run's own (about 2 ms of
    # CPU each, README "Tests and benchmarks").
    makeWrapper ${lib.getExe microvm-run} $out/bin/${exe} \
      --set-default MICROVM_RUN_SPEC ${cfg.specFile}
    mkdir -p $out/share/agent-microvm
    ln -s ${cfg.specFile} $out/share/agent-microvm/${name}-spec.toml
  ''
