"""``microvm-run skill``: the agent skill that creates VMs with ``new`` and ``check``.

``skill install [--agent A]`` copies skills/create-agent-vm/SKILL.md into that
agent's user skills directory; ``skill show`` prints it. The skill ships with
the package (``MICROVM_RUN_SKILLS``, set by pkgs/microvm-run.nix) or is read
from the checkout.

Exit status: 0 installed (or already there); 1 refused (an installed copy
that differs, without --force); 2 bad input.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from microvm_run import safefs, usage
from microvm_run.contract import EXIT_BAD_INPUT
from microvm_run.newvm import AGENTS

SKILL = "create-agent-vm"
EXIT_REFUSED = 1
MAX_SKILL = 1 << 20


def skills_dirs(environ: Mapping[str, str]) -> dict[str, Path]:
    """Each agent's user-level skills directory (Claude Code, Gemini CLI, Codex CLI, Qwen Code)."""
    home = Path(environ.get("HOME") or os.path.expanduser("~"))
    codex_home = Path(environ["CODEX_HOME"]) if environ.get("CODEX_HOME") else home / ".codex"
    return {
        "claude": home / ".claude" / "skills",
        "gemini": home / ".gemini" / "skills",
        "codex": codex_home / "skills",
        "qwen": home / ".qwen" / "skills",
    }


def source_dir(environ: Mapping[str, str]) -> Path:
    shipped = environ.get("MICROVM_RUN_SKILLS")
    if shipped:
        return Path(shipped)
    # A checkout: runner/src/microvm_run/ -> the repository's skills/.
    return Path(__file__).resolve().parents[3] / "skills"


def parser() -> argparse.ArgumentParser:
    p = usage.Parser(
        prog="microvm-run skill",
        description=f"The {SKILL} skill: an agent creates and verifies VMs with new and check.",
    )
    commands = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    install = commands.add_parser("install", help="install the skill for an agent")
    install.add_argument("--agent", default="claude", choices=AGENTS)
    install.add_argument("--dir", help="a skills directory instead of the agent's own")
    install.add_argument("--force", action="store_true", help="replace a copy that differs")
    install.add_argument("--dry-run", action="store_true", help="say where; write nothing")
    commands.add_parser("show", help="print the skill")
    return p


def main(argv: Sequence[str], environ: Mapping[str, str]) -> int:
    try:
        args = parser().parse_args(list(argv[1:]))
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else 0
    except usage.UsageError as err:
        return _fail(str(err), EXIT_BAD_INPUT)
    source = source_dir(environ) / SKILL / "SKILL.md"
    try:
        text = source.read_bytes()
    except OSError as err:
        return _fail(f"cannot read the skill at {source}: {err.strerror}", EXIT_REFUSED)
    if args.command == "show":
        sys.stdout.write(text.decode())
        return 0
    base = Path(args.dir).expanduser() if args.dir else skills_dirs(environ)[args.agent]
    dest = base / SKILL
    if args.dry_run:
        print(f"would install {source} as {dest / 'SKILL.md'}")
        return 0
    try:
        dest.mkdir(parents=True, exist_ok=True)
        with safefs.opened_dir(dest) as fd:
            now = safefs.read_regular(fd, "SKILL.md", MAX_SKILL)
            if now == text:
                print(f"skill: {dest / 'SKILL.md'} is up to date")
                return 0
            if now is not None and not args.force:
                return _fail(
                    f"{dest / 'SKILL.md'} differs from this version (edited, or older): "
                    "--force replaces it",
                    EXIT_REFUSED,
                )
            safefs.write_replacing(fd, "SKILL.md", text, 0o644)
    except OSError as err:
        where = f"{err.filename}: " if err.filename else ""
        return _fail(f"{where}{err.strerror or err}", EXIT_REFUSED)
    print(f"skill: installed {dest / 'SKILL.md'}")
    print("next: ask the agent for a new VM; it calls microvm-run new, then microvm-run check")
    return 0


def _fail(message: str, code: int) -> int:
    print(f"microvm-run skill: {message}", file=sys.stderr)
    return code
