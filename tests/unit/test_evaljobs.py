"""evaljobs: nix-eval-jobs' JSON lines in, typed jobs out; the argv of it and of `nix eval`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from microvm_run import evaljobs
from microvm_run.evaljobs import CacheStatus, Derivation, EvalJobsError, Failure, Target

DRV = {
    "attr": "claude",
    "attrPath": ["claude"],
    "drvPath": "/nix/store/aaaa-claude-microvm.drv",
    "name": "claude-microvm",
    "system": "x86_64-linux",
    "outputs": {"out": "/nix/store/bbbb-claude-microvm"},
    "extraValue": {"agentVM": True, "spec": {"spec_version": 2}},
    "cacheStatus": "notBuilt",
    "isCached": False,
    "neededBuilds": ["/nix/store/aaaa-claude-microvm.drv", "/nix/store/cccc-x.drv"],
    "neededSubstitutes": ["/nix/store/dddd-glibc"],
}


def test_a_derivation_line_becomes_a_derivation_with_its_cache_status() -> None:
    job = evaljobs.parse_line(json.dumps(DRV))
    assert isinstance(job, Derivation)
    assert job.attr == "claude" and job.attr_path == ("claude",)
    assert job.drv_path == "/nix/store/aaaa-claude-microvm.drv"
    assert job.outputs == {"out": "/nix/store/bbbb-claude-microvm"}
    assert job.extra == {"agentVM": True, "spec": {"spec_version": 2}}
    assert job.cache_status is CacheStatus.NOT_BUILT
    assert len(job.needed_builds) == 2 and job.needed_substitutes == ("/nix/store/dddd-glibc",)


def test_without_check_cache_status_there_is_no_status() -> None:
    line = {k: v for k, v in DRV.items() if k not in ("cacheStatus", "isCached", "neededBuilds")}
    job = evaljobs.parse_line(json.dumps(line))
    assert isinstance(job, Derivation)
    assert job.cache_status is None and job.needed_builds == ()


def test_an_error_line_becomes_a_failure() -> None:
    line = {"attr": "x", "attrPath": ["x"], "error": "error: boom\n   at x.nix:1:1"}
    job = evaljobs.parse_line(json.dumps(line))
    assert job == Failure("x", ("x",), "error: boom\n   at x.nix:1:1")


@pytest.mark.parametrize(
    "line",
    [
        "not json",
        "[1]",
        json.dumps({k: v for k, v in DRV.items() if k != "attr"}),
        json.dumps({k: v for k, v in DRV.items() if k != "drvPath"}),
        json.dumps(DRV | {"cacheStatus": "maybe"}),
        json.dumps(DRV | {"neededBuilds": "one"}),
        json.dumps(DRV | {"outputs": ["out"]}),
        json.dumps({"attr": "x", "attrPath": ["x"], "error": 1}),
    ],
)
def test_a_line_nix_eval_jobs_does_not_print_is_an_error(line: str) -> None:
    with pytest.raises(EvalJobsError):
        evaljobs.parse_line(line)


def test_blank_lines_are_ignored() -> None:
    assert len(evaljobs.parse_output(f"\n{json.dumps(DRV)}\n\n")) == 1


def test_eval_jobs_argv_for_a_flake_and_for_a_file() -> None:
    flake = evaljobs.eval_jobs_argv(
        "nej",
        Target(flake=".#packages.x86_64-linux"),
        workers=2,
        check_cache_status=True,
        gc_roots_dir=Path("/r"),
    )
    assert flake[:5] == ["nej", "--workers", "2", "--gc-roots-dir", "/r"]
    assert flake[flake.index("--apply") + 1] == evaljobs.APPLY
    assert "--check-cache-status" in flake
    assert flake[-2:] == ["--flake", ".#packages.x86_64-linux"]
    file = evaljobs.eval_jobs_argv(
        "nej",
        Target(file=Path("/f.nix"), args=(("--arg", "lib", "/l"), ("--argstr", "s", "v"))),
        workers=1,
        check_cache_status=False,
        gc_roots_dir=Path("/r"),
    )
    assert "--check-cache-status" not in file
    assert file[-7:] == ["--arg", "lib", "/l", "--argstr", "s", "v", "/f.nix"]


def test_nix_eval_argv_quotes_attribute_names() -> None:
    target = Target(flake="path:/p#packages.x86_64-linux")
    argv = evaljobs.nix_eval_argv("nix", target, "codex-cri", "A")
    assert "path:/p#packages.x86_64-linux.codex-cri" in argv
    dotted = evaljobs.nix_eval_argv("nix", target, "a.b", "A")
    assert dotted[-3] == 'path:/p#packages.x86_64-linux."a.b"'
    file = evaljobs.nix_eval_argv("nix", Target(file=Path("/f.nix")), "x", "A")
    assert file[-5:] == ["--file", "/f.nix", "x", "--apply", "A"]


def test_list_argv_calls_a_files_function_with_its_arguments() -> None:
    args = (("--arg", "x", "1 + 1"), ("--argstr", "s", 'q"${'))
    argv = evaljobs.list_argv("nix", Target(file=Path("/a b.nix"), args=args))
    expr = argv[argv.index("--expr") + 1]
    assert '(/. + "/a b.nix")' in expr
    assert "x = (1 + 1);" in expr
    assert 's = "q\\"\\${";' in expr
    assert "--impure" in argv


def test_fallback_results() -> None:
    said = {"isDrv": True, "agentVM": True, "spec": {"a": 1}, "drvPath": "/d", "name": "n"}
    agent = json.dumps(said | {"system": "s"})
    job = evaljobs.fallback_job("claude", agent, 0, "")
    assert job == Derivation(
        "claude", ("claude",), "n", "s", "/d", extra={"agentVM": True, "spec": {"a": 1}}
    )
    assert evaljobs.fallback_job("v", json.dumps({"isDrv": False}), 0, "") is None
    failed = evaljobs.fallback_job(
        "b", "", 1, "warning: the group 'nixbld' does not exist\nerror: boom\n  at x"
    )
    assert failed == Failure("b", ("b",), "error: boom\n  at x")
