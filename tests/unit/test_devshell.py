"""devshell: detection, the cache key, the env file, and prepare() with a fake nix.

Real Nix runs in tests/integration/test_devshell_nix.py; here a small bash
script stands in for it, recording its argv so the process boundary is seen.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from microvm_run import consent, devshell, process, safefs
from microvm_run.contract import GUEST_HOME
from microvm_run.devshell import (
    KEY_FILES,
    Progress,
    ProjectKind,
    cache_key,
    detect,
    evaluation_command,
    prepare,
    render_env,
    shell_files,
)
from tests.support.interrupt import PREPARE_CHILD, wait_for

# The shebang is filled in with the bash on PATH: the Nix build sandbox,
# where these tests also run, has no /bin/bash and no /usr/bin/env.
FAKE_NIX = r"""#!{bash}
# Stands in for nix/devenv: records the call, prints $FAKE_JSON, exits $FAKE_STATUS.
{
  echo call
  printf 'arg:%s\n' "$@"
  printf 'pwd-var:%s\n' "$PWD"
  printf 'cwd:%s\n' "$(pwd -P)"
  printf 'stdin:%s\n' "$(readlink /proc/self/fd/0)"
} >> "$FAKE_CALLS"
echo "$$" > "$FAKE_CALLS.pid"
echo "fake: evaluating the dev shell" >&2
if [ -n "$FAKE_PARTIAL" ]; then printf '{"variables": {'; exec sleep 60; fi
cat "$FAKE_JSON"
exit "${FAKE_STATUS:-0}"
"""

DEV_ENV: dict[str, Any] = {
    "bashFunctions": {"genericBuild": "echo never sourced"},
    "variables": {
        "MY_PROJECT_VAR": {"type": "exported", "value": "hello-from-devshell"},
        "PATH": {"type": "exported", "value": "/nix/store/a-gcc/bin::/nix/store/b-ruff/bin"},
        "HOME": {"type": "exported", "value": "/homeless-shelter"},
        "TMPDIR": {"type": "exported", "value": "/tmp/nix-build-shell-env.drv-0"},
        "out": {"type": "exported", "value": "/nix/store/c-shell-env"},
        "dev": {"type": "exported", "value": "/nix/store/c-shell-env-dev"},
        "outputs": {"type": "exported", "value": "out dev"},
        "shellHook": {"type": "exported", "value": "echo hook"},
        "LOCAL_ONLY": {"type": "var", "value": "not exported"},
        "ARRAY": {"type": "array", "value": ["a", "b"]},
        "bad-name": {"type": "exported", "value": "x"},
    },
}


def host_tool(name: str) -> str:
    """The absolute path of a tool on the test's own PATH."""
    path = shutil.which(name)
    assert path is not None, f"{name} is not on PATH"
    return path


class Fake:
    """A fake nix on PATH plus the project and agent home that prepare() needs."""

    def __init__(self, tmp_path: Path) -> None:
        self.work = tmp_path / "project"
        self.home = tmp_path / "home"
        self.state = tmp_path / "state" / "projects" / "project-0123"
        self.bin = tmp_path / "bin"
        self.calls = tmp_path / "calls"
        self.json = tmp_path / "dev-env.json"
        for directory in (self.work, self.home, self.bin):
            directory.mkdir()
        (self.work / "flake.nix").write_text("{ outputs = _: { }; }\n")
        for name in ("nix", "devenv"):
            (self.bin / name).write_text(FAKE_NIX.replace("{bash}", host_tool("bash"), 1))
            (self.bin / name).chmod(0o755)
        self.set_json(DEV_ENV)
        self.env = {
            "PATH": f"{self.bin}:{os.environ.get('PATH', os.defpath)}",
            "FAKE_CALLS": str(self.calls),
            "FAKE_JSON": str(self.json),
        }

    def set_json(self, document: Any) -> None:
        self.json.write_text(json.dumps(document))

    def prepare(self, **kwargs: Any) -> tuple[devshell.DevshellResult, str]:
        progress = io.StringIO()
        options: dict[str, Any] = {
            "allow": True, "progress": progress, "env": self.env, "state_dir": self.state,
        }  # fmt: skip
        options.update(kwargs)
        result = prepare(self.work, self.home, **options)
        return result, progress.getvalue()

    def call_count(self) -> int:
        if not self.calls.exists():
            return 0
        return self.calls.read_text().splitlines().count("call")

    def args(self) -> list[str]:
        lines = self.calls.read_text().splitlines()
        return [line[4:] for line in lines if line.startswith("arg:")]

    def recorded(self, prefix: str) -> str:
        lines = self.calls.read_text().splitlines()
        return next(line[len(prefix) :] for line in lines if line.startswith(prefix))

    @property
    def cache_dir(self) -> Path:
        return self.state / "devshell"

    def cache_files(self) -> list[str]:
        if not self.cache_dir.exists():
            return []
        return sorted(path.name for path in self.cache_dir.iterdir())


