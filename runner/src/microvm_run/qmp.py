"""QEMU's monitor (QMP) on its UNIX socket: is it there, press the power button.

What `ps`, `stop` and `gc` ask a running QEMU (ops.py); the socket's path is
in the plan (``qmp_socket``) and in the instance's state.
"""

from __future__ import annotations

from pathlib import Path

TYPE_CHECKING = False  # typing's, without importing typing (3 ms): see tests/unit/test_startup.py
if TYPE_CHECKING:
    from typing import IO, Any

TIMEOUT_S = 2.0
MAX_LINE = 64 * 1024


def probe(path: Path) -> bool:
    """Does something accept connections on this socket (QEMU's monitor)?"""
    import socket  # noqa: PLC0415 - only instances that run need it: keeps `ps` quick

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(0.5)
        sock.connect(str(path))
    except OSError:
        return False
    finally:
        sock.close()
    return True


def powerdown(path: Path, timeout: float = TIMEOUT_S) -> str | None:
    """Press the guest's power button over QMP; None if QEMU accepted it, else why not."""
    import json  # noqa: PLC0415 - only `stop` needs these: keeps `ps` quick
    import socket  # noqa: PLC0415

    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            with sock.makefile("rb") as reader:
                if "QMP" not in _read(reader):
                    return "no QMP greeting"
                for command in ("qmp_capabilities", "system_powerdown"):
                    sock.sendall(json.dumps({"execute": command}).encode() + b"\n")
                    reply = _reply(reader)
                    if "error" in reply:
                        error = reply["error"]
                        desc = error.get("desc") if isinstance(error, dict) else error
                        return f"{command} failed: {desc}"
    except TimeoutError:
        return f"QMP did not answer within {timeout:g} s"
    except OSError as err:
        return f"QMP: {err.strerror or err}"
    except ValueError as err:
        return f"QMP: {err}"
    return None


def _read(reader: IO[bytes]) -> dict[str, Any]:
    import json  # noqa: PLC0415 - see powerdown

    line = reader.readline(MAX_LINE)
    if not line:
        raise ValueError("connection closed")
    message = json.loads(line)
    if not isinstance(message, dict):
        raise ValueError("not a QMP message")
    return message


def _reply(reader: IO[bytes]) -> dict[str, Any]:
    # Asynchronous events (e.g. POWERDOWN itself) may come before the reply.
    for _ in range(100):
        message = _read(reader)
        if "return" in message or "error" in message:
            return message
    raise ValueError("no reply among the events")
