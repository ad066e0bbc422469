# Evaluates tests/nix/cases.nix: results = { passed; failed = [ { name; expr; expected; } ]; }
# the sample specs as TOML text and lib/contract.nix (for `tests/nix/run
# --emit-spec DIR`, which the runner's side then checks).
let
  cases = import ./cases.nix;
  samples = import ./samples.nix;
  spec = import ../../lib/spec.nix;
  toml = import ../../lib/toml.nix;
  names = builtins.attrNames cases;
  failedNames = builtins.filter (n: cases.${n}.expr != cases.${n}.expected) names;
in
{
  results = {
    passed = builtins.length names - builtins.length failedNames;
    failed = map (n: {
      name = n;
      inherit (cases.${n}) expr expected;
    }) failedNames;
  };
  # Each sample flavor, plus edge shapes the runner must read as well.
  contract = import ../../lib/contract.nix;
  specs = builtins.mapAttrs (_: c: toml.render (spec.fromConfig c)) samples.configs // {
    minimal = toml.render (spec.make samples.minimal);
    two-keys = toml.render (spec.make samples.twoKeys);
  };
}
