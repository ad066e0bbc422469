"""Daily use (#19) with real boots: what the agent learns about a refusal, live
approval, the terminal, notifications and the per-instance log.

Targets are on this machine only, under the names scripts/setup-host put in
/etc/hosts (see test_network.py): allowed.amvm.test -> 127.0.0.2,
denied.amvm.test -> 127.0.0.3.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import struct
import subprocess
import time
from pathlib import Path

from tests.integration import test_git, test_network
from tests.integration.conftest import VM, VM_TIMEOUT_S
from tests.integration.test_network import (
    ALLOWED,
    DENIED,
    EGRESS,
    Upstream,
    _dns_query,
    _egress_log,
)
from tests.support.terminal import start_on_pty

upstreams = test_network.upstreams  # the fixture: servers behind the test names

_REFUSED = re.compile(r"microvm-run allow ([0-9a-f]{8}) ")


def _wait_for_lines(path: str, count: int, out: str) -> str:
    """Guest shell: wait up to 20 s for ``count`` lines in ``path``, then copy it to ``out``."""
    return (
        f"i=0; while [ $(wc -l < {path}) -lt {count} ] && [ $i -lt 100 ]; do "
        f"sleep 0.2; i=$((i + 1)); done; cat {path} > {out}"
    )


def test_a_refused_host_is_explained_to_the_guest_tool_and_in_a_file_the_agent_reads(
    vm: VM, upstreams: dict[str, Upstream]
) -> None:
    port = upstreams[DENIED].port
    work = vm.project()
    (work / "query").write_bytes(_dns_query(DENIED.encode(), 7))
    request = f"GET http://{DENIED}:{port}/ HTTP/1.1\r\nHost: {DENIED}:{port}\r\n\r\n"
    script = "; ".join(
        [
            f"nc -w 2 {EGRESS} 53 < /work/query > /work/dns",
            f"printf {shlex.quote(request)} | nc -w 5 {EGRESS} 3128 > /work/http",
            f"printf 'CONNECT {DENIED}:{port} HTTP/1.1\\r\\n\\r\\n' | "
            f"nc -w 5 {EGRESS} 3128 > /work/connect",
            _wait_for_lines("/run/agent-microvm/denied", 2, "/work/denied"),
            # The agent reads the file; only the guest's root writes it.
            "(echo forged >> /run/agent-microvm/denied) 2>/dev/null; echo $? > /work/write",
        ]
    )
    result = vm.run(work, script, "--net", "allowlist")
    assert result.returncode == 0, result.stderr
    assert upstreams[DENIED].received == []

    answer = (work / "dns").read_bytes()
    (length,) = struct.unpack("!H", answer[:2])
    flags = struct.unpack("!H", answer[4:6])[0]
    assert length == len(answer) - 2 and flags & 0x8000, "no DNS answer"
    assert flags & 0xF == 3, "a refused name is NXDOMAIN at once"

    body = (work / "http").read_text()
    assert body.startswith("HTTP/1.1 403")
    match = _REFUSED.search(body)
    assert match, body
    instance = match[1]
    expected = (
        f"microvm-run refused {DENIED}:{port}: not in the allowlist (--net allowlist); "
        f"to allow it, on the host: microvm-run allow {instance} {DENIED}:{port}"
    )
    assert expected in body
    assert expected in (work / "connect").read_text()
    assert f"{instance} deny {DENIED}:{port} via proxy" in _egress_log(vm)

    told = (work / "denied").read_text().splitlines()
    assert told == [
        f"microvm-run refused {DENIED}: not in the allowlist (--net allowlist); "
        f"to allow it, on the host: microvm-run allow {instance} {DENIED}",
        expected,
    ]
    assert (work / "write").read_text().strip() != "0"


def _instance_id(vm: VM) -> str:
    assert vm.runtime_dir is not None
    (only,) = [p.name for p in (vm.runtime_dir / "microvm-run").iterdir() if p.is_dir()]
    return only


def _wait_for(path: Path, running: subprocess.Popen[str], what: str) -> None:
    deadline = time.monotonic() + VM_TIMEOUT_S
    while not path.exists():
        assert running.poll() is None, running.communicate()
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def _get(host: str, port: int, out: str) -> str:
    request = f"GET http://{host}:{port}/ HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n"
    return f"printf {shlex.quote(request)} | nc -w 5 {EGRESS} 3128 > {out}"


def test_allow_on_a_running_instance_admits_the_next_request_and_denied_lists_refusals(
    vm: VM, upstreams: dict[str, Upstream]
) -> None:
    port = upstreams[DENIED].port  # the same port on both names
    work = vm.project()
    script = "; ".join(
        [
            _get(DENIED, port, "/work/before"),
            "touch /work/asked",
            "while [ ! -e /work/go ]; do sleep 0.2; done",
            _get(DENIED, port, "/work/after"),
            _get(ALLOWED, port, "/work/once-1"),
            _get(ALLOWED, port, "/work/once-2"),
        ]
    )
    running = vm.start(work, script, "--net", "allowlist")
    try:
        _wait_for(work / "asked", running, "the guest never made its first request")
        instance = _instance_id(vm)
        listed = vm.ops("denied", instance[:4])
        bad = [
            vm.ops("allow", instance, "not a host!"),
            vm.ops("allow", "ffffffff", DENIED),
            vm.ops("allow", instance, DENIED, "--once", "--project"),
        ]
        allowed = [
            vm.ops("allow", instance, f"{DENIED}:{port}", "--private"),
            vm.ops("allow", instance, f"{ALLOWED}:{port}", "--private", "--once"),
            vm.ops("allow", instance, "pkg.example", "--project"),
        ]
        (work / "go").touch()
        _, err = running.communicate(timeout=VM_TIMEOUT_S)
    finally:
        if running.poll() is None:
            running.kill()
    assert running.returncode == 0, err
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines() == [
        f"microvm-run refused {DENIED}:{port}: not in the allowlist (--net allowlist); "
        f"to allow it, on the host: microvm-run allow {instance} {DENIED}:{port}"
    ]
    assert [r.returncode for r in bad] == [2, 2, 2], [r.stderr for r in bad]
    assert all(r.stderr.count("\n") == 1 for r in bad)
    assert [r.returncode for r in allowed] == [0, 0, 0], [r.stderr for r in allowed]
    assert "403" in (work / "before").read_text()
    assert "answer from 127.0.0.3" in (work / "after").read_text()
    assert "answer from 127.0.0.2" in (work / "once-1").read_text()
    assert "not in the allowlist" in (work / "once-2").read_text()
    assert [r.count(b"GET") for r in upstreams[ALLOWED].received] == [1]
    from microvm_run import host  # noqa: PLC0415

    saved = host.project_allow_file("testagent", work, vm.env())
    assert saved.read_text() == "pkg.example\n"
    assert "and for later launches" in allowed[2].stdout
    plan = vm.ops(
        "--spec", str(vm.spec), "--work-dir", str(work), "--net", "allowlist", "--dry-run"
    )
    assert "allowlist: pkg.example" in plan.stdout, plan.stderr


def _dns_answers(data: bytes) -> list[int]:
    """The rcode of each length-prefixed DNS answer in ``data``."""
    rcodes = []
    while len(data) >= 2:
        (size,) = struct.unpack("!H", data[:2])
        message, data = data[2 : 2 + size], data[2 + size :]
        rcodes.append(struct.unpack("!H", message[2:4])[0] & 0xF)
    return rcodes


def test_a_preset_admits_exactly_its_hosts(vm: VM) -> None:
    # Names only: an admitted name resolves to the proxy, a refused one is
    # NXDOMAIN, and nothing leaves this machine.
    names = ["index.crates.io", "static.crates.io", "registry.npmjs.org", "evil.crates.io"]
    work = vm.project()
    (work / "Cargo.lock").write_text("# not read by the runner\n")
    (work / "queries").write_bytes(
        b"".join(_dns_query(name.encode(), i) for i, name in enumerate(names))
    )
    script = f"nc -w 2 {EGRESS} 53 < /work/queries > /work/answers"
    result = vm.run(work, script, "--net", "allowlist", "--allow-preset", "auto")
    assert result.returncode == 0, result.stderr
    assert _dns_answers((work / "answers").read_bytes()) == [0, 0, 3, 3]
    plan = vm.ops(
        "--spec", str(vm.spec), "--work-dir", str(work), "--net", "allowlist", "--dry-run"
    )
    assert (
        "preset cargo (Cargo.lock): index.crates.io, static.crates.io -- not applied" in plan.stdout
    )


# -- the terminal -------------------------------------------------------------------------

TERMINAL = {
    "TERM": "xterm-256color",
    "TERM_PROGRAM": "iTerm.app",
    "TERM_PROGRAM_VERSION": "3.5.0",
    "LC_TERMINAL": "iTerm2",
    "LC_TERMINAL_VERSION": "3.5.0",
}


def test_the_terminal_variables_reach_the_agent_and_ctrl_z_does_not_freeze_it(vm: VM) -> None:
    work = vm.project()
    script = "; ".join(
        [
            "env > /work/env",
            "touch /work/wait-z",
            "while [ ! -e /work/z-sent ]; do sleep 0.2; done",
            # ^Z in a cooked terminal: SIGTSTP to an orphaned group stops nothing.
            "sleep 1; echo alive > /work/after-tstp",
            # What a TUI's suspend key does: stop itself, wait for `fg`.
            "kill -STOP $$",
            "echo resumed > /work/after-stop",
        ]
    )
    running, master = start_on_pty(
        vm.as_user(vm.argv(work, script)), vm.env(**TERMINAL), rows=24, cols=80
    )
    try:
        _wait_for(work / "wait-z", running, "the agent never started")
        os.write(master, b"\x1a")
        (work / "z-sent").touch()
        _, err = running.communicate(timeout=VM_TIMEOUT_S)
    finally:
        if running.poll() is None:
            running.kill()
        os.close(master)
    assert running.returncode == 0, err
    env = (work / "env").read_text().splitlines()
    for name, value in TERMINAL.items():
        assert f"{name}={value}" in env
    assert (work / "after-tstp").read_text() == "alive\n"
    assert (work / "after-stop").read_text() == "resumed\n"


def test_shift_enter_reaches_a_program_in_the_guest_through_tmux(vm: VM) -> None:
    work = vm.project()
    # The program asks for extended keys (xterm modifyOtherKeys 1), as a TUI
    # does, then reads raw bytes: tmux on the host must see the request
    # through the VM's console and encode Shift+Enter for it.
    script = "; ".join(
        [
            "stty raw -echo",
            "printf '\\033[>4;1m'",
            "touch /work/reading",
            "dd bs=1 count=10 of=/work/keys 2>/dev/null",
            "stty sane",
        ]
    )
    socket_name = f"amvm-{os.getpid()}"
    tmux = ["tmux", "-L", socket_name, "-f", "/dev/null"]
    command = shlex.join(vm.argv(work, script))
    env = vm.env(TERM="xterm-256color")
    started = subprocess.run(
        vm.as_user([*tmux, "new-session", "-d", "-x", "100", "-y", "30", f"{command}; sleep 30"]),
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert started.returncode == 0, started.stderr
    try:
        subprocess.run(
            vm.as_user([*tmux, "set-option", "-g", "extended-keys", "on"]), env=env, check=True
        )
        deadline = time.monotonic() + VM_TIMEOUT_S
        while not (work / "reading").exists():
            assert time.monotonic() < deadline, "the guest program never started"
            time.sleep(0.2)
        time.sleep(1)  # the request reaches tmux through the console
        subprocess.run(vm.as_user([*tmux, "send-keys", "S-Enter"]), env=env, check=True)
        while not (work / "keys").exists() or len((work / "keys").read_bytes()) < 10:
            assert time.monotonic() < deadline, (
                (work / "keys").read_bytes() if (work / "keys").exists() else "no keys"
            )
            subprocess.run(vm.as_user([*tmux, "send-keys", "S-Enter"]), env=env, check=True)
            time.sleep(1)
    finally:
        subprocess.run(vm.as_user([*tmux, "kill-server"]), env=env, check=False)
    keys = (work / "keys").read_bytes()
    assert keys.startswith(b"\x1b[27;2;13~") or keys.startswith(b"\x1b[13;2u"), keys


# -- notifications ------------------------------------------------------------------------


def test_the_agent_needs_you_reaches_the_runner_as_one_line_without_a_desktop(vm: VM) -> None:
    work = vm.project()
    script = "; ".join(
        [
            "agent-microvm-notify 'waiting for your answer'",
            # A loop does not flood the user: the rest within 2 s is dropped.
            "agent-microvm-notify again; agent-microvm-notify and again",
            "sleep 3",
            # The guest chose the text: no byte of it drives the terminal.
            "agent-microvm-notify \"$(printf 'bell\\007 title\\033]0;pwned')\"",
            "sleep 1",
            # The agent reaches the host only through the FIFO, not the status port.
            "ls -l /proc/self/fd/ > /work/fds",
        ]
    )
    result = vm.run(work, script, "--net", "none")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if "needs you" in line]
    assert len(lines) == 2, result.stderr
    assert re.fullmatch(
        r"microvm-run: testagent \([0-9a-f]{8}\) needs you: waiting for your answer", lines[0]
    )
    assert lines[1].endswith("needs you: bell title]0;pwned")
    assert "\x1b" not in result.stderr and "\x07" not in result.stderr
    assert "virtio-ports" not in (work / "fds").read_text()
    assert "notify" not in (work / "fds").read_text()


def test_on_a_desktop_the_notification_goes_to_notify_send(vm: VM) -> None:
    work = vm.project()
    tools = work.parent / "bin"
    tools.mkdir()
    record = work.parent / "notify-send.argv"
    (tools / "notify-send").write_text(
        f'#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done > {record}\n'
    )
    (tools / "notify-send").chmod(0o755)
    os.chown(work.parent, vm.user.uid, vm.user.gid)
    result = vm.run(
        work,
        "agent-microvm-notify 'Claude Code needs your input'",
        "--net",
        "none",
        PATH=f"{tools}:/usr/bin:/bin",
        DISPLAY=":99",
    )
    assert result.returncode == 0, result.stderr
    assert "needs you" not in result.stderr
    argv = record.read_text().splitlines()
    # `--`: the guest's text is never taken for an option of notify-send.
    assert argv[:2] == ["--app-name=microvm-run", "--"]
    assert re.fullmatch(r"testagent \([0-9a-f]{8}\)", argv[2])
    assert argv[3:] == ["Claude Code needs your input"]


# -- the instance log ---------------------------------------------------------------------

key_proxy_spec = test_network.key_proxy_spec  # the fixture: a key route to ALLOWED


def test_logs_of_a_finished_instance_tell_its_run_until_gc(
    vm: VM, upstreams: dict[str, Upstream], key_proxy_spec: Path
) -> None:
    vm.spec = key_proxy_spec
    port = upstreams[DENIED].port
    project = test_git._repo(vm)
    canary = "canary-" + os.urandom(8).hex()
    script = "; ".join(
        [
            'wget -Y off -q -O /work/answer --header "Authorization: Bearer '
            '$TESTAGENT_API_KEY" "$TESTAGENT_BASE_URL/messages"',
            f"printf 'CONNECT {DENIED}:{port} HTTP/1.1\\r\\n\\r\\n' | nc -w 5 {EGRESS} 3128",
            "agent-microvm-notify 'done, please review'",
            "cd /work && echo two >> app.txt && git commit -q -am 'agent: two'",
            "exit 3",
        ]
    )
    result = vm.run(project, script, "--net", "allowlist", TESTAGENT_API_KEY=canary)
    assert result.returncode == 3, result.stderr
    listed = vm.ops("logs", "--json")
    assert listed.returncode == 0, listed.stderr
    (row,) = [r for r in json.loads(listed.stdout) if r["project"] == str(project)]
    assert row["exit"] == 3
    instance = row["id"]

    shown = vm.ops("logs", instance[:5], "--json")
    assert shown.returncode == 0, shown.stderr
    events = [json.loads(line) for line in shown.stdout.splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "stop", kinds
    by_kind = {e["event"]: e for e in events}
    start = by_kind["start"]
    assert (start["agent"], start["net"], start["key_proxy"]) == (
        "testagent",
        "allowlist",
        ["TESTAGENT_API_KEY"],
    )
    assert start["branch"].startswith("agent/")
    refused = by_kind["refused"]
    assert (refused["host"], refused["port"], refused["why"]) == (
        DENIED,
        port,
        "not in the allowlist",
    )
    assert by_kind["notify"]["text"] == "done, please review"
    egress = by_kind["egress"]
    use = egress["key_proxy"]["TESTAGENT_API_KEY"]
    assert use["requests"] == 1 and use["bytes_up"] > 0 and use["bytes_down"] > 0, use
    assert egress["allowed"] == {f"{ALLOWED}:{port}": 1}
    assert egress["denied"] == {f"{DENIED}:{port}": 1}
    assert by_kind["git"]["commits"] == 1 and by_kind["git"]["branch"] == start["branch"]
    assert by_kind["stop"]["exit"] == 3

    human = vm.ops("logs", instance)
    assert human.returncode == 0, human.stderr
    assert len(human.stdout.splitlines()) == len(events)
    assert "stop" in human.stdout.splitlines()[-1] and "exit=3" in human.stdout

    path = vm.user.home / ".local/state/microvm-run/instances" / f"{instance}.jsonl"
    assert path.stat().st_mode & 0o777 == 0o600
    assert canary.encode() not in path.read_bytes()

    afterwards = vm.ops("denied", instance)
    assert afterwards.returncode == 0, afterwards.stderr
    assert afterwards.stdout.startswith(f"microvm-run refused {DENIED}:{port}: not in the allow")

    cleaned = vm.ops("gc")
    assert f"{instance}: removed log" in cleaned.stdout, cleaned.stdout
    assert not path.exists()
    gone = vm.ops("logs", instance)
    assert gone.returncode == 2 and gone.stderr.count("\n") == 1
