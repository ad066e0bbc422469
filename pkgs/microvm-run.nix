# The runner (runner/, a src-layout Python package). Its unit tests run as
# part of the build (tests/unit only: the integration tests boot VMs).
{
  lib,
  python3Packages,
  git,
  nix-eval-jobs,
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
      ../skills
      # tests/unit/test_newvm.py compares the runner's agent names with it.
      ../lib/flavors.nix
      ../tests/__init__.py
      ../tests/unit
      # nix-eval-jobs' recorded output, which tests/unit/test_check_cli.py parses.
      ../tests/fixtures/check/eval-jobs-flavors.jsonl
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
  # (docs/git.md); nix-eval-jobs evaluates every agent VM for `microvm-run
  # check`. The user's own come first on PATH. `microvm-run skill install`
  # copies the shipped skills.
  makeWrapperArgs = [
    "--suffix"
    "PATH"
    ":"
    (lib.makeBinPath [
      git
      nix-eval-jobs
    ])
    "--set-default"
    "MICROVM_RUN_SKILLS"
    "${placeholder "out"}/share/agent-microvm/skills"
  ];

  postInstall = ''
    mkdir -p $out/share/agent-microvm
    cp -r ../skills $out/share/agent-microvm/skills
  '';

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
