"""A small typed binding over nix-eval-jobs (v2.26 and later) and its fallback, `nix eval`.

nix-eval-jobs evaluates every derivation below an attribute in parallel and
prints one JSON object per line: a derivation (``drvPath``, ``outputs``,
``extraValue`` from ``--apply``, ``cacheStatus`` with
``--check-cache-status``) or a failure (``error``). ``parse_line`` turns a
line into a ``Derivation`` or a ``Failure`` and refuses anything else, so a
change in its output is an error here, not a silent miss.

The same questions asked of ``nix eval``, one attribute at a time, are the
fallback when nix-eval-jobs is missing (no cache status there). Only argv
builders and parsers live here; check_cli runs them through process.py.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from microvm_run.newvm import nix_string

NIX_FEATURES = ("--extra-experimental-features", "nix-command flakes")

# Applied to every derivation: is it an agent VM (pkgs/flavor.nix's passthru,
# what lib.mkAgentVM returns), and its generated spec (the attrset that
# lib/toml.nix renders into spec.toml, so JSON carries the same values).
APPLY = (
    "d: let agentVM = d ? spec && d ? specFile; in "
    "{ inherit agentVM; spec = if agentVM then d.spec else null; }"
)
# The fallback's per-attribute question: the same, plus what nix-eval-jobs
# reports itself (instantiating only agent VMs).
APPLY_FALLBACK = (
    'd: let isDrv = d.type or null == "derivation"; '
    "agentVM = isDrv && d ? spec && d ? specFile; in "
    "{ inherit isDrv agentVM; spec = if agentVM then d.spec else null; "
    "drvPath = if agentVM then d.drvPath else null; name = if isDrv then d.name else null; "
    'system = if isDrv then d.system or "" else null; }'
)


class EvalJobsError(ValueError):
    """A line that is not what nix-eval-jobs prints."""


class CacheStatus(enum.Enum):
    LOCAL = "local"  # every output is in the local store
    CACHED = "cached"  # a substituter has them
    NOT_BUILT = "notBuilt"  # something must be built


@dataclass(frozen=True)
class Derivation:
    attr: str
    attr_path: tuple[str, ...]
    name: str
    system: str
    drv_path: str
    outputs: Mapping[str, str | None] = field(default_factory=dict)
    extra: Any = None  # extraValue: what APPLY returned
    cache_status: CacheStatus | None = None
    needed_builds: tuple[str, ...] = ()
    needed_substitutes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Failure:
    attr: str
    attr_path: tuple[str, ...]
    error: str


Job = Derivation | Failure


@dataclass(frozen=True)
class Target:
    """What to evaluate: a flake output attribute, or a Nix file (called with its args)."""

    flake: str | None = None  # "REF#ATTR"
    file: Path | None = None
    args: tuple[tuple[str, str, str], ...] = ()  # ("--arg"|"--argstr", name, value)

    def describe(self) -> str:
        return self.flake if self.flake is not None else str(self.file)


def _str(obj: Mapping[str, Any], key: str, line: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise EvalJobsError(f"nix-eval-jobs line without a string {key!r}: {line[:200]}")
    return value


def _strs(value: Any, what: str, line: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise EvalJobsError(f"nix-eval-jobs line with a bad {what}: {line[:200]}")
    return tuple(value)


def parse_line(line: str) -> Job:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise EvalJobsError(
            f"nix-eval-jobs printed a line that is not JSON ({err}): {line[:200]}"
        ) from None
    if not isinstance(obj, dict):
        raise EvalJobsError(f"nix-eval-jobs printed a line that is not an object: {line[:200]}")
    attr = _str(obj, "attr", line)
    path = _strs(obj.get("attrPath"), "attrPath", line)
    if "error" in obj:
        return Failure(attr, path, _str(obj, "error", line))
    outputs = obj.get("outputs", {})
    if not isinstance(outputs, dict):
        raise EvalJobsError(f"nix-eval-jobs line with bad outputs: {line[:200]}")
    raw_status = obj.get("cacheStatus")
    try:
        status = CacheStatus(raw_status) if raw_status is not None else None
    except ValueError:
        raise EvalJobsError(f"unknown cacheStatus {raw_status!r}: {line[:200]}") from None
    return Derivation(
        attr=attr,
        attr_path=path,
        name=_str(obj, "name", line),
        system=_str(obj, "system", line),
        drv_path=_str(obj, "drvPath", line),
        outputs=outputs,
        extra=obj.get("extraValue"),
        cache_status=status,
        needed_builds=_strs(obj.get("neededBuilds"), "neededBuilds", line),
        needed_substitutes=_strs(obj.get("neededSubstitutes"), "neededSubstitutes", line),
    )


def parse_output(text: str) -> list[Job]:
    return [parse_line(line) for line in text.splitlines() if line.strip()]


def eval_jobs_argv(
    binary: str,
    target: Target,
    *,
    workers: int,
    check_cache_status: bool,
    gc_roots_dir: Path,
    extra: Sequence[str] = (),
) -> list[str]:
    argv = [binary, "--workers", str(workers), "--gc-roots-dir", str(gc_roots_dir)]
    argv += ["--option", "extra-experimental-features", "nix-command flakes"]
    argv += ["--apply", APPLY]
    if check_cache_status:
        argv.append("--check-cache-status")
    argv += extra
    for flag, name, value in target.args:
        argv += [flag, name, value]
    if target.flake is not None:
        return [*argv, "--flake", target.flake]
    return [*argv, str(target.file)]


def list_argv(nix: str, target: Target) -> list[str]:
    """`nix eval` of the attribute names below the target (the fallback's first question).

    `nix eval --file` calls a file's function only when given an attribute,
    so the file's case calls it here as nix-eval-jobs would: with the named
    arguments it takes.
    """
    if target.flake is not None:
        return [nix, *NIX_FEATURES, "eval", "--json", target.flake, "--apply", "builtins.attrNames"]
    args = " ".join(
        f"{quote_attr(name)} = {nix_string(value) if flag == '--argstr' else f'({value})'};"
        for flag, name, value in target.args
    )
    expr = (
        f"let f = import (/. + {nix_string(str(target.file))}); a = {{ {args} }}; in "
        "builtins.attrNames (if builtins.isFunction f "
        "then f (builtins.intersectAttrs (builtins.functionArgs f) a) else f)"
    )
    return [nix, *NIX_FEATURES, "eval", "--json", "--impure", "--expr", expr]


def nix_eval_argv(nix: str, target: Target, attr: str | None, apply: str) -> list[str]:
    """`nix eval --json` of one attribute below the target (None: the target itself)."""
    argv = [nix, *NIX_FEATURES, "eval", "--json"]
    for flag, name, value in target.args:
        argv += [flag, name, value]
    if target.flake is not None:
        ref = target.flake if attr is None else f"{target.flake}.{quote_attr(attr)}"
        argv.append(ref)
    else:
        argv += ["--file", str(target.file)]
        if attr is not None:
            argv.append(quote_attr(attr))
    return [*argv, "--apply", apply]


def quote_attr(name: str) -> str:
    simple = name.replace("-", "").replace("_", "").replace("'", "").isalnum()
    return name if simple and not name[:1].isdigit() else json.dumps(name)


def fallback_job(attr: str, stdout: str, returncode: int, stderr: str) -> Job | None:
    """What `nix eval --apply APPLY_FALLBACK` said of one attribute (None: not a derivation)."""
    if returncode != 0:
        return Failure(attr, (attr,), nix_error(stderr))
    try:
        obj = json.loads(stdout)
    except json.JSONDecodeError:
        return Failure(attr, (attr,), f"nix eval printed no JSON: {stdout[:200]}")
    if not isinstance(obj, dict) or not obj.get("isDrv"):
        return None
    return Derivation(
        attr=attr,
        attr_path=(attr,),
        name=str(obj.get("name") or attr),
        system=str(obj.get("system") or ""),
        drv_path=str(obj.get("drvPath") or ""),
        extra={"agentVM": bool(obj.get("agentVM")), "spec": obj.get("spec")},
    )


def nix_error(stderr: str) -> str:
    """Nix's error without the warnings before it (a bare machine's nixbld warning)."""
    lines = stderr.strip().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("error")), 0)
    return "\n".join(lines[start:]) or "nix eval failed without a message"
