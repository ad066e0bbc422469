"""Daily use (#19) with real boots: what the agent learns about a refusal, live
approval, the terminal, notifications and the per-instance log.

Targets are on this machine only, under the names scripts/setup-host put in
/etc/hosts (see test_network.py): allowed.amvm.test -> 127.0.0.2,
denied.amvm.test -> 127.0.0.3.
"""

from __future__ import annotations

import re
import shlex
import struct

from tests.integration import test_network
from tests.integration.conftest import VM
from tests.integration.test_network import DENIED, EGRESS, Upstream, _dns_query, _egress_log

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
