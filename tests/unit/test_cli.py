"""The command line: bad input is one clear line, exit status 2, nothing created."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from microvm_run.cli import SUBCOMMANDS, subcommand_list
from microvm_run.evalguard import projects_overlap
from tests.support.cli import run

from .conftest import SAMPLE


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir()
    return {
        "HOME": str(home),
        "XDG_DATA_HOME": str(tmp_path / "data"),
        "XDG_RUNTIME_DIR": str(tmp_path / "run"),
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "TERM": "xterm",
    }


@pytest.fixture
def work(tmp_path: Path) -> Path:
    path = tmp_path / "project"
    path.mkdir()
    return path


def test_dry_run_prints_the_plan_and_creates_nothing(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], spec_file: Path, work: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    code, out, _ = run(
        capsys, ["--spec", str(spec_file), "--work-dir", str(work), "--dry-run", "--json"], env
    )
    assert code == 0
    plan = json.loads(out)
    assert plan["work_dir"] == str(work)
    assert plan["agent_home"].startswith(str(tmp_path / "data" / "claude-microvm" / "project-"))
    assert not (tmp_path / "data").exists()
    assert not (tmp_path / "run").exists()


def test_spec_comes_from_the_environment_and_work_dir_from_work_dir(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], spec_file: Path, work: Path
) -> None:
    env |= {"MICROVM_RUN_SPEC": str(spec_file), "WORK_DIR": str(work)}
    code, out, _ = run(capsys, ["--dry-run", "--json"], env)
    assert code == 0
    assert json.loads(out)["work_dir"] == str(work)


@pytest.mark.parametrize(
    ("args", "extra_env", "message"),
    [
        (["--work-dir", "{tmp}/absent"], {}, "does not exist"),
        (["--work-dir", "{tmp}/spec.toml"], {}, "is not a directory"),
        (["--work-dir", "/"], {}, "refusing to share the whole file system"),
        (["--work-dir", "{tmp}/home"], {}, "your home directory"),
        (["--mem", "0"], {}, "--mem 0 is out of range"),
        (["--mem", "lots"], {}, "--mem must be a whole number"),
        (["--vcpus", "999"], {}, "--vcpus 999 is out of range"),
        ([], {"MICROVM_MEM": "-5"}, "--mem must be a whole number"),
        (["--boot-timeout", "0"], {}, "--boot-timeout must be positive"),
        ([], {"MICROVM_BOOT_TIMEOUT": "soon"}, "--boot-timeout must be a number of seconds"),
        (["--boot-timeout", "nan"], {}, "--boot-timeout must be positive"),
        ([], {"ENABLE_CRI": "dokcer"}, "ENABLE_CRI is set but this flavor has no container"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_created(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], spec_file: Path, work: Path,
    tmp_path: Path, args: list[str], extra_env: dict[str, str], message: str,
) -> None:  # fmt: skip
    argv = ["--spec", str(spec_file), "--work-dir", str(work)]
    argv += [a.replace("{tmp}", str(tmp_path)) for a in args]
    code, out, err = run(capsys, argv, env | extra_env)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "data").exists()
    assert not (tmp_path / "run").exists()


def test_home_itself_is_allowed_with_allow_home_once_the_runners_dirs_are_elsewhere(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], spec_file: Path, tmp_path: Path
) -> None:
    argv = ["--spec", str(spec_file), "--work-dir", env["HOME"], "--allow-home", "--dry-run"]
    # By default the runner's state (the dev-shell consent) and config (the
    # allowlists) are in ~/.local/state and ~/.config: the agent would own them.
    code, _, err = run(capsys, argv, env)
    assert code == 2 and "contains the runner's state dir" in err and err.count("\n") == 1
    elsewhere = {
        f"XDG_{name}_HOME": str(tmp_path / name.lower()) for name in ("STATE", "CONFIG", "CACHE")
    }
    code, _, _ = run(capsys, argv, env | elsewhere)
    assert code == 0


@pytest.mark.parametrize(
    ("xdg", "what"),
    [
        ("", "your home directory"),
        ("XDG_STATE_HOME", "state dir"),
        ("XDG_CONFIG_HOME", "config dir"),
        ("XDG_CACHE_HOME", "cache dir"),
        ("XDG_RUNTIME_DIR", "runtime dir"),
    ],
)
def test_a_project_that_holds_home_or_the_runners_dirs_is_refused(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], spec_file: Path, tmp_path: Path,
    xdg: str, what: str,
) -> None:  # fmt: skip
    project = tmp_path / "project"
    project.mkdir()
    elsewhere = {
        f"XDG_{name}_HOME": str(tmp_path / name.lower()) for name in ("STATE", "CONFIG", "CACHE")
    }
    if xdg:
        elsewhere[xdg] = str(project / "inside" / "xdg")
    else:
        elsewhere["HOME"] = str(project / "home")
    before = sorted(p.name for p in tmp_path.iterdir())
    argv = ["--spec", str(spec_file), "--work-dir", str(project)]
    code, out, err = run(capsys, argv, env | elsewhere)
    assert (code, out) == (2, "")
    assert err.count("\n") == 1, err
    assert f"contains {what}" in err or f"contains the runner's {what}" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert not (project / "inside").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"spec_version = [", "not valid TOML"),
        (b"spec_version = 99\n", "newer than this microvm-run understands"),
        (b"\xff\xfe", "not valid TOML"),
    ],
)
def test_corrupt_or_future_specs_are_refused(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], work: Path, tmp_path: Path,
    content: bytes, message: str,
) -> None:  # fmt: skip
    spec = tmp_path / "bad.toml"
    spec.write_bytes(content)
    code, _, err = run(capsys, ["--spec", str(spec), "--work-dir", str(work)], env)
    assert code == 2
    assert message in err and err.count("\n") == 1


def test_no_spec_names_the_fix(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], work: Path
) -> None:
    code, _, err = run(capsys, ["--work-dir", str(work)], env)
    assert code == 2
    assert "MICROVM_RUN_SPEC" in err


def test_missing_qemu_is_refused_before_anything_starts(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], spec_file: Path, work: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    code, _, err = run(
        capsys, ["--spec", str(spec_file), "--work-dir", str(work), "--accel", "tcg"], env
    )
    assert code == 2
    assert "qemu /nix/store/q-qemu/bin/qemu-system-x86_64 is missing" in err
    assert not (tmp_path / "data").exists()


def test_missing_kvm_names_the_fix(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], work: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    spec = _runnable_spec(tmp_path)  # its binaries exist: the KVM check is what fails
    real_exists = Path.exists
    monkeypatch.setattr(
        Path, "exists", lambda self: False if str(self) == "/dev/kvm" else real_exists(self)
    )
    code, _, err = run(capsys, ["--spec", str(spec), "--work-dir", str(work)], env)
    assert code == 2
    assert "/dev/kvm does not exist" in err and "--accel tcg" in err


# -- networking options ---------------------------------------------------------------


@pytest.fixture
def key_spec_file(tmp_path: Path) -> Path:
    sample = json.loads(json.dumps(SAMPLE))
    sample["spec_version"] = 2
    sample["network"] = {"allow": ["api.anthropic.com"]}
    sample["key_proxy"] = [
        {"var": "ANTHROPIC_API_KEY", "upstream": "https://api.anthropic.com",
         "header": "x-api-key", "base_url_var": "ANTHROPIC_BASE_URL"}
    ]  # fmt: skip
    path = tmp_path / "key-spec.toml"
    path.write_bytes(tomli_w.dumps(sample).encode())
    return path


def dry_run(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], spec: Path, work: Path,
    *args: str,
) -> Any:  # fmt: skip
    code, out, err = run(
        capsys, ["--spec", str(spec), "--work-dir", str(work), "--dry-run", "--json", *args], env
    )
    assert code == 0, err
    return json.loads(out)


@pytest.mark.parametrize(
    ("net", "expected"),
    [("user", "open"), ("open", "open"), ("allowlist", "allowlist"), ("none", "none")],
)
def test_net_modes_and_the_user_alias(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], spec_file: Path, work: Path,
    net: str, expected: str,
) -> None:  # fmt: skip
    plan = dry_run(capsys, env, spec_file, work, "--net", net)
    assert plan["net"] == expected
    assert (plan["egress"] is None) == (expected == "none")
    assert dry_run(capsys, env | {"MICROVM_NET": net}, spec_file, work)["net"] == expected


def test_net_defaults_to_open(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], spec_file: Path, work: Path
) -> None:
    plan = dry_run(capsys, env, spec_file, work)
    assert plan["net"] == "open"
    assert plan["egress"]["mode"] == "open"


def test_unknown_net_mode_is_a_one_line_usage_error(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], spec_file: Path, work: Path
) -> None:
    code, out, err = run(
        capsys, ["--spec", str(spec_file), "--work-dir", str(work), "--net", "bridge"], env
    )
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and "--net" in err and "'bridge'" in err


def test_allow_adds_to_microvm_allow(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], spec_file: Path, work: Path
) -> None:
    env = env | {"MICROVM_ALLOW": "a.example, *.b.example  c.example:8443"}
    plan = dry_run(capsys, env, spec_file, work, "--net", "allowlist", "--allow", "d.example",
                   "--allow", "A.example")  # fmt: skip
    rules = [(r["host"], r["wildcard"], r["port"]) for r in plan["egress"]["rules"]]
    assert rules == [("a.example", False, None), ("b.example", True, None),
                     ("c.example", False, 8443), ("d.example", False, None)]  # fmt: skip


def test_allow_private_is_its_own_rule_from_the_flag_and_the_environment(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], spec_file: Path, work: Path
) -> None:
    env = env | {"MICROVM_ALLOW_PRIVATE": "db.lan.example:5432"}
    plan = dry_run(capsys, env, spec_file, work, "--allow-private", "nas.lan.example",
                   "--allow", "a.example")  # fmt: skip
    rules = [(r["host"], r["port"], r["private"]) for r in plan["egress"]["rules"]]
    assert rules == [("a.example", None, False), ("db.lan.example", 5432, True),
                     ("nas.lan.example", None, True)]  # fmt: skip


def test_project_allowlist_file_is_read_from_the_config_dir(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], spec_file: Path, work: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    from microvm_run import host  # noqa: PLC0415

    path = host.project_allow_file("claude", work, env)
    assert path.is_relative_to(Path(env["HOME"]) / ".config")
    path.parent.mkdir(parents=True)
    path.write_text("# ours\nproject.example  # comment\n")
    plan = dry_run(capsys, env, spec_file, work, "--net", "allowlist")
    assert [r["host"] for r in plan["egress"]["rules"]] == ["project.example"]


def test_a_bad_line_in_the_project_allowlist_names_the_file_and_line(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], spec_file: Path, work: Path
) -> None:
    from microvm_run import host  # noqa: PLC0415

    path = host.project_allow_file("claude", work, env)
    path.parent.mkdir(parents=True)
    path.write_text("# ours\nproject.example\n\nnot a host\n")
    argv = ["--spec", str(spec_file), "--work-dir", str(work), "--dry-run"]
    code, out, err = run(capsys, argv, env)
    assert (code, out) == (2, "")
    assert err.count("\n") == 1 and f"{path}:4: " in err, err


@pytest.mark.parametrize(
    "argv",
    [
        ["--accel", "foo"],
        ["--accel"],
        ["doctor", "--accel", "foo"],
        ["ps", "--bogus"],
        ["review", "--nope"],
        ["land"],
    ],
)
def test_argparse_errors_are_one_line_and_exit_2_in_every_subcommand(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], argv: list[str]
) -> None:
    code, out, err = run(capsys, argv, env)
    assert (code, out) == (2, "")
    assert err.count("\n") == 1 and err.startswith("microvm-run: "), err


@pytest.mark.parametrize("subcommand", [[], ["ps"]])
def test_ctrl_c_is_one_line_and_exit_130(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], spec_file: Path, work: Path,
    monkeypatch: pytest.MonkeyPatch, subcommand: list[str],
) -> None:  # fmt: skip
    from microvm_run import host  # noqa: PLC0415

    def interrupted(*_: Any, **__: Any) -> Any:
        raise KeyboardInterrupt

    # The launch's first host step, and ps's.
    monkeypatch.setattr(host, "gather", interrupted)
    monkeypatch.setattr(host, "runtime_base", interrupted)
    launch = ["--spec", str(spec_file), "--work-dir", str(work), "--dry-run"]
    code, out, err = run(capsys, subcommand or launch, env)
    assert (code, out, err) == (130, "", "microvm-run: interrupted\n")


def test_publish_forwards_host_ports(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], spec_file: Path, work: Path
) -> None:
    plan = dry_run(capsys, env, spec_file, work, "-p", "8080:80", "--publish", "0.0.0.0:2222:22")
    assert plan["port_forwards"] == ["127.0.0.1:8080:80", "0.0.0.0:2222:22"]
    (netdev,) = [plan["qemu_argv"][i + 1] for i, a in enumerate(plan["qemu_argv"])
                 if a == "-netdev"]  # fmt: skip
    assert "hostfwd=tcp:127.0.0.1:8080-10.0.2.15:80" in netdev
    assert "hostfwd=tcp:0.0.0.0:2222-10.0.2.15:22" in netdev


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--net", "none", "-p", "8080:80"], "cannot be combined with --net none"),
        (["-p", "80"], "expected [HOST_ADDR:]HOST_PORT:GUEST_PORT"),
        (["-p", "8080:80", "-p", "8080:81"], "forwarded twice"),
        (["--allow", "a..b"], "allow entry 'a..b'"),
        (["--allow", "http://x.example"], "allow entry 'http://x.example'"),
        (["--inject-keys"], "--inject-keys: the claude flavor has no key proxy routes"),
    ],
)
def test_bad_network_options_are_one_line_exit_2(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], spec_file: Path, work: Path,
    tmp_path: Path, args: list[str], message: str,
) -> None:  # fmt: skip
    code, out, err = run(capsys, ["--spec", str(spec_file), "--work-dir", str(work), *args], env)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "run").exists()


def test_inject_keys_is_on_where_the_flavor_supports_it(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], key_spec_file: Path, work: Path
) -> None:
    env = env | {"ANTHROPIC_API_KEY": "sk-cli-secret-value"}
    plan = dry_run(capsys, env, key_spec_file, work)
    assert plan["inject_keys"] is True
    assert plan["credentials"] == []
    assert "export ANTHROPIC_API_KEY=microvm-run-placeholder" in plan["launch_data"]
    assert [r["var"] for r in plan["egress"]["key_routes"]] == ["ANTHROPIC_API_KEY"]
    code, out, _ = run(capsys, ["--spec", str(key_spec_file), "--work-dir", str(work),
                                "--dry-run"], env)  # fmt: skip
    assert code == 0
    assert "key proxy: ANTHROPIC_API_KEY -> https://api.anthropic.com (x-api-key)" in out
    assert "credential   ANTHROPIC_API_KEY" not in out
    assert "sk-cli-secret-value" not in out


@pytest.mark.parametrize(
    ("args", "extra_env"),
    [(["--no-inject-keys"], {}), ([], {"MICROVM_INJECT_KEYS": "0"}),
     (["--no-inject-keys"], {"MICROVM_INJECT_KEYS": "1"})],
)  # fmt: skip
def test_no_inject_keys_passes_the_key_as_a_credential(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], key_spec_file: Path, work: Path,
    args: list[str], extra_env: dict[str, str],
) -> None:  # fmt: skip
    env = env | {"ANTHROPIC_API_KEY": "sk-cli-secret-value"} | extra_env
    plan = dry_run(capsys, env, key_spec_file, work, *args)
    assert plan["inject_keys"] is False
    assert [var for var, _ in plan["credentials"]] == ["ANTHROPIC_API_KEY"]
    assert "placeholder" not in plan["launch_data"]
    assert "sk-cli-secret-value" not in json.dumps(plan)


def test_dry_run_text_describes_the_egress_policy(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], spec_file: Path, work: Path
) -> None:
    argv = ["--spec", str(spec_file), "--work-dir", str(work), "--dry-run", "--net",
            "allowlist", "--allow", "*.example.com", "-p", "8080:80"]  # fmt: skip
    code, out, _ = run(capsys, argv, env)
    assert code == 0
    assert "egress       allowlist via proxy " in out
    assert "  allowlist: *.example.com" in out
    assert "forward      127.0.0.1:8080:80" in out


# -- dirs the launch writes to -----------------------------------------------------------


def _runnable_spec(tmp_path: Path) -> Path:
    sample = json.loads(json.dumps(SAMPLE))
    true = shutil.which("true")
    assert true is not None
    sample["host"] = {"qemu": true, "virtiofsd": true}
    sample["guest"] |= {"kernel": str(tmp_path / "k"), "initrd": str(tmp_path / "i")}
    (tmp_path / "k").write_text("")
    (tmp_path / "i").write_text("")
    spec = tmp_path / "runnable.toml"
    spec.write_bytes(tomli_w.dumps(sample).encode())
    return spec


def test_an_unwritable_agent_home_is_bad_input_and_nothing_is_created(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], work: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    # The tests may run as root, for whom every mode bit is writable.
    monkeypatch.setattr(
        os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode)
    )
    spec = _runnable_spec(tmp_path)
    argv = ["--spec", str(spec), "--work-dir", str(work), "--accel", "tcg"]
    code, _, err = run(capsys, argv, {**env, "AGENT_HOME": str(locked / "home")})
    assert code == 2 and err.count("\n") == 1
    assert f"AGENT_HOME {locked / 'home'} is not writable" in err
    assert not (locked / "home").exists()


def test_a_full_runtime_file_system_is_bad_input(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], work: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    full = os.statvfs_result((4096, 4096, 100, 0, 0, 100, 0, 0, 0, 255))
    monkeypatch.setattr(os, "statvfs", lambda _path: full)
    spec = _runnable_spec(tmp_path)
    argv = ["--spec", str(spec), "--work-dir", str(work), "--accel", "tcg"]
    code, _, err = run(capsys, argv, {**env, "MICROVM_RUN_ALLOW_ROOT": "1"})
    assert code == 2 and err.count("\n") == 1
    assert "file system is full" in err and "microvm-run gc" in err


def test_root_is_refused_with_one_line_and_creates_nothing(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], work: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    spec = _runnable_spec(tmp_path)
    home = tmp_path / "agent-home"
    argv = ["--spec", str(spec), "--work-dir", str(work), "--accel", "tcg"]
    code, _, err = run(capsys, argv, {**env, "AGENT_HOME": str(home)})
    assert code == 2 and err.count("\n") == 1
    assert "refusing to run as root" in err
    assert not home.exists()


def test_an_agent_home_that_is_a_symlink_is_bad_input(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], work: Path, tmp_path: Path,
) -> None:  # fmt: skip
    spec = _runnable_spec(tmp_path)
    target = tmp_path / "elsewhere"
    target.mkdir()
    home = tmp_path / "agent-home"
    home.symlink_to(target)
    argv = ["--spec", str(spec), "--work-dir", str(work), "--accel", "tcg"]
    code, _, err = run(
        capsys, argv, {**env, "AGENT_HOME": str(home), "MICROVM_RUN_ALLOW_ROOT": "1"}
    )
    assert code == 2 and err.count("\n") == 1
    assert "not a real directory" in err
    assert list(target.iterdir()) == []


# -- words on the command line: subcommands, agent arguments after -- ----------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        # A typo of a subcommand names the closest one.
        (["sotp", "--all"], "'sotp' is not a subcommand (did you mean stop?"),
        (["doctr"], "'doctr' is not a subcommand (did you mean doctor?"),
        # A word near nothing names none, but says where agent arguments go.
        (["stauts", "--dry-run"], "'stauts' is not a subcommand (microvm-run help lists them"),
        (["nosuch", "--help"], "'nosuch' is not a subcommand"),
        # Also after options, and before a `--`.
        (["--dry-run", "resume"], "'resume' is not a subcommand"),
        (["--dry-run", "fix", "--", "x"], "'fix' is not a subcommand"),
        (["--dry-run", "ps"], "the subcommand ps comes first (microvm-run ps ...)"),
        # An option that is not ours is the agent's: it belongs after `--`.
        (["--dry-run", "--resume"], "unknown option --resume: agent arguments go after --"),
        (["--model", "o4-mini"], "(`-- --model o4-mini`;"),
    ],
)
@pytest.mark.parametrize("caller", ["wrapper", "microvm-run"])
def test_a_word_before_dashdash_that_is_no_subcommand_is_refused(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], spec_file: Path, work: Path,
    tmp_path: Path, argv: list[str], message: str, caller: str,
) -> None:  # fmt: skip
    env |= {"WORK_DIR": str(work)}
    if caller == "wrapper":
        # As the flavor wrappers call it: the spec preset in the environment.
        env |= {"MICROVM_RUN_SPEC": str(spec_file)}
    else:
        argv = [*argv[: argv.index("--")], "--spec", str(spec_file), *argv[argv.index("--") :]] \
            if "--" in argv else [*argv, "--spec", str(spec_file)]  # fmt: skip
    code, out, err = run(capsys, argv, env)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("microvm-run: "), err
    assert message in err, err
    assert "agent arguments go after --" in err
    assert not (tmp_path / "data").exists()
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("caller", ["wrapper", "microvm-run"])
def test_everything_after_dashdash_goes_to_the_agent_untouched(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], spec_file: Path, work: Path,
    caller: str,
) -> None:  # fmt: skip
    # The flavor wrappers are microvm-run with MICROVM_RUN_SPEC preset
    # (pkgs/flavor.nix, makeBinaryWrapper's --set-default): `claude-microvm -- ...`.
    env |= {"WORK_DIR": str(work)}
    argv = ["--dry-run", "--json", "--", "--resume", "ps", "--", "--help", "stauts"]
    if caller == "wrapper":
        env |= {"MICROVM_RUN_SPEC": str(spec_file)}
    else:
        argv = ["--spec", str(spec_file), *argv]
    code, out, err = run(capsys, argv, env)
    assert code == 0, err
    launch_data = json.loads(out)["launch_data"]
    assert launch_data.splitlines()[-1] == (
        "set -- claude --dangerously-skip-permissions --resume ps -- --help stauts"
    )


def test_microvm_run_options_still_work_with_the_wrappers_spec(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], spec_file: Path, work: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    other = tmp_path / "other"
    other.mkdir()
    env |= {"MICROVM_RUN_SPEC": str(spec_file), "WORK_DIR": str(work)}
    code, out, _ = run(capsys, ["--work-dir", str(other), "--dry-run", "--json"], env)
    assert code == 0
    plan = json.loads(out)
    assert plan["work_dir"] == str(other)
    assert plan["launch_data"].splitlines()[-1] == "set -- claude --dangerously-skip-permissions"


def test_help_lists_every_subcommand(
    capsys: pytest.CaptureFixture[str], env: dict[str, str]
) -> None:
    code, out, err = run(capsys, ["help"], env)
    assert code == 0 and err == ""
    table = out.split("subcommands (microvm-run SUBCOMMAND --help for each):\n")[1]
    listed = [line.split()[0] for line in table.splitlines()]
    assert listed == list(SUBCOMMANDS)
    code, long_help, _ = run(capsys, ["--help"], env)
    assert code == 0
    assert subcommand_list() in long_help
    assert "--work-dir" in long_help


@pytest.mark.parametrize("name", [name for name in SUBCOMMANDS if name != "help"])
def test_each_subcommand_prints_its_own_usage(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], name: str
) -> None:
    code, out, err = run(capsys, [name, "--help"], env)
    assert code == 0, err
    assert out.startswith(f"usage: microvm-run {name}")
    # `help NAME` is the same text.
    assert run(capsys, ["help", name], env)[1] == out


def test_help_of_an_unknown_subcommand_is_refused(
    capsys: pytest.CaptureFixture[str], env: dict[str, str]
) -> None:
    code, out, err = run(capsys, ["help", "sotp"], env)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "did you mean stop?" in err


def test_a_relative_spec_is_resolved_once_for_the_whole_launch(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], spec_file: Path, work: Path,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    sample = json.loads(json.dumps(SAMPLE))
    # Relative paths in the spec are relative to its directory (a test guest).
    sample["guest"] |= {"kernel": "bzImage", "initrd": "initrd"}
    sample["host"] = {"qemu": "bin/qemu", "virtiofsd": "bin/virtiofsd"}
    guest = tmp_path / "guest"
    guest.mkdir()
    (guest / "spec.toml").write_bytes(tomli_w.dumps(sample).encode())
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "link.toml").symlink_to(guest / "spec.toml")
    for relative in ("guest/spec.toml", "elsewhere/link.toml"):
        monkeypatch.chdir(tmp_path)
        plan = dry_run(capsys, env, Path(relative), work)
        assert plan["spec"] == str(guest / "spec.toml")
        assert plan["qemu_argv"][0] == str(guest / "bin" / "qemu")
        assert plan["qemu_argv"][plan["qemu_argv"].index("-kernel") + 1] == str(guest / "bzImage")
        assert {d["argv"][0] for d in plan["virtiofsd"]} == {str(guest / "bin" / "virtiofsd")}
        # The plan holds in any other directory (where the units start).
        monkeypatch.chdir(work)
        assert _same_but_id(plan, dry_run(capsys, env, guest / "spec.toml", work))


def _same_but_id(one: dict[str, Any], two: dict[str, Any]) -> bool:
    text = json.dumps(two).replace(two["instance_id"], one["instance_id"])
    return bool(json.loads(text) == one)


def test_projects_that_contain_each_other_overlap(tmp_path: Path) -> None:
    project = tmp_path / "src" / "proj"
    (project / "sub").mkdir(parents=True)
    sibling = tmp_path / "src" / "other"
    sibling.mkdir()
    assert projects_overlap(project, project)
    assert projects_overlap(project, project / "sub")  # a VM inside it
    assert projects_overlap(project, tmp_path / "src")  # a VM on a parent
    assert not projects_overlap(project, sibling)
    assert not projects_overlap(project, tmp_path / "src" / "proj-2")


def test_an_agent_home_inside_the_project_is_bad_input(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], work: Path, tmp_path: Path,
) -> None:  # fmt: skip
    spec = _runnable_spec(tmp_path)
    argv = ["--spec", str(spec), "--work-dir", str(work), "--accel", "tcg"]
    code, _, err = run(capsys, argv, {**env, "AGENT_HOME": str(work / ".agent" / "home")})
    assert code == 2 and err.count("\n") == 1
    assert "lies inside the project" in err
    assert not (work / ".agent").exists()


# -- one plan per launch: what --dry-run prints is what launches ------------------------

FAKE_NIX = """#!/bin/sh
# Stands in for nix print-dev-env: counts its calls, prints one variable.
echo call >> "$FAKE_CALLS"
echo '{"variables": {"FROM_DEVSHELL": {"type": "exported", "value": "yes"}}}'
"""


def test_a_launch_plans_once_with_its_slot_and_dev_shell_as_dry_run_showed(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], work: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    from microvm_run import cli, host, localdirs, plan  # noqa: PLC0415

    (work / "flake.nix").write_text("{ }\n")
    (work / "package.json").write_text("{}\n")  # node_modules on the local disk
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nix").write_text(FAKE_NIX)
    (bin_dir / "nix").chmod(0o755)
    calls = tmp_path / "nix-calls"
    env |= {
        "PATH": f"{bin_dir}:{env['PATH']}",
        "FAKE_CALLS": str(calls),
        "DIRENV_ALLOW": "1",
        "MICROVM_RUN_ALLOW_ROOT": "1",
    }
    # Another instance holds disk slot 0: this launch gets 1, and so does the dry run.
    _, held = localdirs.claim_slot(host.project_state_dir(work, env))
    argv = ["--spec", str(_runnable_spec(tmp_path)), "--work-dir", str(work), "--accel", "tcg"]
    try:
        shown = dry_run(capsys, env, Path(argv[1]), work, "--accel", "tcg")
        assert not calls.exists()  # --dry-run evaluates nothing
        assert shown["devshell"].startswith("evaluated at launch")
        built: list[Any] = []
        real_build = plan.build_plan

        def build(*args: Any) -> Any:
            built.append(real_build(*args))
            return built[-1]

        launched: list[Any] = []

        def launch(launch_plan: Any, *_: Any) -> int:
            launched.append(launch_plan)
            return 0

        monkeypatch.setattr(plan, "build_plan", build)
        monkeypatch.setattr(cli, "_launch_logged", launch)
        code, _, err = run(capsys, argv, env)
    finally:
        os.close(held)
    assert code == 0, err
    assert calls.read_text() == "call\n"  # evaluated once, before the one plan
    assert len(built) == 1 and launched == built
    ran = launched[0]
    assert ran.devshell.startswith("dev shell ready")
    assert "MICROVM_DEVSHELL" in ran.launch_data
    assert ran.local_image == localdirs.image_dir(host.project_state_dir(work, env)) / "1.img"
    # Everything --dry-run printed is what ran, but for the instance id and that line.
    ran_dict = {**ran.to_dict(), "devshell": shown["devshell"]}
    assert _same_but_id(shown, ran_dict)
