"""The egress proxy: the guest's only way out in ``open`` and ``allowlist`` mode.

QEMU runs user networking with ``restrict=on`` and hands each guest TCP
connection to EGRESS_ADDR:PORT to relay.py, which passes it here over a
unix socket in the instance's runtime dir, prefixed by a line naming the
guest port.  By port:

* 53: DNS over TCP.  Every allowed name resolves to EGRESS_ADDR; nothing is
  looked up for the guest, so DNS cannot carry data out.
* 80, 443 and allowlisted extra ports: transparent.  The destination is the
  HTTP Host header or the TLS SNI, so clients that ignore proxy variables
  are covered too.
* 3128: an explicit HTTP proxy (CONNECT, or absolute-form requests);
  HTTP(S)_PROXY in the guest points here.
* 4180: with --inject-keys, the API key proxy: the guest's API base URL
  points here, and the request goes upstream with the real key added.

Policy, applied on the host: ``allowlist`` admits only names that match a
rule; ``open`` admits any name whose addresses are all public (never the
host's loopback, the LAN or the host's own addresses).  Each decision is
appended to the egress log with the host name.

The proxy runs on an asyncio loop in a thread of the runner, so it ends with
the runner; the listening socket is bound before QEMU starts, so a policy
that cannot be set up stops the launch (fail closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Mapping
from urllib.parse import urlsplit

from microvm_run import netpolicy, sniff
from microvm_run.netpolicy import EgressConfig, KeyRoute

__all__ = ["EgressConfig", "EgressError", "EgressProxy", "KeyRoute"]

HEAD_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 15.0
START_TIMEOUT_S = 5.0
_CHUNK = 64 * 1024
# Headers that carry credentials or hop-by-hop state; the key proxy drops
# whatever the guest sent for them before adding the real key.
_DROPPED_HEADERS = frozenset(
    {
        "host",
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "authorization",
        "x-api-key",
        "x-goog-api-key",
        "upgrade",
    }
)


class EgressError(RuntimeError):
    """The proxy could not be set up; the launch must not go on."""


class Denied(Exception):
    """A connection the policy refuses; the message names the host."""


class EgressProxy:
    """Owns the loop thread; start() before QEMU, stop() in cleanup."""

    def __init__(self, config: EgressConfig, keys: Mapping[str, str]) -> None:
        self.config = config
        self._keys = dict(keys)  # values: never logged, never in a plan
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._server: asyncio.AbstractServer | None = None
        self.denied: Counter[str] = Counter()
        self.allowed = 0
        self._log_file = None

    def start(self) -> None:
        try:
            self.config.log.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._log_file = self.config.log.open("a", buffering=1)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as err:
            raise EgressError(f"cannot set up the egress proxy: {err}") from None
        try:
            listener.bind(str(self.config.socket))
            os.chmod(self.config.socket, 0o600)
            listener.listen(64)
        except OSError as err:
            listener.close()
            raise EgressError(f"cannot set up the egress proxy: {err}") from None
        self._thread = threading.Thread(
            target=self._run, args=(listener,), name="egress", daemon=True
        )
        self._thread.start()
        if not self._started.wait(START_TIMEOUT_S) or self._start_error is not None:
            raise EgressError(f"the egress proxy did not start: {self._start_error}")

    def stop(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10.0)
        elif not self._loop.is_closed():
            self._loop.close()  # start() failed before the thread ran
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def summary(self) -> str | None:
        """One line on what was denied, for the end of the run."""
        if not self.denied:
            return None
        shown = ", ".join(f"{host} ({n}x)" for host, n in self.denied.most_common(5))
        more = len(self.denied) - 5
        tail = f" and {more} more" if more > 0 else ""
        total = sum(self.denied.values())
        return f"egress denied {total} connection(s): {shown}{tail}; see {self.config.log}"

    # -- the loop thread ---------------------------------------------------------

    def _run(self, listener: socket.socket) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._server = self._loop.run_until_complete(
                asyncio.start_unix_server(self._handle, sock=listener)
            )
        except BaseException as err:  # reported to start() via the event
            self._start_error = err
            listener.close()
            self._loop.close()
            self._started.set()
            return
        self._started.set()
        try:
            self._loop.run_forever()
        finally:
            self._server.close()
            # Cancel every connection and let each run its cleanup (closing
            # the guest's and the upstream's sockets) before the loop closes.
            tasks = asyncio.all_tasks(self._loop)
            for task in tasks:
                task.cancel()
            with contextlib.suppress(Exception):
                self._loop.run_until_complete(
                    asyncio.wait(tasks, timeout=START_TIMEOUT_S) if tasks else asyncio.sleep(0)
                )
            self._loop.close()

    def _record(self, verdict: str, host: str, port: int, via: str, why: str = "") -> None:
        if verdict == "deny":
            self.denied[f"{host}:{port}"] += 1
        else:
            self.allowed += 1
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        line = f"{stamp} {self.config.instance_id} {verdict} {host}:{port} via {via}"
        if why:
            line += f" ({why})"
        if self._log_file is not None:
            with contextlib.suppress(OSError, ValueError):
                self._log_file.write(line + "\n")

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), HEAD_TIMEOUT_S)
            port_text = line.strip().decode("ascii", "replace")
            if not port_text.isdigit():
                return
            port = int(port_text)
            if port == netpolicy.DNS_PORT:
                await self._dns(reader, writer)
            elif port == netpolicy.KEY_PROXY_PORT and self.config.key_routes:
                await self._key_proxy(reader, writer)
            elif port == netpolicy.PROXY_PORT:
                await self._explicit(reader, writer)
            else:
                await self._transparent(reader, writer, port)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    # -- DNS ---------------------------------------------------------------------

    async def _dns(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                size = int.from_bytes(await asyncio.wait_for(reader.readexactly(2), 60.0))
                message = await asyncio.wait_for(reader.readexactly(size), HEAD_TIMEOUT_S)
            except (asyncio.IncompleteReadError, TimeoutError):
                return
            query = sniff.dns_query(message)
            if query is None:
                answer = sniff.dns_format_error(message)
            else:
                answer = sniff.dns_answer(query, self._dns_address(query.name))
            writer.write(len(answer).to_bytes(2) + answer)
            await writer.drain()

    def _dns_address(self, name: str) -> str | None:
        if self.config.mode == "open" or any(
            rule.matches(name, rule.port or netpolicy.TLS_PORT) for rule in self.config.rules
        ):
            return netpolicy.EGRESS_ADDR
        self._record("deny", name, netpolicy.DNS_PORT, "dns", "not in the allowlist")
        return None

    # -- the three ways out --------------------------------------------------------

    async def _transparent(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, port: int
    ) -> None:
        data, host, via = await _read_destination(reader)
        if host is None:
            if data:  # a connection closed before a byte is no attempt
                self._record("deny", "?", port, via, "no host name in the first bytes")
            return
        try:
            upstream = await self._open(host, port, via)
        except Denied as why:
            if via == "http":
                await _refuse_http(writer, host, str(why))
            return
        await _splice(reader, writer, upstream, data)

    async def _explicit(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await _read_until(reader, sniff.http_head)
        head = sniff.http_head(data)
        if not isinstance(head, sniff.HttpHead):
            return
        if head.method == "CONNECT":
            target = sniff.split_host_port(head.target, netpolicy.TLS_PORT)
            if target is None:
                await _refuse_http(writer, head.target, "malformed CONNECT target", 400)
                return
            try:
                upstream = await self._open(*target, "connect")
            except Denied as why:
                await _refuse_http(writer, target[0], str(why))
                return
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await _splice(reader, writer, upstream, data[head.length :])
            return
        url = urlsplit(head.target)
        target = sniff.split_host_port(url.netloc, netpolicy.HTTP_PORT) if url.netloc else None
        if url.scheme != "http" or target is None:
            await _refuse_http(writer, head.target, "only CONNECT and http:// URLs", 400)
            return
        try:
            upstream = await self._open(*target, "proxy")
        except Denied as why:
            await _refuse_http(writer, target[0], str(why))
            return
        # One request per connection: the next one may name another host.
        headers = [(k, v) for k, v in head.headers if not k.lower().startswith("proxy-")]
        headers = [(k, v) for k, v in headers if k.lower() != "connection"]
        if head.header("host") is None:  # HTTP/1.0 clients may leave it to the URL
            headers.append(("Host", url.netloc))
        headers.append(("Connection", "close"))
        path = url.path or "/"
        if url.query:
            path += "?" + url.query
        first = sniff.render_head(head, path, headers) + data[head.length :]
        await _splice(reader, writer, upstream, first)

    async def _key_proxy(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await _read_until(reader, sniff.http_head)
        head = sniff.http_head(data)
        if not isinstance(head, sniff.HttpHead):
            return
        segment, _, rest = head.target.lstrip("/").partition("/")
        route = next((r for r in self.config.key_routes if r.prefix == segment), None)
        key = self._keys.get(route.var) if route else None
        if route is None or not key:
            await _refuse_http(writer, head.target, "no key route for this path", 404)
            return
        upstream_url = urlsplit(route.upstream)
        tls = upstream_url.scheme == "https"
        host = upstream_url.hostname or ""
        port = upstream_url.port or (443 if tls else 80)
        headers = [(k, v) for k, v in head.headers if k.lower() not in _DROPPED_HEADERS]
        headers.append(("Host", upstream_url.netloc))
        headers.append(_key_header(route.header, key))
        # One request per upstream connection, so every request carries the
        # key this proxy added and nothing else.
        headers.append(("Connection", "close"))
        target = upstream_url.path.rstrip("/") + "/" + rest
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(
                    host, port, ssl=ssl.create_default_context() if tls else None
                ),
                CONNECT_TIMEOUT_S,
            )
        except (OSError, TimeoutError, ssl.SSLError) as err:
            self._record("deny", host, port, "key-proxy", f"upstream unreachable: {err}")
            await _refuse_http(writer, host, f"upstream unreachable: {err}", 502)
            return
        self._record("allow", host, port, f"key-proxy {route.var}")
        first = sniff.render_head(head, target, headers) + data[head.length :]
        await _splice(reader, writer, (up_reader, up_writer), first)

    # -- policy --------------------------------------------------------------------------

    async def _open(
        self, host: str, port: int, via: str
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        host = netpolicy.normalise_host(host)
        if not netpolicy.valid_hostname(host):
            self._record("deny", host, port, via, "not a host name")
            raise Denied("not a host name")
        if self.config.mode == "allowlist" and not netpolicy.permitted(
            self.config.rules, host, port
        ):
            self._record("deny", host, port, via, "not in the allowlist")
            raise Denied("not in the allowlist")
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), CONNECT_TIMEOUT_S
            )
        except (OSError, TimeoutError) as err:
            self._record("deny", host, port, via, f"does not resolve: {err}")
            raise Denied("does not resolve") from None
        addresses = [info[4][0] for info in infos]
        if self.config.mode == "open":
            private = [a for a in addresses if not netpolicy.public_address(a)]
            if private:
                why = f"resolves to non-public address {private[0]}"
                self._record("deny", host, port, via, why)
                raise Denied(why)
        for info in infos:
            try:
                connection = await asyncio.wait_for(
                    asyncio.open_connection(info[4][0], port), CONNECT_TIMEOUT_S
                )
            except (OSError, TimeoutError):
                continue
            if self.config.mode == "open" and _to_self(connection[1]):
                connection[1].close()
                self._record("deny", host, port, via, "resolves to this host")
                raise Denied("resolves to this host")
            self._record("allow", host, port, via)
            return connection
        self._record("deny", host, port, via, "connection failed")
        raise Denied("connection failed")


def _key_header(kind: str, key: str) -> tuple[str, str]:
    if kind == "authorization":
        return ("Authorization", f"Bearer {key}")
    return (kind, key)


def _to_self(writer: asyncio.StreamWriter) -> bool:
    """A connection to one of the host's own addresses has equal ends."""
    sock = writer.get_extra_info("socket")
    try:
        return sock.getsockname()[0] == sock.getpeername()[0]
    except (OSError, AttributeError, IndexError):
        return True


