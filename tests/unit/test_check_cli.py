"""`microvm-run check`: verdicts from jobs (pure), bad input, and nix-eval-jobs' recorded output.

tests/fixtures/check/eval-jobs-flavors.jsonl is what the real nix-eval-jobs (v2.26.0)
printed for our six flavors evaluated against microvm.nix's real modules, and one that
trips an assertion (tests/nix/check-flavors.nix); `make eval-modules` records it again
and fails when it drifts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from microvm_run import check_cli, evaljobs, newvm
from microvm_run.evaljobs import Derivation, Failure
from tests.support.cli import run

from .conftest import SAMPLE

RECORDED = Path(__file__).resolve().parents[1] / "fixtures" / "check" / "eval-jobs-flavors.jsonl"
# The flavors (newvm.AGENTS, held to lib/flavors.nix by test_newvm), each
# with and without CRI.
FLAVORS = {f"{name}{cri}" for name in newvm.AGENTS for cri in ("", "-cri")}


def vm(attr: str, spec: object, **kw: object) -> Derivation:
    return Derivation(
        attr, (attr,), f"{attr}-microvm", "x86_64-linux", f"/nix/store/x-{attr}.drv",
        extra={"agentVM": True, "spec": spec}, **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def test_verdicts_say_which_vm_evaluates_and_has_a_valid_spec() -> None:
    bad = json.loads(json.dumps(SAMPLE))
    del bad["guest"]["memory_mib"]
    tool = Derivation("tool", ("tool",), "tool", "x86_64-linux", "/d", extra={"agentVM": False})
    report = check_cli.judge(
        [vm("good", SAMPLE), vm("bad", bad), Failure("broken", ("broken",), "error: boom"), tool],
        "test",
    )
    verdicts = {v.attr: v for v in report.verdicts}
    assert verdicts["good"].ok and verdicts["good"].detail.startswith("claude, 4096 MiB, 4 vCPU")
    assert not verdicts["bad"].ok and "memory_mib" in verdicts["bad"].detail
    assert not verdicts["broken"].ok and verdicts["broken"].stage == "eval"
    assert verdicts["broken"].detail == "boom"
    assert report.skipped == ("tool",)
    assert not report.fine
    assert check_cli.judge([vm("good", SAMPLE)], "t").fine


def test_no_agent_vm_at_all_is_not_fine() -> None:
    tool = Derivation("tool", ("tool",), "tool", "x86_64-linux", "/d", extra={"agentVM": False})
    assert not check_cli.judge([tool], "t").fine


def test_the_recorded_nix_eval_jobs_output_parses_and_every_flavor_is_fine() -> None:
    jobs = evaljobs.parse_output(RECORDED.read_text())
    report = check_cli.judge(jobs, "recorded")
    verdicts = {v.attr: v for v in report.verdicts}
    assert set(verdicts) == FLAVORS | {"broken"}
    for name in FLAVORS:
        v = verdicts[name]
        assert v.ok, v
        assert v.cache == "notBuilt"  # a stand-in flavor is never built
        assert v.drv_path.startswith("/nix/store/") and v.drv_path.endswith(f"{name}-microvm.drv")
        assert v.detail.startswith(name.removesuffix("-cri") + ", ")
        assert ("cri-storage" in v.detail) == name.endswith("-cri")
        assert ("8192 MiB" in v.detail) == name.endswith("-cri")
    assert not report.fine


def test_the_recorded_failure_is_the_assertion_on_one_line() -> None:
    jobs = evaljobs.parse_output(RECORDED.read_text())
    failures = [j for j in jobs if isinstance(j, Failure)]
    assert [f.attr for f in failures] == ["broken"]
    broken = next(v for v in check_cli.judge(jobs, "recorded").verdicts if v.attr == "broken")
    assert broken.stage == "eval"
    assert broken.detail.startswith("assertions failed: agent-microvm: add shares through")
    assert "\n" not in broken.detail


def test_the_recorded_output_shows_how_check_reports_it(capsys: pytest.CaptureFixture[str]) -> None:
    report = check_cli.judge(evaljobs.parse_output(RECORDED.read_text()), "nix-eval-jobs")
    check_cli.show(report, evaljobs.Target(flake=".#packages.x86_64-linux"), as_json=False)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("FAIL broken      does not evaluate: assertions failed:")
    assert out[1] == (
        "ok   claude      claude, 4096 MiB, 4 vCPU, microvm, shares nix-store,work,home; "
        "will be built"
    )
    assert out[-1] == (
        f"check: {len(FLAVORS) + 1} agent VMs in .#packages.x86_64-linux: "
        f"{len(FLAVORS)} fine, 1 not (nix-eval-jobs)"
    )


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {"HOME": str(tmp_path), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}


@pytest.mark.parametrize(
    "argv",
    [
        ["check", ".", "--file", "x.nix"],
        ["check", "--file", "/nonexistent.nix"],
        ["check", "--workers", "0"],
        ["check", "--bogus"],
        ["check", "--arg", "-x", "1"],
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], argv: list[str]
) -> None:
    code, out, err = run(capsys, argv, env)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("microvm-run check: ")


def test_dry_run_shows_the_nix_eval_jobs_command(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], tmp_path: Path
) -> None:
    nej = tmp_path / "nej"
    nej.write_text("")
    nej.chmod(0o755)
    env |= {"MICROVM_RUN_NIX_EVAL_JOBS": str(nej)}
    code, out, _ = run(capsys, ["check", "/p", "--check-cache-status", "--dry-run"], env)
    assert code == 0
    assert out.startswith(f"{nej} --workers ")
    assert out.rstrip().endswith("--flake 'path:/p#packages.x86_64-linux'")
    code, out, _ = run(capsys, ["check", "/p#checks", "--no-eval-jobs", "--dry-run"], env)
    assert out.startswith("nix --extra-experimental-features")
    assert "'path:/p#checks' --apply builtins.attrNames" in out
    # A MICROVM_RUN_NIX_EVAL_JOBS that is no program counts as none.
    env |= {"MICROVM_RUN_NIX_EVAL_JOBS": str(tmp_path / "missing")}
    code, out, _ = run(capsys, ["check", "/p", "--dry-run"], env)
    assert out.startswith("nix --extra-experimental-features")


def test_without_any_nix_check_says_so_and_fails(
    capsys: pytest.CaptureFixture[str], env: dict[str, str], tmp_path: Path
) -> None:
    env |= {"PATH": str(tmp_path), "MICROVM_RUN_NIX": str(tmp_path / "no-nix")}
    code, _, err = run(capsys, ["check", str(tmp_path)], env)
    assert code == 1
    assert "nix-eval-jobs not found: evaluating with nix eval" in err
    assert "cannot run" in err or "not found" in err.splitlines()[-1]