@pytest.fixture
def fake(tmp_path: Path) -> Fake:
    return Fake(tmp_path)


# --- detect -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("files", "kind"),
    [
        ([], None),
        (["flake.nix"], ProjectKind.FLAKE),
        (["flake.nix", "flake.lock"], ProjectKind.FLAKE),
        (["flake.nix", "devenv.nix"], ProjectKind.FLAKE_DEVENV),
        (["flake.nix", "devenv.nix", "devenv.yaml"], ProjectKind.FLAKE_DEVENV),
        ([".devenv.flake.nix"], ProjectKind.DEVENV),
        (["devenv.nix", "devenv.yaml"], ProjectKind.DEVENV),
        (["devenv.yaml", "shell.nix"], None),
    ],
)
def test_detect_project_kind_from_files(
    tmp_path: Path, files: list[str], kind: ProjectKind | None
) -> None:
    for name in files:
        (tmp_path / name).write_text("")
    assert detect(tmp_path) is kind


def test_a_directory_named_flake_nix_is_not_a_flake(tmp_path: Path) -> None:
    (tmp_path / "flake.nix").mkdir()
    assert detect(tmp_path) is None


# --- commands and the cache key ---------------------------------------------


def test_flake_command_is_print_dev_env_json_without_touching_the_lock() -> None:
    command = evaluation_command(ProjectKind.FLAKE, Path("/w/p"), nix="/bin/nix")
    assert command[0] == "/bin/nix"
    # path:, so Nix never runs git on the project's (guest-written) .git.
    assert command[-1] == "path:/w/p"
    assert {"print-dev-env", "--json", "--no-write-lock-file"} <= set(command)
    assert "--impure" not in command


def test_flake_devenv_command_is_impure() -> None:
    assert "--impure" in evaluation_command(ProjectKind.FLAKE_DEVENV, Path("/w/p"))


def test_devenv_command_asks_devenv_for_json() -> None:
    command = evaluation_command(ProjectKind.DEVENV, Path("/w/p"), devenv="/opt/devenv")
    assert command == ("/opt/devenv", "print-dev-env", "--json")


def key_of(work: Path, command: list[str]) -> str:
    with safefs.opened_dir(work) as fd:
        return cache_key(shell_files(fd), command)


def test_cache_key_is_stable_and_short(tmp_path: Path) -> None:
    (tmp_path / "flake.nix").write_text("a")
    key = key_of(tmp_path, ["nix", "print-dev-env"])
    assert key == key_of(tmp_path, ["nix", "print-dev-env"])
    assert len(key) == 32 and int(key, 16) >= 0


@pytest.mark.parametrize("name", [*KEY_FILES, "shell.nix", "nix/tools.nix"])
def test_each_file_that_defines_the_shell_changes_the_key(tmp_path: Path, name: str) -> None:
    (tmp_path / "flake.nix").write_text("base")
    (tmp_path / "nix").mkdir()
    before = key_of(tmp_path, ["nix"])
    (tmp_path / name).write_text("changed")
    assert key_of(tmp_path, ["nix"]) != before


def test_absent_and_empty_files_differ(tmp_path: Path) -> None:
    before = key_of(tmp_path, ["nix"])
    (tmp_path / "flake.lock").write_text("")
    assert key_of(tmp_path, ["nix"]) != before


def test_content_cannot_move_between_files_unnoticed(tmp_path: Path) -> None:
    # The reference setup concatenated contents without names: these collided.
    (tmp_path / "flake.nix").write_text("ab")
    first = key_of(tmp_path, ["nix"])
    (tmp_path / "flake.nix").write_text("a")
    (tmp_path / "flake.lock").write_text("b")
    assert key_of(tmp_path, ["nix"]) != first


def test_the_command_is_part_of_the_key(tmp_path: Path) -> None:
    assert key_of(tmp_path, ["nix", "--impure"]) != key_of(tmp_path, ["nix"])
    assert key_of(tmp_path, ["a b"]) != key_of(tmp_path, ["a", "b"])


def test_other_files_and_git_data_do_not_change_the_key(tmp_path: Path) -> None:
    before = key_of(tmp_path, ["nix"])
    (tmp_path / "main.py").write_text("print()")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "x.nix").write_text("git's own")
    assert key_of(tmp_path, ["nix"]) == before


@pytest.mark.parametrize(
    "plant", ["nix symlink", "dir symlink named .nix", "nested nix symlink", "nix fifo"]
)
def test_a_nix_entry_nix_would_follow_is_refused(tmp_path: Path, plant: str) -> None:
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    (outside / "default.nix").write_text("secret")
    if plant == "nix symlink":
        (tmp_path / "shell.nix").symlink_to(outside / "default.nix")
    elif plant == "dir symlink named .nix":
        (tmp_path / "lib.nix").symlink_to(outside)  # import ./lib.nix reads its default.nix
    elif plant == "nested nix symlink":
        (tmp_path / "a" / "b").mkdir(parents=True)
        (tmp_path / "a" / "b" / "x.nix").symlink_to("../../../outside.nix")
    else:
        os.mkfifo(tmp_path / "hang.nix")
    with safefs.opened_dir(tmp_path) as fd, pytest.raises(safefs.UnsafeFile):
        shell_files(fd)


