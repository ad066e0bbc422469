"""ops_cli: parsing, printing and exit statuses of ps, stop, gc and doctor."""

from __future__ import annotations

import io
import json
import os
from datetime import UTC
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from microvm_run import cli, ops, ops_cli
from microvm_run.ops_cli import main

from .conftest import SAMPLE
from .test_state import make_home, make_instance, own_process


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    # XDG_RUNTIME_DIR without systemd/private: no user manager answers.
    return {
        "HOME": str(tmp_path / "home"),
        "XDG_DATA_HOME": str(tmp_path / "data"),
        "XDG_RUNTIME_DIR": str(runtime),
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
    }


@pytest.fixture
def base(env: dict[str, str]) -> Path:
    path = Path(env["XDG_RUNTIME_DIR"]) / "microvm-run"
    path.mkdir(mode=0o700)
    return path


@pytest.fixture
def no_tty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(""))


def run(capsys: pytest.CaptureFixture[str], argv: list[str], env: dict[str, str], **kw: Any) -> Any:
    code = main(argv, env, **kw)
    out, err = capsys.readouterr()
    return code, out, err


def test_the_subcommands_cli_main_dispatches() -> None:
    assert ops_cli.SUBCOMMANDS == ("ps", "stop", "gc", "doctor")
    assert set(ops_cli.SUBCOMMANDS) <= set(cli.SUBCOMMANDS)


def test_a_subcommand_module_registers_with_one_line(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # What a subcommand in its own module adds to cli.SUBCOMMANDS.
    entry = cli.Subcommand("list running instances", cli._module("microvm_run.ops_cli"))
    monkeypatch.setitem(cli.SUBCOMMANDS, "ps", entry)
    assert cli.main(["ps"], env) == 0
    assert capsys.readouterr().out == "no running instances\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        ([], "the following arguments are required: COMMAND"),
        (["ps", "--yaml"], "unrecognized arguments: --yaml"),
        (["stop"], "name the instances to stop"),
        (["stop", "ab", "--all"], "not both"),
        (["stop", "--all", "--timeout", "soon"], "--timeout must be a number"),
        (["stop", "--all", "--timeout", "-1"], "0 or more seconds"),
        (["stop", "--all", "--timeout", "nan"], "0 or more seconds"),
        (["stop", "ffff"], "no instance 'ffff'"),
        (["doctor", "--accel", "hvf"], "invalid choice: 'hvf'"),
        (["doctor", "--boot"], "doctor --boot is not available"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], argv: list[str], message: str
) -> None:
    code, out, err = run(capsys, argv, env)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith("microvm-run: ")
    assert message in err


def test_help_exits_0(capsys: pytest.CaptureFixture[str], env: dict[str, str]) -> None:
    code, out, _ = run(capsys, ["stop", "--help"], env)
    assert code == 0
    assert "--timeout" in out


# -- ps --------------------------------------------------------------------------------------


def live_instance(base: Path, env: dict[str, str], instance_id: str = "ab12cd34") -> Path:
    me = own_process()
    return make_instance(
        base,
        instance_id,
        **me,
        qemu_pid=me["runner_pid"],
        qemu_start=me["runner_start"],
        virtiofsd_pids=(),
        virtiofsd_starts=(),
        project=Path(env["HOME"]) / "src" / "webapp",
        ports=("127.0.0.1:8080:80", "127.0.0.1:2222:22"),
    )


def test_ps_table(capsys: pytest.CaptureFixture[str], env: dict[str, str], base: Path) -> None:
    live_instance(base, env)
    code, out, err = run(capsys, ["ps"], env)
    assert code == 0
    assert err == ""
    header, row = out.splitlines()
    assert header.split() == [
        "ID", "AGENT", "PROJECT", "STARTED", "PID", "MEM", "NET", "PORTS", "BRANCH"
    ]  # fmt: skip
    cells = row.split()
    assert cells[:3] == ["ab12cd34", "claude", "~/src/webapp"]
    assert cells[5] == str(os.getpid())
    assert cells[6][-1] in "MG"
    assert cells[7:] == ["open", "127.0.0.1:8080:80,127.0.0.1:2222:22", "-"]
    # Columns line up: each header word starts where its cell does.
    assert row.index("ab12cd34") == header.index("ID")
    assert row.index("open") == header.index("NET")


def test_ps_json_and_the_stale_note(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], base: Path
) -> None:
    live_instance(base, env)
    make_instance(base, "dead0001", runner_pid=999_999_999, runner_start=5)
    code, out, err = run(capsys, ["ps", "--json"], env)
    assert code == 0
    (row,) = json.loads(out)
    assert row["id"] == "ab12cd34"
    assert row["runner_pid"] == os.getpid()
    assert row["memory_kib"] > 0
    assert row["ports"] == ["127.0.0.1:8080:80", "127.0.0.1:2222:22"]
    assert err == "microvm-run: 1 stale instance: run microvm-run gc\n"


def test_ps_with_nothing_running_says_so_in_one_line(
    capsys: pytest.CaptureFixture[str], env: dict[str, str]
) -> None:
    code, out, err = run(capsys, ["ps"], env)
    assert code == 0
    assert (out, err) == ("no running instances\n", "")
    # The JSON form stays a list, empty.
    code, out, _ = run(capsys, ["ps", "--json"], env)
    assert json.loads(out) == []


