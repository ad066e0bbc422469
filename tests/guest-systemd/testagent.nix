# The systemd test guest's agent: a flavor (claude's, for its module list)
# turned into the test agent of tests/guest/build's spec: its name and API
# key variable, no package, no config directory. Used only to render
# tests/guest-systemd/rendered (scripts/eval-modules).
{ lib, ... }:
{
  agentVM.agent = {
    name = lib.mkForce "testagent";
    apiKeyVars = lib.mkForce [ "TESTAGENT_API_KEY" ];
    configDir = lib.mkForce null;
    package = lib.mkForce null;
  };
}
