"""Issue #11, the file side: the host never trusts what the guest can write.

Each test is an attack made from inside the guest by the agent (uid 1000 in
the busybox test guest): planting symlinks, FIFOs, set-uid files and open
modes where the runner will later share, open, read, prune or chmod.  The
next launch must leave every file of the user outside the shares as it was,
and the outcome is checked on the host.  Dev-shell evaluation uses a
stand-in ``nix`` (a script on PATH that records its calls and tries to read
its parent's environment), since only the unprivileged path matters here.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import VM, HostUser, make_root_vm, wait_until_clean

pytestmark = pytest.mark.integration

KEY = "sk-canary-c0ntainment-7f3a"

FAKE_NIX = r"""#!/usr/bin/python3
# Stands in for nix: records its argv, tries to read the runner's environment
# (as a hostile flake under --impure would), prints that to the log (which
# the error report copies) and to the dev shell (which the guest sources).
import json, os, sys
calls = os.environ["FAKE_CALLS"]
with open(calls, "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\n")
try:
    with open(f"/proc/{os.getppid()}/environ", "rb") as f:
        parent = f.read().replace(b"\0", b" ").decode(errors="replace")
except OSError as e:
    parent = f"cannot read the runner's environment: {e.strerror}"
with open(calls + ".parent", "w") as f:
    f.write(parent)
print("trace: " + parent, file=sys.stderr)
if os.environ.get("FAKE_FAIL"):
    sys.exit(1)