def test_human_sizes_and_times() -> None:
    assert ops_cli.human_kib(None) == "-"
    assert ops_cli.human_kib(900) == "900K"
    assert ops_cli.human_kib(312 * 1024) == "312M"
    assert ops_cli.human_kib(int(1.5 * 1024 * 1024)) == "1.5G"
    assert ops_cli.format_started("2026-11-22T10:00:00+00:00", UTC) == "2026-11-22 10:00"
    assert ops_cli.format_started("garbage") == "garbage"


def test_the_table_shortens_only_paths_under_home() -> None:
    row = ops.PsRow("id", "claude", Path("/home/alicex/p"), "2026-11-22T10:00:00+00:00",
                    1, 0, None, "none", ())  # fmt: skip
    table = ops_cli.format_table([row], "/home/alice", UTC)
    assert "/home/alicex/p" in table
    assert table.splitlines()[1].split()[-4:] == ["-", "none", "-", "-"]


# -- stop -----------------------------------------------------------------------------------


def test_stop_a_stale_instance_says_so(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], base: Path
) -> None:
    make_instance(base, "dead0001", runner_pid=999_999_999, runner_start=5)
    code, out, _ = run(capsys, ["stop", "dead"], env)
    assert code == 0
    assert out.startswith("dead0001  not running (its runner has exited")


def test_stop_all_with_nothing_running(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], base: Path
) -> None:
    code, out, err = run(capsys, ["stop", "--all"], env)
    assert code == 0
    assert out == ""
    assert err == "microvm-run: no running instances\n"


# -- gc ---------------------------------------------------------------------------------------


def orphan(tmp_path: Path, env: dict[str, str], name: str) -> Path:
    project = tmp_path / name
    project.mkdir()
    path = make_home(Path(env["XDG_DATA_HOME"]), project)
    project.rmdir()
    return path


def test_gc_reports_what_it_removed(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], base: Path
) -> None:
    dead = make_instance(base, "dead0001", runner_pid=999_999_999, runner_start=5, units=())
    live_instance(base, env)
    code, out, _ = run(capsys, ["gc"], env)
    assert code == 0
    assert f"dead0001: removed {dead}" in out.splitlines()
    assert "1 running instance left alone" in out
    assert not dead.exists()


def test_gc_with_nothing_to_do(capsys: pytest.CaptureFixture[str], env: dict[str, str]) -> None:
    code, out, _ = run(capsys, ["gc"], env)
    assert (code, out) == (0, "nothing to clean up\n")


def test_gc_prune_without_a_terminal_refuses_and_deletes_nothing(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], base: Path, tmp_path: Path,
    no_tty: None,
) -> None:  # fmt: skip
    home = orphan(tmp_path, env, "gone")
    dead = make_instance(base, "dead0001", runner_pid=999_999_999, runner_start=5, units=())
    code, out, err = run(capsys, ["gc", "--prune"], env)
    assert code == 2
    assert out == ""
    assert "--yes" in err
    assert err.count("\n") == 1
    assert home.exists()
    assert dead.exists()


def test_gc_prune_asks_each_home(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], tmp_path: Path
) -> None:
    keep = orphan(tmp_path, env, "keep")
    drop = orphan(tmp_path, env, "drop")
    questions: list[str] = []

    def ask(question: str) -> str:
        questions.append(question)
        return "y" if str(drop) in question else "n"

    code, out, _ = run(capsys, ["gc", "--prune"], env, ask=ask)
    assert code == 0
    assert len(questions) == 2
    assert all(q.endswith(" is gone)? [y/N] ") for q in questions)
    assert keep.exists()
    assert not drop.exists()
    assert f"home {drop}: deleted" in out


def test_gc_prune_yes_and_an_eof_answer(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], tmp_path: Path
) -> None:
    first = orphan(tmp_path, env, "first")

    def eof(_: str) -> str:
        raise EOFError

    assert run(capsys, ["gc", "--prune"], env, ask=eof)[0] == 0
    assert first.exists()
    assert run(capsys, ["gc", "--prune", "--yes"], env, ask=eof)[0] == 0
    assert not first.exists()


# -- doctor --------------------------------------------------------------------------------------


def test_doctor_prints_one_line_per_check_and_fails_without_a_spec(
    capsys: pytest.CaptureFixture[str], env: dict[str, str]
) -> None:
    code, out, _ = run(capsys, ["doctor", "--accel", "tcg"], env)
    assert code == 1
    lines = out.splitlines()
    assert any(line.startswith("FAIL  spec: none given") for line in lines)
    assert all(line.split()[0] in ("ok", "warn", "FAIL") for line in lines)


def test_doctor_boot_calls_the_given_function(
    capsys: pytest.CaptureFixture[str], env: dict[str, str]
) -> None:
    called: list[Any] = []

    def boot(*args: Any) -> int:
        called.append(args)
        return 0

    code, out, _ = run(capsys, ["doctor", "--boot"], env, boot=boot)
    # The spec did not load, so the boot is reported as skipped, not attempted.
    assert code == 1
    assert called == []
    assert "FAIL  boot: skipped" in out


def test_doctor_boot_gets_the_spec_and_accel(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], tmp_path: Path
) -> None:
    spec = tmp_path / "spec.toml"
    spec.write_text(tomli_w.dumps(SAMPLE))
    called: list[Any] = []

    def boot(*args: Any) -> int:
        called.append(args)
        return 0

    code, out, _ = run(
        capsys,
        ["doctor", "--boot", "--accel", "tcg"],
        env | {"MICROVM_RUN_SPEC": str(spec)},
        boot=boot,
    )
    assert called == [(spec, "tcg")]
    assert out.splitlines()[-1].startswith("ok    boot: booted and ran `true` in ")
    assert code == 1  # the sample spec's store paths do not exist here
