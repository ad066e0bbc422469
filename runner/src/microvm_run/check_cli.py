"""``microvm-run check [FLAKE_REF]``: evaluate every agent VM of a flake, in parallel.

Each derivation below the target (default ``packages.x86_64-linux``) that is
an agent VM (what ``lib.mkAgentVM`` returns: a derivation with ``spec`` and
``specFile``) is reported: whether it evaluates (or its error), whether its
generated spec passes the runner's own schema (spec.py), and with
``--check-cache-status`` what would be built versus fetched. nix-eval-jobs
does the evaluation (evaljobs.py); without it, ``nix eval`` asks the same one
attribute at a time, and says so.

Exit status: 0 every agent VM is fine; 1 one is not, none was found, or the
evaluation could not run; 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from microvm_run import evaljobs, host, process, usage
from microvm_run.contract import EXIT_BAD_INPUT
from microvm_run.egresslog import printable
from microvm_run.evaljobs import Derivation, Failure, Job, Target
from microvm_run.newvm import FLAKE_SYSTEM
from microvm_run.spec import SpecError, parse_spec

EXIT_NOT_FINE = 1
API_KEY_VARS = ("ANTHROPIC_API_KEY", "GEMINI_API_KEY", "OPENAI_API_KEY")


@dataclass(frozen=True)
class Verdict:
    """One agent VM's result (or one attribute that failed to evaluate)."""

    attr: str
    ok: bool
    stage: str  # "spec" (it evaluated; the spec was checked) or "eval" (it did not evaluate)
    detail: str  # the spec's summary, or the error
    cache: str | None = None  # local | cached | notBuilt (nix-eval-jobs --check-cache-status)
    to_build: int = 0
    to_fetch: int = 0
    drv_path: str = ""


@dataclass(frozen=True)
class Report:
    verdicts: tuple[Verdict, ...]
    skipped: tuple[str, ...]  # derivations that are no agent VM
    evaluator: str  # how it was evaluated, for the summary line

    @property
    def fine(self) -> bool:
        return bool(self.verdicts) and all(v.ok for v in self.verdicts)


class CheckError(Exception):
    """The evaluation could not run at all (no Nix, a flake that does not load)."""


def parser() -> argparse.ArgumentParser:
    p = usage.Parser(
        prog="microvm-run check",
        description=(
            "Evaluate every agent VM of a flake in parallel (nix-eval-jobs; nix eval one at a "
            "time without it): per VM, whether it evaluates, whether its spec is valid, and "
            "with --check-cache-status what will be built versus fetched."
        ),
        epilog=(
            f"FLAKE_REF defaults to . and its attribute to packages.{FLAKE_SYSTEM}; "
            "name another with FLAKE#ATTR. "
            "exit status: 0 every agent VM is fine; 1 not; 2 bad input. "
            "environment: MICROVM_RUN_NIX_EVAL_JOBS, MICROVM_RUN_NIX (the programs to use)."
        ),
    )
    p.add_argument("flake", nargs="?", metavar="FLAKE_REF", help="a flake, optionally #ATTR")
    p.add_argument("--file", help="a Nix file instead of a flake (its function is called)")
    p.add_argument("--arg", nargs=2, action="append", default=[], metavar=("NAME", "EXPR"))
    p.add_argument("--argstr", nargs=2, action="append", default=[], metavar=("NAME", "STRING"))
    p.add_argument("--system", default=FLAKE_SYSTEM, help=f"for packages.SYSTEM ({FLAKE_SYSTEM})")
    p.add_argument(
        "--check-cache-status",
        action="store_true",
        help="say what would be built and what fetched (needs nix-eval-jobs)",
    )
    p.add_argument("--workers", type=int, default=None, help="evaluation workers (nix-eval-jobs)")
    p.add_argument(
        "--no-eval-jobs", action="store_true", help="use nix eval even if nix-eval-jobs is there"
    )
    p.add_argument("--json", action="store_true", help="one JSON object per VM")
    p.add_argument("--dry-run", action="store_true", help="print the commands; evaluate nothing")
    p.add_argument(
        "--save-output",
        metavar="FILE",
        help="write nix-eval-jobs' JSON lines to FILE, sorted by attribute (make eval-modules)",
    )
    return p


