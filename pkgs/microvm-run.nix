# The runner (runner/, a src-layout Python package). Its unit tests run as
# part of the build (tests/unit only: the integration tests boot VMs).
{
  lib,
  python3Packages,
  git,
}:
let
  fs = lib.fileset;
in
python3Packages.buildPythonApplication {
  pname = "microvm-run";
  # The one place the version is written: runner/pyproject.toml.
  inherit ((lib.importTOML ../runner/pyproject.toml).project) version;
  pyproject = true;

  src = fs.toSource {
    root = ../.;
    fileset = fs.unions [
      ../runner
      ../tests/__init__.py
      ../tests/unit
      ../tests/support
      ../pytest.ini
    ];
  };
  sourceRoot = "source/runner";

  build-system = [ python3Packages.setuptools ];
  dependencies = [
    python3Packages.plumbum
    python3Packages.tomli-w
  ];

  # Host git prepares the agent's git directory and imports its commits
  # (docs/git.md); the user's own git comes first on PATH.
  makeWrapperArgs = [
    "--suffix"
    "PATH"
    ":"
    (lib.makeBinPath [ git ])
  ];

  nativeCheckInputs = [
    python3Packages.pytestCheckHook
    python3Packages.mypy
    git
  ];
  # The type check reads runner/pyproject.toml's [tool.mypy]; pytest.ini and
  # the tests live beside runner/, at the repository root.
  preCheck = ''
    mypy src
    cd ..
  '';
  enabledTestPaths = [ "tests/unit" ];
  pythonImportsCheck = [ "microvm_run" ];

  meta = {
    description = "Start an AI coding agent in a throw-away NixOS microVM";
    license = lib.licenses.mit;
    platforms = lib.platforms.linux;
    mainProgram = "microvm-run";
  };
}