NOBODY = 65534


def test_a_directory_the_runner_cannot_read_is_refused_not_skipped() -> None:
    # In /tmp and owned by an unprivileged user when the tests run as root,
    # for whom a mode-0 directory would be readable anyway.
    top = Path(tempfile.mkdtemp(prefix="amvm-unreadable-"))
    (top / "hidden").mkdir()
    (top / "hidden" / "evil.nix").write_text("x")
    (top / "hidden").chmod(0)
    as_root = os.geteuid() == 0
    try:
        if as_root:
            for path in (top, top / "hidden", top / "hidden" / "evil.nix"):
                os.chown(path, NOBODY, NOBODY)
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child)
            code = 3
            try:
                if as_root:
                    os.setgroups([])
                    os.setgid(NOBODY)
                    os.setuid(NOBODY)
                with safefs.opened_dir(top) as fd:
                    shell_files(fd)
                code = 1
            except safefs.UnsafeFile:
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        (top / "hidden").chmod(0o700)
        shutil.rmtree(top)


def test_a_git_directory_below_the_top_is_walked(tmp_path: Path) -> None:
    (tmp_path / "sub" / ".git").mkdir(parents=True)
    (tmp_path / "sub" / ".git" / "x.nix").write_text("the agent's")
    with safefs.opened_dir(tmp_path) as fd:
        assert "sub/.git/x.nix" in shell_files(fd)


def test_devenv_local_yaml_is_a_key_file(tmp_path: Path) -> None:
    before = key_of(tmp_path, ["nix"])
    (tmp_path / "devenv.local.yaml").write_text("inputs: {}")
    assert key_of(tmp_path, ["nix"]) != before