def main(argv: Sequence[str], environ: Mapping[str, str]) -> int:
    try:
        args = parser().parse_args(list(argv[1:]))
        target = _target(args)
    except SystemExit as done:  # --help
        return done.code if isinstance(done.code, int) else 0
    except usage.UsageError as err:
        print(f"microvm-run check: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    env = process.without(environ, API_KEY_VARS)
    eval_jobs = None if args.no_eval_jobs else find_eval_jobs(environ)
    nix = environ.get("MICROVM_RUN_NIX") or "nix"
    workers = args.workers or min(4, os.cpu_count() or 1)
    if args.dry_run:
        if eval_jobs is not None:
            cmd = evaljobs.eval_jobs_argv(
                eval_jobs,
                target,
                workers=workers,
                check_cache_status=args.check_cache_status,
                gc_roots_dir=Path("GC_ROOTS"),
            )
        else:
            cmd = evaljobs.list_argv(nix, target)
        print(" ".join(_shell_word(w) for w in cmd))
        return 0
    try:
        if eval_jobs is not None:
            report = check_with_eval_jobs(
                eval_jobs,
                target,
                env,
                workers=workers,
                cache=args.check_cache_status,
                save=Path(args.save_output) if args.save_output else None,
            )
        else:
            why = "--no-eval-jobs" if args.no_eval_jobs else "nix-eval-jobs not found"
            note = "; no cache status without it" if args.check_cache_status else ""
            process.log(f"check: {why}: evaluating with nix eval, one VM at a time{note}")
            report = check_with_nix_eval(nix, target, env)
    except CheckError as err:
        print(f"microvm-run check: {printable(str(err), spaces=True)}", file=sys.stderr)
        return EXIT_NOT_FINE
    show(report, target, as_json=args.json)
    return 0 if report.fine else EXIT_NOT_FINE


def _target(args: argparse.Namespace) -> Target:
    pairs = [("--arg", n, v) for n, v in args.arg] + [("--argstr", n, v) for n, v in args.argstr]
    if args.workers is not None and not 1 <= args.workers <= 64:
        raise usage.UsageError(f"--workers {args.workers}: between 1 and 64")
    for _, name, value in pairs:
        if not name or name.startswith("-") or "\n" in name:
            raise usage.UsageError(f"bad argument name {name!r}")
        if value.startswith("-") and value != "-":
            raise usage.UsageError(f"argument {name}: a value starting with - is ambiguous")
    if args.file is not None:
        if args.flake is not None:
            raise usage.UsageError("give a FLAKE_REF or --file, not both")
        path = Path(args.file).expanduser().resolve()
        if not path.is_file():
            raise usage.UsageError(f"--file {args.file}: no such file")
        return Target(file=path, args=tuple(pairs))
    ref = args.flake or "."
    if ref.startswith("-") or any(c in ref for c in "\n\0"):
        raise usage.UsageError(f"bad flake reference {ref!r}")
    where, hash_, attr = ref.partition("#")
    if ":" not in where:
        # A local directory is evaluated as `path:`, as the dev shell is: Nix
        # then runs no git on a .git the agent may have written (its
        # fsmonitor, filters), and sees the files `new` wrote before they
        # are committed.
        where = f"path:{Path(where).expanduser().resolve()}"
    ref = f"{where}#{attr}" if hash_ else f"{where}#packages.{args.system}"
    return Target(flake=ref, args=tuple(pairs))


def find_eval_jobs(environ: Mapping[str, str]) -> str | None:
    """MICROVM_RUN_NIX_EVAL_JOBS if it is a program, else nix-eval-jobs on PATH, else None."""
    explicit = environ.get("MICROVM_RUN_NIX_EVAL_JOBS")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) and os.path.isfile(explicit) else None
    return host.which("nix-eval-jobs", environ)


def _shell_word(word: str) -> str:
    import shlex  # noqa: PLC0415

    return shlex.quote(word)


# -- evaluating -----------------------------------------------------------------------------


def check_with_eval_jobs(
    binary: str,
    target: Target,
    env: Mapping[str, str],
    *,
    workers: int,
    cache: bool,
    save: Path | None = None,
) -> Report:
    with tempfile.TemporaryDirectory(prefix="microvm-run-check-") as roots:
        argv = evaljobs.eval_jobs_argv(
            binary, target, workers=workers, check_cache_status=cache, gc_roots_dir=Path(roots)
        )
        try:
            done = process.run(argv, env=env)
        except process.ProcessError as err:
            raise CheckError(str(err)) from None
    try:
        jobs = evaljobs.parse_output(done.stdout)
    except evaljobs.EvalJobsError as err:
        raise CheckError(str(err)) from None
    if done.returncode != 0 and not jobs:
        raise CheckError(f"nix-eval-jobs failed on {target.describe()}: {_last_error(done.stderr)}")
    if save is not None:
        lines = sorted((line for line in done.stdout.splitlines() if line.strip()), key=_attr_of)
        save.write_text("".join(f"{line}\n" for line in lines))
    return judge(jobs, f"nix-eval-jobs, {workers} worker{'s' if workers != 1 else ''}")