json.dump({"variables": {
    "FAKE_VAR": {"type": "exported", "value": "from-the-dev-shell"},
    "PARENT_ENV": {"type": "exported", "value": parent},
}}, sys.stdout)
"""


class Canaries:
    """Files of the user outside every share, which no launch may touch."""

    def __init__(self, user: HostUser) -> None:
        tag = os.urandom(4).hex()
        self.file = user.home / f"canary-{tag}"
        self.dir = user.home / f"canary-dir-{tag}"
        self.dir.mkdir(parents=True)
        self.file.write_text("the user's own file\n")
        (self.dir / "keep").write_text("keep me\n")
        for path in (self.file, self.dir, self.dir / "keep"):
            os.chown(path, user.uid, user.gid)

    def intact(self) -> None:
        assert self.file.read_text() == "the user's own file\n"
        assert sorted(p.name for p in self.dir.iterdir()) == ["keep"]
        assert (self.dir / "keep").read_text() == "keep me\n"

    def remove(self) -> None:
        self.file.unlink(missing_ok=True)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def canaries(vm: VM) -> Iterator[Canaries]:
    made = Canaries(vm.user)
    yield made
    made.remove()


@pytest.fixture
def fake_nix(vm: VM) -> Iterator[dict[str, str]]:
    """The environment that puts the stand-in nix first on PATH."""
    where = Path(vm.scratch) / f"fake-nix-{os.urandom(3).hex()}"
    (where / "bin").mkdir(parents=True)
    (where / "bin" / "nix").write_text(FAKE_NIX)
    (where / "bin" / "nix").chmod(0o755)
    where.chmod(0o777)  # the test user writes its call log here
    yield {
        "PATH": f"{where / 'bin'}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
        "FAKE_CALLS": str(where / "calls"),
    }
    shutil.rmtree(where, ignore_errors=True)


def calls(env: dict[str, str]) -> list[str]:
    path = Path(env["FAKE_CALLS"])
    return path.read_text().splitlines() if path.exists() else []


def flake_project(vm: VM) -> Path:
    work = vm.project()
    (work / "flake.nix").write_text("{ outputs = _: { }; }\n")
    os.chown(work / "flake.nix", vm.user.uid, vm.user.gid)
    return work


def ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stderr


# -- escape 1: a share root inside the agent home ----------------------------------


def test_a_cri_storage_symlink_in_the_home_shares_nothing_of_the_host(
    vm: VM, canaries: Canaries
) -> None:
    cri_spec = vm.spec.with_name(f"spec-cri-{os.urandom(3).hex()}.toml")
    cri_spec.write_text(
        vm.spec.read_text()
        + '\n[[shares]]\ntag = "cri"\nsource = "cri-storage"\nmount_point = "/var/lib/containers"\n'
    )
    cri_spec.chmod(0o644)
    work = vm.project()
    # The attack: the share root of container storage becomes the user's home.
    ok(vm.run(work, f"ln -sfn {vm.user.home} $HOME/cri-storage"))
    cri_vm = VM(vm.user, vm.python, vm.pythonpath, cri_spec, vm.scratch, vm.runtime_dir)
    name = f"planted-{os.urandom(3).hex()}"
    result = cri_vm.run(
        work, f"ls -a /var/lib/containers > /work/seen; echo planted > /var/lib/containers/{name}"
    )
    ok(result)
    assert canaries.file.name not in (work / "seen").read_text()
    assert not (vm.user.home / name).exists()
    storage = vm.user.home / ".cache" / "microvm-run" / "cri-storage" / "testagent"
    (planted,) = storage.glob(f"*/{name}")
    assert planted.read_text() == "planted\n"
    assert stat.S_IMODE(planted.parent.stat().st_mode) == 0o700
    canaries.intact()
    cri_spec.unlink()


# -- escapes 2, 3, 4: the dev-shell cache, its log and its error report ----------------


def test_planted_dev_shell_paths_in_the_home_reach_no_host_file_and_no_key(
    vm: VM, canaries: Canaries, fake_nix: dict[str, str]
) -> None:
    work = flake_project(vm)
    plant = (
        "mkdir -p $HOME/.cache && "
        f"ln -sfn {canaries.dir} $HOME/.cache/microvm-devshell && "
        f"ln -sfn {canaries.file} $HOME/.microvm-devshell.err && "
        f"ln -sfn {canaries.file} $HOME/.microvm-devshell.sh && "
        "ln -sfn /proc/self/environ $HOME/.cache/environ"
    )
    ok(vm.run(work, plant))
    # A failing evaluation: the report of the failure goes to the guest.
    failed = vm.run(
        work,
        'cat "$HOME/.microvm-devshell.err" > /work/err-seen',
        DIRENV_ALLOW="1",
        TESTAGENT_API_KEY=KEY,
        FAKE_FAIL="1",
        **fake_nix,
    )
    ok(failed)
    assert "dev shell evaluation failed" in failed.stderr
    report = (work / "err-seen").read_text()
    assert "cannot read the runner's environment" in report  # the attempt was made
    assert KEY not in report
    assert KEY not in Path(fake_nix["FAKE_CALLS"] + ".parent").read_text()
    home = vm.agent_home(work)
    assert not (home / ".microvm-devshell.err").is_symlink()
    canaries.intact()
    # A good evaluation: the guest's copy of the shell replaces the symlink.
    good = vm.run(
        work,
        'printf %s "$FAKE_VAR" > /work/var; printf %s "$PARENT_ENV" > /work/parent',
        DIRENV_ALLOW="1",
        TESTAGENT_API_KEY=KEY,
        **fake_nix,
    )
    ok(good)
    assert (work / "var").read_text() == "from-the-dev-shell"
    assert KEY not in (work / "parent").read_text()
    assert not (home / ".microvm-devshell.sh").is_symlink()
    # The cache itself is the runner's: under its state dir, not in the home.
    state = vm.user.home / ".local" / "state" / "microvm-run" / "projects"
    assert list(state.glob("*/devshell/*.sh"))
    canaries.intact()


# -- escape 13: key files that never end ------------------------------------------------


@pytest.mark.parametrize("plant", ["ln -sfn /dev/zero /work/flake.lock", "mkfifo /work/flake.lock"])
def test_a_flake_lock_that_is_a_device_or_fifo_neither_hangs_nor_grows_the_runner(
    vm: VM, fake_nix: dict[str, str], plant: str
) -> None:
    work = flake_project(vm)
    ok(vm.run(work, plant))
    result = vm.run(work, "echo booted > /work/ok", DIRENV_ALLOW="1", **fake_nix)
    ok(result)
    assert "dev shell not evaluated: flake.lock is" in result.stderr
    assert (work / "ok").read_text() == "booted\n"
    assert calls(fake_nix) == []


# -- escape 5: consent bound to content -------------------------------------------------


def test_what_the_agent_writes_into_the_dev_shell_is_not_evaluated_without_asking(
    vm: VM, fake_nix: dict[str, str]
) -> None:
    work = flake_project(vm)
    attack = (
        "echo '# the agent was here' >> /work/flake.nix; "
        "echo '{ }' > /work/devenv.nix; mkdir -p /work/nix; "
        "echo 'builtins.readFile /etc/shadow' > /work/nix/tools.nix"
    )
    ok(vm.run(work, attack, DIRENV_ALLOW="1", **fake_nix))
    assert len(calls(fake_nix)) == 1  # the content the user allowed
    refused = vm.run(work, 'printf %s "$FAKE_VAR" > /work/var', DIRENV_ALLOW="1", **fake_nix)
    ok(refused)
    assert len(calls(fake_nix)) == 1  # nothing the agent wrote was evaluated
    assert (work / "var").read_text() == ""
    (line,) = [ln for ln in refused.stderr.splitlines() if "changed since you allowed" in ln]
    assert "flake.nix" in line and "devenv.nix" in line
    digest = line.rsplit("DIRENV_ALLOW=", 1)[1].split(";", 1)[0]
    allowed = vm.run(work, 'printf %s "$FAKE_VAR" > /work/var', DIRENV_ALLOW=digest, **fake_nix)
    ok(allowed)
    assert (work / "var").read_text() == "from-the-dev-shell"
    assert "--impure" in calls(fake_nix)[-1]  # devenv.nix, now allowed by the user


def test_no_evaluation_while_another_vm_on_the_project_can_change_the_files(
    vm: VM, fake_nix: dict[str, str]
) -> None:
    work = flake_project(vm)
    running = vm.start(work, "echo up > /work/up; sleep 60")
    try:
        deadline = time.monotonic() + 60
        while not (work / "up").exists():
            assert running.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        second = vm.run(work, 'printf %s "$FAKE_VAR" > /work/var', DIRENV_ALLOW="1", **fake_nix)
        ok(second)
        assert "another VM runs on this project" in second.stderr
        assert calls(fake_nix) == [] and (work / "var").read_text() == ""
    finally:
        running.send_signal(signal.SIGTERM)
        running.communicate(timeout=60)


# -- escapes 6 and 7: set-id bits and share root modes ---------------------------------


def test_set_id_bits_and_open_share_roots_do_not_outlive_the_guest(vm: VM) -> None:
    work = vm.project()
    attack = (
        "cp /bin/busybox /work/tool && chmod 4755 /work/tool && "
        "mkdir -p $HOME/bin && cp /bin/busybox $HOME/bin/t && chmod 6755 $HOME/bin/t && "
        "mkdir /work/open && echo x > /work/open/run.sh && chmod -R 0777 /work/open && "
        "stat -c %a /work/tool $HOME/bin/t /work/open/run.sh > /work/in-guest && "
        "chmod 0777 /work $HOME"
    )
    # As a guest's chmod 0777 /work leaves it when its runner was SIGKILLed.
    work.chmod(0o777)
    result = vm.run(work, attack)
    ok(result)
    assert (work / "in-guest").read_text().split() == ["4755", "6755", "777"]  # the guest did it
    home = vm.agent_home(work)
    assert stat.S_IMODE((work / "tool").stat().st_mode) == 0o755
    assert stat.S_IMODE((home / "bin" / "t").stat().st_mode) == 0o755
    # Group write too (NixOS users share the group `users`); /work keeps its own mode.
    assert stat.S_IMODE((work / "open").stat().st_mode) == 0o755
    assert stat.S_IMODE((work / "open" / "run.sh").stat().st_mode) == 0o755
    assert "removed set-uid/set-gid bits" in result.stderr
    assert f"{work} was writable by everyone" in result.stderr
    assert stat.S_IMODE(work.stat().st_mode) == 0o775
    assert stat.S_IMODE(home.stat().st_mode) == 0o700


def test_set_id_files_the_guest_hides_do_not_outlive_it_either(vm: VM) -> None:
    # Review of #11: a directory made unreadable (chmod 0) and a chain deeper
    # than Python's recursion limit in /work, then a set-uid file in the home:
    # neither may spare itself, nor the home after it.
    work = vm.project()
    attack = (
        "mkdir -p /work/hide/in && cp /bin/busybox /work/hide/in/t && "
        "chmod 4755 /work/hide/in/t && "
        "chmod 0 /work/hide/in /work/hide && "
        "cd /work && i=0; while [ $i -lt 1100 ]; do mkdir d && cd d || exit 1; i=$((i+1)); done && "
        "cp /bin/busybox deep && chmod 6755 deep && "
        "cp /bin/busybox $HOME/later && chmod 4755 $HOME/later"
    )
    try:
        result = vm.run(work, attack)
        ok(result)
        home = vm.agent_home(work)
        assert stat.S_IMODE((home / "later").stat().st_mode) == 0o755
        assert stat.S_IMODE((work / "hide" / "in" / "t").stat().st_mode) == 0o755
        deep = Path(*["d"] * 1100, "deep")
        fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
        try:
            assert stat.S_IMODE(os.stat(deep, dir_fd=fd).st_mode) == 0o755
        finally:
            os.close(fd)
        assert "removed set-uid/set-gid bits" in result.stderr
    finally:
        # GNU rm walks iteratively; the suite's shutil.rmtree would recurse too deep.
        subprocess.run(["rm", "-rf", str(work / "d")], check=False)


# -- a VM on a directory that contains another VM's project ---------------------------------


def spec_with(vm: VM, name: str, *, virtiofsd: Path | None = None, kernel_param: str = "") -> Path:
    """A copy of the test guest's spec beside it (its kernel and initrd are relative)."""
    text = vm.spec.read_text()
    if virtiofsd is not None:
        text = re.sub(r"(?m)^virtiofsd = .*$", f'virtiofsd = "{virtiofsd}"', text)
    if kernel_param:
        quiet = 'kernel_params = ["quiet"'
        text = text.replace(quiet, f'{quiet}, "{kernel_param}"')
        assert kernel_param in text
    spec = vm.spec.with_name(f"spec-{name}-{os.urandom(3).hex()}.toml")
    spec.write_text(text)
    spec.chmod(0o644)
    return spec