def test_a_tree_deeper_than_any_recursion_is_walked(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(2100):
        os.mkdir("d", dir_fd=fd)
        child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = child
    try:
        os.close(os.open("deep.nix", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
        with safefs.opened_dir(tmp_path) as top:
            assert "/".join(["d"] * 2100 + ["deep.nix"]) in shell_files(top)
    finally:
        os.unlink("deep.nix", dir_fd=fd)
        remove_chain(fd, 2100)


def remove_chain(fd: int, depth: int) -> None:
    """Remove a chain of ``d`` directories from its bottom ``fd`` (closed) up,
    without recursion (pytest's clean-up would raise RecursionError)."""
    for _ in range(depth):
        parent = os.open("..", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = parent
        os.rmdir("d", dir_fd=fd)
    os.close(fd)


def test_a_name_that_is_not_utf8_ends_in_one_line_not_a_traceback(fake: Fake) -> None:
    fake.prepare()
    (fake.work / os.fsdecode(b"\xff\x1b[31m.nix")).write_text("{ }")
    refused, output = fake.prepare()
    assert refused.status == "refused" and fake.call_count() == 1
    assert output.count("\n") == 1 and "\x1b" not in output
    assert "\\xff\\x1b[31m.nix changed since you allowed it" in output
    allowed, _ = fake.prepare(allow=allowed_digest(output))
    assert allowed.status == "evaluated"


def test_a_refusal_names_the_planted_path_escaped(fake: Fake) -> None:
    (fake.work / "\x1b]0;owned\x07.nix").symlink_to("/etc/passwd")
    refused, output = fake.prepare()
    assert refused.status == "refused" and fake.call_count() == 0
    assert output.count("\n") == 1 and "\x1b" not in output and "\x07" not in output
    assert "is a symlink" in output


# --- the env file -----------------------------------------------------------


def source_in(shell: list[str], env_file: Path, names: list[str]) -> dict[str, str]:
    """Source env_file in a clean shell and return the named variables."""
    script = '. "$1"; shift; for n in "$@"; do eval "printf \'%s\\0\' \\"\\${$n-<unset>}\\""; done'
    # The shell by its absolute path: the guest-like PATH below is data here.
    result = subprocess.run(
        [host_tool(shell[0]), *shell[1:], "-c", script, "sh", str(env_file), *names],
        env={"PATH": "/usr/bin:/bin", "HOME": "/home/agent", "TERM": "linux"},
        capture_output=True, check=True,
    )  # fmt: skip
    return dict(zip(names, result.stdout.decode().split("\0")[:-1], strict=True))


def test_render_keeps_exported_strings_only() -> None:
    text = render_env(DEV_ENV)
    assert "export MY_PROJECT_VAR=hello-from-devshell\n" in text
    for absent in ("LOCAL_ONLY", "ARRAY", "bad-name", "genericBuild"):
        assert absent not in text


def test_render_drops_guest_own_variables_outputs_and_hooks() -> None:
    text = render_env(DEV_ENV)
    for dropped in ("HOME=", "TMPDIR=", "export out=", "export dev=", "outputs=", "shellHook"):
        assert dropped not in text


def test_render_prepends_the_dev_path_to_the_guest_path() -> None:
    text = render_env(DEV_ENV)
    assert 'export PATH=/nix/store/a-gcc/bin:/nix/store/b-ruff/bin"${PATH:+:$PATH}"\n' in text


def test_render_is_only_comments_and_exports() -> None:
    for line in render_env(DEV_ENV).splitlines():
        assert line.startswith(("# ", "export "))


def test_render_rejects_a_document_without_variables() -> None:
    with pytest.raises(ValueError, match="variables"):
        render_env({"bashFunctions": {}})


TRICKY = 'it\'s "quoted" $HOME `id` $(id)\nsecond line\\ ; exit 3'
SHELLS = [["dash"], ["busybox", "ash"], ["bash", "--posix"]]


@pytest.mark.parametrize("shell", SHELLS, ids=lambda s: s[0])
def test_env_file_is_data_in_every_guest_shell(tmp_path: Path, shell: list[str]) -> None:
    if shutil.which(shell[0]) is None:
        pytest.skip(f"{shell[0]} not installed")
    env_file = tmp_path / "env.sh"
    env_file.write_text(
        render_env(
            {
                "variables": {
                    "TRICKY": {"type": "exported", "value": TRICKY},
                    "PATH": {"type": "exported", "value": "/dev/bin"},
                    "XDG_DATA_DIRS": {"type": "exported", "value": "/dev/share"},
                    "HOME": {"type": "exported", "value": "/homeless-shelter"},
                    "TERM": {"type": "exported", "value": "dumb"},
                }
            }
        )
    )
    seen = source_in(shell, env_file, ["TRICKY", "PATH", "XDG_DATA_DIRS", "HOME", "TERM"])
    assert seen == {
        "TRICKY": TRICKY,
        "PATH": "/dev/bin:/usr/bin:/bin",
        # unset in the guest: no trailing empty entry
        "XDG_DATA_DIRS": "/dev/share",
        "HOME": "/home/agent",
        "TERM": "linux",
    }


# --- prepare ----------------------------------------------------------------


def test_disabled_touches_nothing(tmp_path: Path) -> None:
    (tmp_path / "flake.nix").write_text("")
    home = tmp_path / "no-home-yet"
    progress = io.StringIO()
    state = tmp_path / "state"
    result = prepare(
        tmp_path, home, state_dir=state, allow=False, progress=progress, nix="/nonexistent"
    )
    assert result == devshell.DevshellResult("disabled", None, None, None)
    assert not home.exists() and not state.exists() and progress.getvalue() == ""


def test_no_project_kind_is_none_and_quiet(fake: Fake) -> None:
    (fake.work / "flake.nix").unlink()
    result, output = fake.prepare()
    assert (result.status, result.env_file, result.message, output) == ("none", None, None, "")
    assert fake.call_count() == 0


def test_miss_evaluates_caches_in_the_state_dir_and_gives_the_guest_a_copy(fake: Fake) -> None:
    result, output = fake.prepare()
    assert result.status == "evaluated"
    key = key_of(fake.work, list(evaluation_command(ProjectKind.FLAKE, fake.work)))
    assert result.env_file == fake.cache_dir / f"{key}.sh"
    assert result.guest_env_file == "/home/agent/.microvm-devshell.sh"
    assert "MY_PROJECT_VAR=hello-from-devshell" in result.env_file.read_text()
    assert (fake.home / ".microvm-devshell.sh").read_bytes() == result.env_file.read_bytes()
    assert sorted(p.name for p in fake.home.iterdir()) == [".microvm-devshell.sh"]
    assert fake.call_count() == 1
    assert result.message is not None and result.message.startswith("dev shell ready (")
    first, last = output.splitlines()
    assert first.startswith("microvm-run: evaluating the dev shell (nix print-dev-env in ")
    assert first.endswith(f"log: {fake.cache_dir / key}.log")
    assert last == f"microvm-run: {result.message}"
    assert "fake: evaluating" in (fake.cache_dir / f"{key}.log").read_text()


def test_nix_runs_in_the_project_with_a_gc_root_and_no_terminal(fake: Fake) -> None:
    result, _ = fake.prepare()
    assert result.env_file is not None
    args = fake.args()
    assert args[-1] == f"path:{fake.work}"
    profile = args[args.index("--profile") + 1]
    assert profile == str(result.env_file.with_suffix(".profile"))
    assert fake.recorded("pwd-var:") == str(fake.work)
    assert fake.recorded("cwd:") == str(fake.work.resolve())
    assert fake.recorded("stdin:") == "/dev/null"


def test_hit_starts_no_process_and_is_quiet(fake: Fake, monkeypatch: pytest.MonkeyPatch) -> None:
    first, _ = fake.prepare()

    def no_process(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a hit started a process")

    monkeypatch.setattr(process, "spawn", no_process)
    monkeypatch.setattr(process, "run", no_process)
    # And no nix on PATH (PATH is not part of the key): a hit never looks.
    again, output = fake.prepare(env={"PATH": "/nonexistent"})
    assert again.status == "hit"
    assert output == "" and again.message is None
    assert again.env_file == first.env_file and again.guest_env_file == first.guest_env_file
    assert fake.call_count() == 1


def test_hit_key_uses_the_same_command(fake: Fake) -> None:
    # Passing nix by another name is another command: a different entry.
    fake.prepare()
    result, _ = fake.prepare(nix=str(fake.bin / "nix"))
    assert result.status == "evaluated"


def allowed_digest(output: str) -> str:
    return output.rsplit("DIRENV_ALLOW=", 1)[1].split(";", maxsplit=1)[0].strip()


def test_changed_content_is_not_evaluated_until_allowed_again(fake: Fake) -> None:
    first, _ = fake.prepare()
    (fake.work / "flake.lock").write_text('{"version": 7}')
    refused, output = fake.prepare()
    assert (refused.status, refused.guest_env_file) == ("refused", None)
    assert fake.call_count() == 1  # nothing of the changed project ran
    assert output.count("\n") == 1
    assert "flake.lock changed since you allowed it" in output
    assert "review" in (fake.home / ".microvm-devshell.err").read_text()
    digest = allowed_digest(output)
    second, _ = fake.prepare(allow=digest)
    assert second.status == "evaluated" and second.env_file != first.env_file
    assert fake.call_count() == 2
    third, _ = fake.prepare()  # the new content is now the allowed one
    assert third.status == "hit"


def test_a_nix_file_the_agent_adds_needs_consent_and_so_does_impure(fake: Fake) -> None:
    fake.prepare()
    (fake.work / "devenv.nix").write_text("{ }")  # would switch on --impure
    (fake.work / "nix").mkdir()
    (fake.work / "nix" / "evil.nix").write_text("builtins.readFile /etc/shadow")
    refused, output = fake.prepare()
    assert refused.status == "refused" and fake.call_count() == 1
    assert "devenv.nix" in output and "nix/evil.nix" in output
    assert "--impure" not in fake.args()


def test_a_symlink_the_agent_adds_needs_consent_but_a_store_link_does_not(fake: Fake) -> None:
    fake.prepare()
    (fake.work / "result").symlink_to("/nix/store/" + "a" * 32 + "-hello")  # nix build
    assert fake.prepare()[0].status == "hit"
    # Trusted Nix code that probes ./overrides would now read elsewhere.
    (fake.work / "overrides").symlink_to("/home/someone/elsewhere")
    refused, output = fake.prepare()
    assert refused.status == "refused" and fake.call_count() == 1
    assert "overrides" in output


def test_a_stale_or_wrong_digest_allows_nothing(fake: Fake) -> None:
    fake.prepare()
    (fake.work / "flake.nix").write_text("{ outputs = _: { x = 1; }; }\n")
    wrong, output = fake.prepare(allow="0123456789abcdef")
    assert wrong.status == "refused" and fake.call_count() == 1
    assert "does not match" in output
    assert consent.is_allow_value("0123456789abcdef") and not consent.is_allow_value("yes")


def test_the_consent_lives_outside_the_project_and_the_home(fake: Fake) -> None:
    fake.prepare()
    record = fake.state / consent.RECORD
    assert record.is_file() and record.stat().st_mode & 0o077 == 0
    assert not list(fake.work.glob("*allowed*")) and not list(fake.home.glob("*allowed*"))


@pytest.mark.parametrize(
    "damage", ["oversized", "not json", "wrong version", "a directory", "unreadable"]
)
def test_a_damaged_consent_record_is_not_a_first_consent(fake: Fake, damage: str) -> None:
    fake.prepare()
    (fake.work / "evil.nix").write_text("builtins.readFile /etc/shadow")
    record = fake.state / consent.RECORD
    if damage == "oversized":
        record.write_bytes(b" " * (consent.MAX_RECORD_BYTES + 1))
    elif damage == "not json":
        record.write_text("{")
    elif damage == "wrong version":
        record.write_text('{"version": 99, "digest": "x", "files": {}}')
    elif damage == "a directory":
        record.unlink()
        record.mkdir()
    else:
        record.chmod(0)
        if os.geteuid() == 0:
            pytest.skip("root reads a mode-0 file")
    refused, output = fake.prepare()  # DIRENV_ALLOW=1 again
    assert refused.status == "refused" and fake.call_count() == 1
    assert output.startswith("microvm-run: dev shell not evaluated: the consent record ")
    assert output.count("\n") == 1
    if damage == "a directory":
        blocked, said = fake.prepare(allow=allowed_digest(output))
        assert blocked.status == "refused" and "cannot record your consent" in said
        record.rmdir()
    # Allowing by value (after review) is still possible, and records afresh.
    allowed, _ = fake.prepare(allow=allowed_digest(output))
    assert allowed.status == "evaluated" and fake.call_count() == 2
    assert fake.prepare()[0].status == "hit"


def test_a_consent_too_large_to_record_is_refused_not_written(fake: Fake) -> None:
    # 300 long names: a record the reader would refuse must never be written,
    # or the next DIRENV_ALLOW=1 would find "no record" and allow anything.
    deep = fake.work
    for i in range(15):
        deep = deep / ("d" * 200 + str(i))
    deep.mkdir(parents=True)
    for i in range(400):
        (deep / f"{'n' * 200}{i}.nix").write_text("{ }")
    refused, output = fake.prepare()
    assert refused.status == "refused" and fake.call_count() == 0
    assert "too many to record" in output and output.count("\n") == 1
    assert not (fake.state / consent.RECORD).exists()


@pytest.mark.parametrize("plant", ["symlink", "fifo", "dir-symlink"])
def test_a_key_file_that_is_not_a_regular_file_is_refused_without_reading(
    fake: Fake, plant: str
) -> None:
    lock = fake.work / "flake.lock"
    if plant == "symlink":
        lock.symlink_to("/dev/zero")
    elif plant == "fifo":
        os.mkfifo(lock)
    else:
        (fake.work / "flake.nix").unlink()
        (fake.work / "flake.nix").symlink_to("/etc/passwd")
    started = time.monotonic()
    result, output = fake.prepare()
    assert time.monotonic() - started < 5  # a FIFO never blocks, /dev/zero is never read
    assert result.status == "refused" and fake.call_count() == 0
    assert output.startswith("microvm-run: dev shell not evaluated: ")
    assert output.count("\n") == 1


def test_planted_symlinks_in_the_home_are_replaced_not_followed(fake: Fake, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("the user's file\n")
    (fake.home / ".microvm-devshell.sh").symlink_to(victim)
    (fake.home / ".microvm-devshell.err").symlink_to(victim)
    fake.env["FAKE_STATUS"] = "1"
    fake.prepare()
    assert victim.read_text() == "the user's file\n"
    assert not (fake.home / ".microvm-devshell.err").is_symlink()
    del fake.env["FAKE_STATUS"]
    fake.prepare()
    assert victim.read_text() == "the user's file\n"
    assert not (fake.home / ".microvm-devshell.sh").is_symlink()


def test_guest_home_is_configurable(fake: Fake) -> None:
    result, _ = fake.prepare(guest_home="/home/dev/")
    assert result.guest_env_file is not None
    assert result.guest_env_file == "/home/dev/.microvm-devshell.sh"


def test_flake_devenv_evaluates_impure(fake: Fake) -> None:
    (fake.work / "devenv.nix").write_text("{ }")
    fake.prepare()
    assert "--impure" in fake.args()


def test_devenv_project_runs_devenv_json(fake: Fake) -> None:
    (fake.work / "flake.nix").unlink()
    (fake.work / ".devenv.flake.nix").write_text("{ }")
    result, output = fake.prepare()
    assert result.status == "evaluated"
    assert fake.args() == ["print-dev-env", "--json"]
    assert "(devenv print-dev-env in " in output


def test_failure_boots_without_the_shell_and_leaves_the_error(fake: Fake) -> None:
    fake.env["FAKE_STATUS"] = "1"
    fake.json.write_text("")
    result, output = fake.prepare()
    error_file = fake.home / ".microvm-devshell.err"
    assert (result.status, result.env_file, result.guest_env_file) == ("failed", None, None)
    log = next(fake.cache_dir.glob("*.log"))
    assert result.message == (f"dev shell evaluation failed (log: {log}); starting without it")
    assert output.splitlines()[-1] == f"microvm-run: {result.message}"
    report = error_file.read_text()
    assert "print-dev-env --json" in report and str(fake.work) in report
    assert "exited with status 1" in report
    assert "fake: evaluating the dev shell" in report
    assert not [name for name in fake.cache_files() if name.endswith((".sh", ".tmp"))]


def test_a_later_success_removes_the_error_file(fake: Fake) -> None:
    fake.env["FAKE_STATUS"] = "1"
    fake.prepare()
    assert (fake.home / ".microvm-devshell.err").exists()
    del fake.env["FAKE_STATUS"]
    result, _ = fake.prepare()
    assert result.status == "evaluated"
    assert not (fake.home / ".microvm-devshell.err").exists()


def test_failure_is_not_cached(fake: Fake) -> None:
    fake.env["FAKE_STATUS"] = "1"
    fake.prepare()
    fake.prepare()
    assert fake.call_count() == 2


def test_output_that_is_not_a_dev_env_fails_clearly(fake: Fake) -> None:
    fake.json.write_text("unset shellHook\nexport PATH=/x\n")
    result, _ = fake.prepare()
    assert result.status == "failed"
    assert result.message is not None
    assert result.message.startswith("nix print-dev-env --json printed no dev shell")


def test_old_devenv_without_json_is_named_in_the_message(fake: Fake) -> None:
    (fake.work / "flake.nix").unlink()
    (fake.work / "devenv.nix").write_text("{ }")
    fake.json.write_text("export PATH=/x\n")
    result, _ = fake.prepare()
    assert result.status == "failed"
    assert result.message is not None and "devenv 1.0 or newer" in result.message


def test_devenv_missing_from_path_is_a_clear_failure(fake: Fake) -> None:
    (fake.work / "flake.nix").unlink()
    (fake.work / ".devenv.flake.nix").write_text("{ }")
    (fake.bin / "devenv").unlink()
    result, output = fake.prepare()
    assert result.status == "failed"
    assert result.message is not None
    assert "'devenv' is not on the host's PATH" in result.message
    assert "devenv 1.0 or newer" in result.message
    assert "devenv" in (fake.home / ".microvm-devshell.err").read_text()
    assert fake.call_count() == 0 and output.count("\n") == 1


def test_nix_missing_is_a_clear_failure(fake: Fake) -> None:
    result, _ = fake.prepare(nix="no-such-nix")
    assert result.status == "failed"
    assert (
        result.message is not None and "'no-such-nix' is not on the host's PATH" in result.message
    )


def test_an_unwritable_cache_boots_without_the_shell(fake: Fake) -> None:
    fake.state.mkdir(parents=True)
    (fake.state / "devshell").write_text("a file where the cache directory should be")
    result, output = fake.prepare()
    assert result.status == "failed"
    assert result.message is not None and "cannot write the dev shell cache" in result.message
    assert output.endswith(f"microvm-run: {result.message}\n")
    assert fake.call_count() == 0


def test_interrupt_between_write_and_rename_leaves_no_entry(
    fake: Fake, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(*_args: object) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", interrupted)
        with pytest.raises(KeyboardInterrupt):
            fake.prepare()
    assert not [name for name in fake.cache_files() if name.endswith((".sh", ".tmp"))]
    result, _ = fake.prepare()
    assert result.status == "evaluated" and fake.call_count() == 2


def test_ctrl_c_mid_evaluation_stops_nix_and_leaves_no_entry(fake: Fake) -> None:
    env = {**fake.env, "FAKE_PARTIAL": "1"}
    pid_file = Path(f"{fake.calls}.pid")
    child = subprocess.Popen(
        [sys.executable, "-c", PREPARE_CHILD, str(fake.work), str(fake.home), str(fake.state)]
        + [f"{name}={value}" for name, value in env.items()],
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(lambda: pid_file.exists() and pid_file.read_text().strip() != "", timeout=20)
        fake_nix = int(pid_file.read_text())
        child.send_signal(signal.SIGINT)
        _, stderr = child.communicate(timeout=20)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode != 0 and b"KeyboardInterrupt" in stderr
    assert not Path(f"/proc/{fake_nix}").exists() or _is_zombie(fake_nix)
    assert not [name for name in fake.cache_files() if name.endswith((".sh", ".tmp"))]
    result, _ = fake.prepare()
    assert result.status == "evaluated"


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def test_only_the_newest_entries_are_kept(fake: Fake) -> None:
    fake.cache_dir.mkdir(parents=True)
    old = time.time() - 3600
    for number in range(devshell.KEEP_ENTRIES + 3):
        key = f"{number:032x}"
        for suffix in (".sh", ".log", ".profile"):
            path = fake.cache_dir / f"{key}{suffix}"
            path.write_text("")
            os.utime(path, (old + number, old + number))
    stale_temp = fake.cache_dir / ".abc.sh.x.tmp"
    stale_temp.write_text("")
    os.utime(stale_temp, (old - 2 * 86400, old - 2 * 86400))
    live_temp = fake.cache_dir / ".def.sh.y.tmp"
    live_temp.write_text("")
    result, _ = fake.prepare()
    assert result.env_file is not None
    keys = {name.split(".")[0] for name in fake.cache_files() if not name.startswith(".")}
    newest = {f"{n:032x}" for n in range(3, devshell.KEEP_ENTRIES + 3)}
    assert keys == (newest - {f"{3:032x}"}) | {result.env_file.stem}
    assert not stale_temp.exists() and live_temp.exists()


def test_a_hit_refreshes_the_entry_for_pruning(fake: Fake) -> None:
    result, _ = fake.prepare()
    assert result.env_file is not None
    os.utime(result.env_file, (1, 1))
    fake.prepare()
    assert result.env_file.stat().st_mtime > 1


# --- progress ---------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def run_ticks(stream: io.StringIO, seconds: list[float]) -> str:
    clock = Clock()
    ticker = Progress(stream, clock=clock)
    for second in seconds:
        clock.now = 100.0 + second
        ticker.tick()
    ticker.close()
    return stream.getvalue()


def test_progress_without_a_tty_prints_a_line_every_ten_seconds() -> None:
    output = run_ticks(io.StringIO(), [0.5, 5, 10.2, 11, 19.9, 25, 31])
    assert output.splitlines() == [
        "microvm-run: still evaluating the dev shell (10 s)",
        "microvm-run: still evaluating the dev shell (25 s)",
        "microvm-run: still evaluating the dev shell (31 s)",
    ]


def test_progress_on_a_tty_updates_one_line_and_clears_it() -> None:
    output = run_ticks(Tty(), [0.5, 1.0, 1.5, 2.2])
    assert "\n" not in output
    assert output.count("\r") == 3  # two updates and the final clear
    assert output.endswith("\r\x1b[K")
    assert "evaluating the dev shell... 2 s" in output


def test_progress_that_never_ticks_writes_nothing() -> None:
    assert run_ticks(Tty(), [0.1, 0.2]) == ""


def test_result_is_plain_data() -> None:
    result = devshell.DevshellResult("hit", Path("/h/x.sh"), "/home/agent/x.sh", None)
    with pytest.raises(AttributeError):
        result.status = "none"  # type: ignore[misc]


@pytest.mark.parametrize("damage", [b"garbage \x00\xff", b"", b"# microvm-devshell-v0 old\n"])
def test_a_damaged_cache_entry_is_evaluated_again_not_sourced(fake: Fake, damage: bytes) -> None:
    first, _ = fake.prepare()
    assert first.status == "evaluated" and first.env_file is not None
    first.env_file.write_bytes(damage)
    second, output = fake.prepare()
    assert second.status == "evaluated"
    assert "was damaged; evaluating again" in output
    assert fake.call_count() == 2
    assert second.env_file is not None and devshell._is_intact(second.env_file)


def test_with_another_vm_on_the_project_only_a_hit_is_used(fake: Fake) -> None:
    refused, output = fake.prepare(others_running=True)
    assert refused.status == "refused" and fake.call_count() == 0
    assert "another VM runs on this project" in output
    assert not (fake.state / consent.RECORD).exists()  # no consent taken meanwhile
    fake.prepare()
    (fake.work / "flake.lock").write_text("{}")
    digest = allowed_digest(fake.prepare()[1])
    again, _ = fake.prepare(allow=digest, others_running=True)
    assert again.status == "refused" and fake.call_count() == 1
    (fake.work / "flake.lock").unlink()
    hit, _ = fake.prepare(others_running=True)
    assert hit.status == "hit" and fake.call_count() == 1


# --- foresee: what --dry-run shows ---------------------------------------------


def foresee(fake: Fake, allow: str = "1", **kwargs: Any) -> tuple[str | None, str]:
    return devshell.foresee(fake.work, state_dir=fake.state, allow=allow, **kwargs)


def test_foresee_runs_nothing_and_records_no_consent(fake: Fake) -> None:
    guest_file, line = foresee(fake)
    # What the launch will set if the evaluation succeeds, and says it evaluates.
    assert guest_file == f"{GUEST_HOME}/.microvm-devshell.sh"
    assert line.startswith("evaluated at launch (nix print-dev-env)")
    assert fake.call_count() == 0
    assert not fake.state.exists()  # no consent recorded, no cache made
    assert not (fake.home / ".microvm-devshell.err").exists()


def test_foresee_shows_the_cached_evaluation_without_refreshing_it(fake: Fake) -> None:
    evaluated, _ = fake.prepare()
    assert evaluated.env_file is not None
    os.utime(evaluated.env_file, (1_000_000, 1_000_000))
    guest_file, line = foresee(fake)
    assert guest_file == evaluated.guest_env_file
    assert line == f"cached, no evaluation ({evaluated.env_file})"
    assert evaluated.env_file.stat().st_mtime == 1_000_000  # pruning order untouched
    assert fake.call_count() == 1


def test_foresee_says_why_the_launch_would_not_evaluate(fake: Fake) -> None:
    guest_file, line = foresee(fake, others_running=True)
    assert guest_file is None and line.startswith("not evaluated: another VM runs on this")
    fake.prepare()
    # Another VM on the project: a cached evaluation is still used.
    assert foresee(fake, others_running=True)[1].startswith("cached, no evaluation")
    (fake.work / "flake.lock").write_text("{}")
    record = (fake.state / consent.RECORD).read_bytes()
    guest_file, line = foresee(fake)
    assert guest_file is None and "flake.lock changed since you allowed it" in line
    digest = allowed_digest(line)
    # The new digest would be allowed, and evaluated, but nothing is recorded yet.
    assert foresee(fake, allow=digest)[1].startswith("evaluated at launch")
    assert (fake.state / consent.RECORD).read_bytes() == record
    (fake.work / "flake.nix").unlink()
    assert foresee(fake) == (
        None,
        "none: the project declares no dev shell (flake.nix, devenv.nix)",
    )
    assert fake.call_count() == 1