def check_with_nix_eval(nix: str, target: Target, env: Mapping[str, str]) -> Report:
    try:
        listed = process.run(evaljobs.list_argv(nix, target), env=env)
    except process.ProcessError as err:
        raise CheckError(f"{err} (and nix-eval-jobs was not used)") from None
    if listed.returncode != 0:
        raise CheckError(f"nix eval failed on {target.describe()}: {_last_error(listed.stderr)}")
    try:
        names = json.loads(listed.stdout)
    except json.JSONDecodeError:
        names = None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise CheckError(f"{target.describe()} is not an attribute set")
    jobs: list[Job] = []
    for name in names:
        argv = evaljobs.nix_eval_argv(nix, target, name, evaljobs.APPLY_FALLBACK)
        done = process.run(argv, env=env)
        job = evaljobs.fallback_job(name, done.stdout, done.returncode, done.stderr)
        if job is not None:
            jobs.append(job)
    return judge(jobs, "nix eval, one at a time")


def _attr_of(line: str) -> str:
    return str(json.loads(line).get("attr", ""))


def _last_error(stderr: str) -> str:
    return evaljobs.nix_error(stderr).splitlines()[0] if stderr.strip() else "no message"


def judge(jobs: Sequence[Job], evaluator: str) -> Report:
    """Each job's verdict: its evaluation error, or its spec checked by spec.py (pure)."""
    verdicts: list[Verdict] = []
    skipped: list[str] = []
    for job in sorted(jobs, key=lambda j: j.attr):
        if isinstance(job, Failure):
            verdicts.append(Verdict(job.attr, False, "eval", _brief_error(job.error)))
            continue
        extra = job.extra if isinstance(job.extra, dict) else {}
        if not extra.get("agentVM"):
            skipped.append(job.attr)
            continue
        verdicts.append(_spec_verdict(job, extra.get("spec")))
    return Report(tuple(verdicts), tuple(skipped), evaluator)


def _spec_verdict(job: Derivation, raw: object) -> Verdict:
    base = Verdict(
        job.attr,
        False,
        "spec",
        "no spec attribute set",
        cache=job.cache_status.value if job.cache_status is not None else None,
        to_build=len(job.needed_builds),
        to_fetch=len(job.needed_substitutes),
        drv_path=job.drv_path,
    )
    if not isinstance(raw, dict):
        return base
    try:
        spec = parse_spec(raw, Path(job.attr))
    except SpecError as err:
        return replace(base, detail=str(err))
    summary = (
        f"{spec.agent}, {spec.memory_mib} MiB, {spec.vcpus} vCPU, {spec.machine}, "
        f"shares {','.join(s.source for s in spec.shares)}"
    )
    return replace(base, ok=True, detail=summary)


def _brief_error(error: str) -> str:
    """Nix's error on one line: from its last `error:` on, without the trace before it."""
    lines = [line.strip() for line in error.strip().splitlines() if line.strip()]
    starts = [i for i, line in enumerate(lines) if line.startswith("error:")]
    said = lines[starts[-1] :] if starts else lines[-1:]
    said = [line for line in said if not line.startswith("(use '--show-trace'")]
    text = " ".join(said).removeprefix("error:").strip()
    return (text[:300] + "...") if len(text) > 300 else (text or "evaluation failed")


# -- reporting ------------------------------------------------------------------------------


def show(report: Report, target: Target, *, as_json: bool) -> None:
    if as_json:
        for verdict in report.verdicts:
            print(json.dumps(asdict(verdict), sort_keys=True))
        return
    # Attribute names and Nix's errors come from files the agent may have
    # written: no byte of them reaches the terminal unescaped.
    width = max((len(printable(v.attr)) for v in report.verdicts), default=0)
    for v in report.verdicts:
        mark = "ok  " if v.ok else "FAIL"
        if v.ok:
            what = v.detail
        elif v.stage == "eval":
            what = f"does not evaluate: {v.detail}"
        else:
            what = f"bad spec: {v.detail}"
        line = f"{printable(v.attr).ljust(width)}  {printable(what, spaces=True)}"
        print(f"{mark} {line}{_cache_text(v)}")
    if report.skipped:
        print(f"not agent VMs: {printable(', '.join(report.skipped), spaces=True)}")
    good = sum(v.ok for v in report.verdicts)
    if not report.verdicts:
        print(f"check: no agent VM in {target.describe()} ({report.evaluator})")
        return
    print(
        f"check: {len(report.verdicts)} agent VMs in {target.describe()}: {good} fine, "
        f"{len(report.verdicts) - good} not ({report.evaluator})"
    )


def _cache_text(v: Verdict) -> str:
    """nix-eval-jobs' cache status: what the first start of the VM builds or fetches."""
    if v.cache is None:
        return ""
    said = {"local": "in the store", "cached": "will be fetched", "notBuilt": "will be built"}
    counts = [
        f"{n} {what}" for n, what in ((v.to_build, "to build"), (v.to_fetch, "to fetch")) if n
    ]
    return f"; {said.get(v.cache, v.cache)}" + (f" ({', '.join(counts)})" if counts else "")