def wait_for(path: Path, proc: subprocess.Popen[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.1)


def test_a_nested_project_swapped_for_a_symlink_as_its_vm_starts_shares_nothing(vm: VM) -> None:
    outer = vm.project("outer")
    inner = outer / "proj"
    inner.mkdir()
    (inner / "code.py").write_text("the project\n")
    secret = outer.parent / "secret"  # the user's, outside both shares
    secret.mkdir()
    (secret / "secret.txt").write_text("not for any guest\n")
    for path in (inner, inner / "code.py", secret, secret / "secret.txt"):
        os.chown(path, vm.user.uid, vm.user.gid)
    # The real virtiofsd, started when the agent on `outer` has swapped
    # `proj`: the attack timed at its best moment, deterministically.
    real = re.search(r'(?m)^virtiofsd = "(.*)"$', vm.spec.read_text())
    assert real is not None
    wrapper = outer.parent / "virtiofsd-when-swapped"
    wrapper.write_text(
        "#!/bin/sh\n"
        "for arg; do\n"
        f'  if [ "$arg" = "--shared-dir={inner}" ]; then\n'
        f"    : > {outer}/go; i=0\n"
        f"    while [ ! -L {inner} ] && [ $i -lt 1800 ]; do sleep 0.1; i=$((i+1)); done\n"
        "  fi\n"
        "done\n"
        f'exec {real.group(1)} "$@"\n'
    )
    wrapper.chmod(0o755)
    swap_vm = VM(vm.user, vm.python, vm.pythonpath, spec_with(vm, "swap", virtiofsd=wrapper),
                 vm.scratch, vm.runtime_dir)  # fmt: skip
    attacker = vm.start(
        outer,
        "echo up > /work/up; while [ ! -e /work/go ]; do sleep 0.1; done; "
        "mv /work/proj /work/proj.real && ln -s ../secret /work/proj && sleep 120",
    )
    try:
        wait_for(outer / "up", attacker)
        victim = swap_vm.run(inner, "ls -a /work > /work/listing; echo planted > /work/planted")
        assert victim.returncode != 0
        assert "was replaced while virtiofsd started" in victim.stderr, victim.stderr
        assert sorted(p.name for p in secret.iterdir()) == ["secret.txt"]
        assert (outer / "proj.real" / "code.py").read_text() == "the project\n"
    finally:
        attacker.send_signal(signal.SIGTERM)
        attacker.communicate(timeout=60)
    swap_vm.spec.unlink()


def test_moving_a_nested_project_away_does_not_make_gc_prune_its_home(vm: VM) -> None:
    outer = vm.project("outer")
    inner = outer / "proj"
    inner.mkdir()
    os.chown(inner, vm.user.uid, vm.user.gid)
    ok(vm.run(inner, "echo logged-in > $HOME/login"))
    inner_home = vm.agent_home(inner)
    # The attack: the agent on the outer directory moves the project away.
    ok(vm.run(outer, "mv /work/proj /work/moved"))
    pruned = vm.ops("gc", "--prune", "--yes")
    assert pruned.returncode == 0, pruned.stderr
    assert (inner_home / "login").read_text() == "logged-in\n"
    said = pruned.stdout + pruned.stderr
    assert f"lay inside {outer}, where an agent could have moved it" in said, said


# -- root ----------------------------------------------------------------------------------


def test_guest_root_leaves_no_device_node_or_file_capability_in_a_root_run(
    vm: VM, venv_python: Path, runner_copy: Path, scratch: Path
) -> None:
    """As root (MICROVM_RUN_ALLOW_ROOT) virtiofsd has no ID map: a guest root
    (an agent that broke out of uid 1000) must still not make device nodes
    or capability-granting files on the host, not even while the VM runs."""
    spec = spec_with(vm, "agent-root", kernel_param="amvm_test.agent_root")
    root_vm = make_root_vm(venv_python, runner_copy, spec, scratch, "root-caps")
    work = root_vm.project()
    result = root_vm.run(
        work,
        "id -u > /work/uid; cp /bin/busybox /work/tool; mkfifo /work/fifo; "
        "mknod /work/disk b 7 0 2> /work/mknod.err; mknod /home/agent/null c 1 3; "
        "/usr/sbin/setcap cap_setuid+ep /work/tool 2> /work/setcap.err; "
        "ls -l /work > /work/listing",
    )
    ok(result)
    assert (work / "uid").read_text() == "0\n"  # the attacker really was guest root
    assert stat.S_ISFIFO((work / "fifo").lstat().st_mode)  # FIFOs still work
    assert not (work / "disk").exists() and (work / "mknod.err").read_text()
    assert not (root_vm.agent_home(work) / "null").exists()
    assert "disk" not in (work / "listing").read_text()
    assert (work / "setcap.err").read_text()
    with pytest.raises(OSError) as no_caps:
        os.getxattr(work / "tool", "security.capability")
    assert no_caps.value.errno == errno.ENODATA
    spec.unlink()


def test_root_is_refused_in_one_line_before_anything_is_created(vm: VM) -> None:
    work = vm.project()
    os.chown(work, 0, 0)
    home = Path(vm.scratch) / f"root-home-{os.urandom(3).hex()}"
    runtime = Path(vm.scratch) / f"root-runtime-{os.urandom(3).hex()}"
    env = {
        **vm.env(), "AGENT_HOME": str(home), "HOME": str(vm.scratch),
        "XDG_RUNTIME_DIR": str(runtime),
    }  # fmt: skip
    result = subprocess.run(
        vm.argv(work, "true"), env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "refusing to run as root" in result.stderr
    assert not home.exists() and not runtime.exists()


# -- escape 15, file parts ----------------------------------------------------------------


def test_a_squatted_tmp_runtime_base_blocks_nothing(vm: VM, test_user: HostUser) -> None:
    squat = Path(f"/tmp/microvm-run-{test_user.uid}")
    if squat.is_symlink() or squat.is_file():
        squat.unlink()
    elif squat.exists():
        shutil.rmtree(squat)
    squat.mkdir(mode=0o777)  # another local user (here root) got there first
    no_runtime = VM(vm.user, vm.python, vm.pythonpath, vm.spec, vm.scratch, None)
    try:
        work = vm.project()
        ok(no_runtime.run(work, "echo ran > /work/ran", "--supervisor", "child"))
        assert (work / "ran").read_text() == "ran\n"
        listed = no_runtime.ops("ps")
        assert listed.returncode == 0, listed.stderr
        collected = no_runtime.ops("gc")
        assert collected.returncode == 0, collected.stderr
        fallback = test_user.home / ".local" / "state" / "microvm-run" / "runtime"
        assert wait_until_clean(test_user, []) == []
        assert list(fallback.iterdir()) == []  # it was used, and cleaned up
        assert list(squat.iterdir()) == []
    finally:
        shutil.rmtree(squat, ignore_errors=True)


def test_a_runtime_base_of_another_user_is_bad_input_and_creates_no_home(vm: VM) -> None:
    runtime = Path(vm.scratch) / f"other-runtime-{os.urandom(3).hex()}"
    (runtime / "microvm-run").mkdir(parents=True)  # owned by root, not the test user
    runtime.chmod(0o755)
    work = vm.project()
    home = vm.agent_home(work)
    result = vm.run(work, "true", XDG_RUNTIME_DIR=str(runtime))
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "not a directory owned by you" in result.stderr
    assert not home.exists()
    shutil.rmtree(runtime)


def test_deeply_nested_records_make_ps_and_gc_say_so_not_crash(vm: VM, test_user: HostUser) -> None:
    base = vm.runtime_dir / "microvm-run" if vm.runtime_dir else None
    assert base is not None
    base.mkdir(mode=0o700, exist_ok=True)
    os.chown(base, test_user.uid, test_user.gid)
    bogus = base / "deadbeef"
    bogus.mkdir(mode=0o700)
    (bogus / "state.toml").write_text("x = " + "[" * 50_000)
    for path in (bogus, bogus / "state.toml"):
        os.chown(path, test_user.uid, test_user.gid)
    data = test_user.home / ".local" / "share" / "testagent-microvm"
    data.mkdir(parents=True, exist_ok=True)
    home = data / f"nested-{os.urandom(3).hex()}"
    home.mkdir()
    record = home.with_name(home.name + ".project.toml")
    record.write_text("project = " + "{a = " * 50_000)
    try:
        listed = vm.ops("ps")
        assert listed.returncode == 0 and "Traceback" not in listed.stderr, listed.stderr
        collected = vm.ops("gc")
        assert "Traceback" not in collected.stderr and "RecursionError" not in collected.stderr
        assert "nested too deeply" in collected.stdout + collected.stderr
    finally:
        shutil.rmtree(bogus, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)
        record.unlink(missing_ok=True)
