"""`microvm-run allow` and `denied`: bad input is one line and exit 2, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest

from microvm_run import allow_cli, denied_cli


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["x1", "not a host!"], "is not a host name"),
        (["x1", "a.example", "--once", "--project"], "not allowed with argument"),
        (["x1", "a.example:99999"], "port must be 1..65535"),
        (["nosuch", "a.example"], "no instance 'nosuch'"),
        ([], "the following arguments are required"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    env = {"HOME": str(tmp_path), "XDG_RUNTIME_DIR": str(run)}
    assert allow_cli.main(["allow", *args], env) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / ".config").exists()


def test_denied_of_an_unknown_instance_is_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = {"HOME": str(tmp_path), "XDG_RUNTIME_DIR": str(tmp_path)}
    assert denied_cli.main(["denied", "nosuch"], env) == 2
    assert capsys.readouterr().err.count("\n") == 1