async def _read_until(reader: asyncio.StreamReader, parse: object) -> bytes:
    data = b""
    while len(data) < sniff.MAX_HEAD:
        chunk = await asyncio.wait_for(reader.read(4096), HEAD_TIMEOUT_S)
        if not chunk:
            break
        data += chunk
        if parse(data) is not sniff.NEED_MORE:  # type: ignore[operator]
            break
    return data


async def _read_destination(reader: asyncio.StreamReader) -> tuple[bytes, str | None, str]:
    """The first bytes of a transparent connection and the host they name."""
    data = await asyncio.wait_for(reader.read(4096), HEAD_TIMEOUT_S)
    if sniff.looks_like_tls(data):
        while (name := sniff.tls_server_name(data)) is sniff.NEED_MORE:
            chunk = await asyncio.wait_for(reader.read(4096), HEAD_TIMEOUT_S)
            if not chunk:
                return data, None, "tls"
            data += chunk
        return data, name, "tls"
    while (head := sniff.http_head(data)) is sniff.NEED_MORE:
        chunk = await asyncio.wait_for(reader.read(4096), HEAD_TIMEOUT_S)
        if not chunk:
            return data, None, "http"
        data += chunk
    if not isinstance(head, sniff.HttpHead) or head.header("host") is None:
        return data, None, "http"
    target = sniff.split_host_port(head.header("host") or "", 0)
    return data, (target[0] if target else None), "http"


async def _refuse_http(
    writer: asyncio.StreamWriter, host: str, why: str, status: int = 403
) -> None:
    body = f"microvm-run egress proxy: {host}: {why}\n".encode()
    writer.write(
        f"HTTP/1.1 {status} Refused\r\nContent-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body
    )
    with contextlib.suppress(OSError):
        await writer.drain()


async def _splice(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    first: bytes,
) -> None:
    up_reader, up_writer = upstream
    if first:
        up_writer.write(first)
    try:
        await asyncio.gather(_copy(reader, up_writer), _copy(up_reader, writer))
    finally:
        up_writer.close()


async def _copy(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    try:
        while chunk := await source.read(_CHUNK):
            sink.write(chunk)
            await sink.drain()
        if sink.can_write_eof():
            sink.write_eof()
    except (OSError, ssl.SSLError, RuntimeError):
        sink.close()
