"""The egress proxy: the guest's only way out in ``open`` and ``allowlist`` mode.

QEMU runs user networking with ``restrict=on`` and hands each guest TCP
connection to EGRESS_ADDR:PORT to relay.py, which passes the connection's
socket itself (SCM_RIGHTS) to this proxy's unix socket in the instance's
runtime dir, with a line naming the guest port, and exits: no host process
lives per guest connection, and the proxy holds at most MAX_CONNECTIONS.
By port:

* 53: DNS over TCP.  Every allowed name resolves to EGRESS_ADDR; nothing is
  looked up for the guest, so DNS cannot carry data out.
* 80, 443 and allowlisted extra ports: transparent.  The destination is the
  HTTP Host header or the TLS SNI, so clients that ignore proxy variables
  are covered too.
* 3128: an explicit HTTP proxy (CONNECT, or absolute-form requests);
  HTTP(S)_PROXY in the guest points here.
* 4180: with --inject-keys, the API key proxy: the guest's API base URL
  points here, and the request goes upstream with the real key added, if
  its method and path are ones the agent's API uses (the flavor's route).
  A request that carries a credential of the guest's own (an OAuth bearer
  from a subscription login, not the placeholder) goes up with that
  credential and without the key: the key never replaces a login.  A
  WebSocket upgrade (GET with ``Upgrade: websocket``) is carried: after
  the upstream's 101 both directions are spliced, the key cut-off still
  watching what comes back.

Policy, applied on the host: ``allowlist`` admits only names that match a
rule; ``open`` admits any name.  In both, every address the name resolves
to must be public (never the host's loopback, the LAN or the host's own
addresses) unless the user named the host with ``--allow-private``.  Plain
HTTP is one request per connection: the proxy forwards the first request
(its body framed by Content-Length or chunked encoding) with
``Connection: close`` and nothing after it, so a pipelined second request
cannot reach another virtual host on an allowed address.  Each decision is
appended to the (bounded, escaped) egress log.

The proxy runs on an asyncio loop in a thread of the runner, so it ends with
the runner; the listening socket is bound before QEMU starts, so a policy
that cannot be set up stops the launch (fail closed).

For a VM declared on a NixOS host (hostegress.py, ``config.listen``), the
same proxy listens on TCP at the VM's gateway instead: nftables redirects
the VM's connections to it, and the port the VM asked for comes from the
connection's original destination (conntrack's SO_ORIGINAL_DST).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import struct
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

from microvm_run import live, netpolicy, sniff
from microvm_run.egresslog import EgressLog, printable
from microvm_run.netmode import NetMode
from microvm_run.netpolicy import FIX_ALLOW, FIX_PRIVATE, EgressConfig, KeyRoute, Refusal

__all__ = ["EgressConfig", "EgressError", "EgressProxy", "KeyRoute"]

HEAD_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 15.0
START_TIMEOUT_S = 5.0
# Guest connections held at once; beyond it a new one is closed at once (and
# counted).  Each costs the runner a few tens of KiB, not a process.
MAX_CONNECTIONS = 256
_CHUNK = 64 * 1024
# linux/netfilter_ipv4.h: the destination a connection had before NAT.
_SO_ORIGINAL_DST = 80
_IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)
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
# The headers through which the CLIs send a key or an OAuth bearer.
_CREDENTIAL_HEADERS = frozenset({"authorization", "x-api-key", "x-goog-api-key"})
# Hop-by-hop headers of a plain HTTP request: one request per connection
# means no keep-alive and no protocol switch (which would turn the rest of
# the connection into bytes no policy reads).
_HOP_HEADERS = frozenset({"connection", "keep-alive", "proxy-connection", "upgrade"})


class EgressError(RuntimeError):
    """The proxy could not be set up; the launch must not go on."""


class Denied(Exception):
    """A connection the proxy refuses; the refusal names the host and the fix."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.why)
        self.refusal = refusal


class EgressProxy:
    """Owns the loop thread; start() before QEMU, stop() in cleanup."""

    def __init__(
        self,
        config: EgressConfig,
        keys: Mapping[str, str],
        on_refusal: Callable[[Refusal], None] | None = None,
    ) -> None:
        self.config = config
        self._keys = dict(keys)  # values: never logged, never in a plan
        # Called on the loop thread for each refusal a rule could lift.
        self._on_refusal = on_refusal
        self._live = live.LiveRules(config.live_allow)
        # Per key variable: [requests, bytes to the upstream, bytes back].
        self.key_use: dict[str, list[int]] = {}
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._log = EgressLog(config.log, config.instance_id)
        # Strong references to every connection's task: the loop keeps only
        # weak ones, and a task waiting on a stream whose protocol holds its
        # reader weakly is otherwise garbage ("Task was destroyed but it is
        # pending"), which cut large downloads short.
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def denied(self) -> Counter[str]:
        return self._log.denied

    @property
    def allowed(self) -> int:
        return self._log.allowed

    @property
    def allowed_hosts(self) -> Counter[str]:
        return self._log.allowed_hosts

    def start(self) -> None:
        listen = self.config.listen
        try:
            self._log.open()
            family = socket.AF_UNIX if listen is None else socket.AF_INET
            listener = socket.socket(family, socket.SOCK_STREAM)
        except OSError as err:
            raise EgressError(f"cannot set up the egress proxy: {err}") from None
        try:
            if listen is None:
                listener.bind(str(self.config.socket))
                os.chmod(self.config.socket, 0o600)
            else:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                # The bridge's address may come up after the service starts.
                listener.setsockopt(socket.IPPROTO_IP, _IP_FREEBIND, 1)
                listener.bind((listen.address, listen.port))
            listener.listen(MAX_CONNECTIONS)
            listener.setblocking(False)
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
        self._log.close()

    def summary(self) -> str | None:
        """One line on what was denied, for the end of the run (names escaped)."""
        return self._log.summary()

    # -- the loop thread ---------------------------------------------------------

    def _run(self, listener: socket.socket) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.set_exception_handler(self._loop_error)
        server = self._loop.create_task(self._serve(listener))
        self._started.set()
        try:
            self._loop.run_forever()
        finally:
            # Cancel every connection and let each run its cleanup (closing
            # the guest's and the upstream's sockets) before the loop closes.
            server.cancel()
            tasks = asyncio.all_tasks(self._loop)
            for task in tasks:
                task.cancel()
            with contextlib.suppress(Exception):
                self._loop.run_until_complete(
                    asyncio.wait(tasks, timeout=START_TIMEOUT_S) if tasks else asyncio.sleep(0)
                )
            listener.close()
            self._loop.close()

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """An error nothing handled goes to the egress log.

        asyncio's default prints a traceback to stderr, the user's terminal,
        where the guest, whose bytes caused it, must not reach.  (A
        connection's own error is taken by _connection_done.)
        """
        error = context.get("exception")
        what = str(context.get("message", "unhandled error"))
        if error is not None:
            what += f": {type(error).__name__}: {error}"
        self._log.error(what)

    async def _serve(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(listener)
            except OSError:
                await asyncio.sleep(0.1)  # EMFILE and the like: back off, go on
                continue
            if len(self._connections) >= MAX_CONNECTIONS:
                conn.close()  # the guest's connection goes with the relay's
                self._log.record(
                    "deny", "too-many-connections", 0, "relay", f"over {MAX_CONNECTIONS} at once"
                )
                continue
            if self.config.listen is None:
                task = loop.create_task(self._accept(conn))
            else:
                task = loop.create_task(self._accept_tcp(conn))
            self._connections.add(task)
            task.add_done_callback(self._connection_done)

    def _connection_done(self, task: asyncio.Task[None]) -> None:
        self._connections.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            self._log.error(f"a connection failed: {type(error).__name__}: {error}")

    def _record(self, verdict: str, host: str, port: int, via: str, why: str = "") -> None:
        self._log.record(verdict, host, port, via, why)

    def _deny(self, host: str, port: int, via: str, why: str, fix: str | None = None) -> Denied:
        """Log a refusal, tell the runner about it if a rule could lift it."""
        self._record("deny", host, port, via, why)
        refusal = Refusal(
            host=printable(host),
            port=port,
            why=why,
            fix=fix,
            mode=self.config.mode,
            instance_id=self.config.instance_id,
        )
        if fix is not None and self._on_refusal is not None:
            with contextlib.suppress(Exception):
                self._on_refusal(refusal)
        return Denied(refusal)

    async def _accept(self, conn: socket.socket) -> None:
        """Take the guest's socket from relay.py, then serve it."""
        with conn:
            try:
                port, guest = await _receive_guest(conn)
            except (OSError, TimeoutError, ValueError):
                return
        if guest is None:
            return
        await self._serve_connection(guest, port)

    async def _accept_tcp(self, conn: socket.socket) -> None:
        """A connection nftables redirected from the VM: served for the port it asked for."""
        listen = self.config.listen
        assert listen is not None
        try:
            peer = conn.getpeername()[0]
        except OSError:
            conn.close()
            return
        if peer != listen.peer:
            conn.close()
            self._record("deny", peer, listen.port, "tcp", "not this proxy's VM")
            return
        try:
            port = _original_port(conn)
        except OSError:  # not a connection conntrack saw
            conn.close()
            return
        conn.setblocking(False)
        await self._serve_connection(conn, port)

    async def _serve_connection(self, sock: socket.socket, port: int) -> None:
        """One guest connection as streams, handled for ``port``, then closed."""
        try:
            reader, writer = await asyncio.open_connection(sock=sock, limit=_CHUNK)
        except OSError:
            sock.close()
            return
        try:
            await self._handle(reader, writer, port)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, port: int
    ) -> None:
        try:
            if port == netpolicy.DNS_PORT:
                await self._dns(reader, writer)
            elif port == netpolicy.KEY_PROXY_PORT and self.config.key_routes:
                await self._key_proxy(reader, writer)
            elif port == netpolicy.PROXY_PORT:
                await self._explicit(reader, writer)
            else:
                await self._transparent(reader, writer, port)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ssl.SSLError, ValueError):
            pass

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
        """The answer address for a name the policy may admit; None (NXDOMAIN, at once) if not."""
        if (
            self.config.mode == NetMode.OPEN
            or any(
                rule.matches(name, rule.port or netpolicy.TLS_PORT) for rule in self.config.rules
            )
            or self._live.permits(name, None, take=False) is not None
        ):
            return self.config.answer_addr
        if netpolicy.valid_hostname(name):
            self._deny(name, netpolicy.DNS_PORT, "dns", "not in the allowlist", FIX_ALLOW)
        else:
            # The guest chose every byte: no command is offered for it.
            self._deny(name, netpolicy.DNS_PORT, "dns", "not a host name", None)
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
        if via == "tls":
            try:
                upstream = await self._open(host, port, via)
            except Denied:
                return
            await _splice(reader, writer, upstream, data)
            return
        head = sniff.http_head(data)
        assert isinstance(head, sniff.HttpHead)  # _read_destination found a Host in it
        why = _vhost_refusal(head, host, port)
        if why is not None:
            self._record("deny", host, port, via, why)
            await _refuse_http(writer, host, why, 400)
            return
        await self._forward_request(
            reader, writer, head=head, data=data, host=host, port=port, via=via, target=head.target
        )

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
            if self.config.key_routes and target == (
                netpolicy.EGRESS_ADDR,
                netpolicy.KEY_PROXY_PORT,
            ):
                # A tunnel to the key proxy itself (Gemini CLI 0.1 tunnels its
                # base-URL requests through HTTPS_PROXY): its requests go down
                # the key route as if made directly.
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                await self._key_proxy(reader, writer, data[head.length :])
                return
            try:
                upstream = await self._open(*target, "connect")
            except Denied as denied:
                await _refuse_http(writer, target[0], str(denied), text=denied.refusal.text())
                return
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            if target[1] == netpolicy.HTTP_PORT:
                await self._http_in_tunnel(reader, writer, upstream, target, data[head.length :])
                return
            await _splice(reader, writer, upstream, data[head.length :])
            return
        try:
            url = urlsplit(head.target)
        except ValueError:  # e.g. "http://[::1" (an unclosed IPv6 literal)
            url = None
        target = (
            sniff.split_host_port(url.netloc, netpolicy.HTTP_PORT)
            if url is not None and url.netloc
            else None
        )
        if url is None or url.scheme != "http" or target is None:
            await _refuse_http(writer, head.target, "only CONNECT and http:// URLs", 400)
            return
        host_header = head.header("host")
        if host_header is not None and not _same_authority(host_header, *target):
            differ = "request URL and Host header differ"
            self._record("deny", target[0], target[1], "proxy", differ)
            await _refuse_http(writer, target[0], differ, 400)
            return
        path = url.path or "/"
        if url.query:
            path += "?" + url.query
        if self.config.key_routes and target == (netpolicy.EGRESS_ADDR, netpolicy.KEY_PROXY_PORT):
            # The key proxy itself, asked through the HTTP proxy by a client
            # that ignores NO_PROXY (Gemini CLI 0.1): served as if direct.
            own = [(k, v) for k, v in head.headers if not k.lower().startswith("proxy-")]
            direct = sniff.HttpHead(head.method, path, head.version, tuple(own), head.length)
            await self._key_request(reader, writer, direct, data)
            return
        headers = [(k, v) for k, v in head.headers if not k.lower().startswith("proxy-")]
        headers = [(k, v) for k, v in headers if k.lower() != "host"]
        headers.insert(0, ("Host", url.netloc))
        head = sniff.HttpHead(head.method, head.target, head.version, tuple(headers), head.length)
        host, port = target
        await self._forward_request(
            reader, writer, head=head, data=data, host=host, port=port, via="proxy", target=path
        )

    async def _http_in_tunnel(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        target: tuple[str, int],
        initial: bytes,
    ) -> None:
        """A CONNECT tunnel to the plain HTTP port: one request, for the tunnel's own host.

        Spliced, the tunnel would carry requests for any virtual host on the
        address (a second, pipelined one, or a first with another Host):
        held to what a connection to port 80 is held to.
        """
        host, port = target
        try:
            data = initial
            if sniff.http_head(data) is sniff.NEED_MORE:
                data += await _read_until(reader, lambda more: sniff.http_head(initial + more))
            head = sniff.http_head(data)
            if not isinstance(head, sniff.HttpHead):
                if data:
                    self._record("deny", host, port, "connect", "not an HTTP request")
                return
            why = _vhost_refusal(head, host, port)
            if why is not None:
                self._record("deny", host, port, "connect", why)
                await _refuse_http(writer, host, why, 400)
                return
            await self._forward_request(
                reader,
                writer,
                head=head,
                data=data,
                host=host,
                port=port,
                via="connect",
                target=head.target,
                upstream=upstream,
            )
        finally:
            upstream[1].close()

    async def _forward_request(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        head: sniff.HttpHead,
        data: bytes,
        host: str,
        port: int,
        via: str,
        target: str,
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None,
    ) -> None:
        """One plain HTTP request to ``host``: decided, forwarded, and nothing after it.

        ``upstream``: the connection the policy opened already (a tunnel's).
        """
        framing = sniff.body_framing(head)
        if framing is None:
            self._record("deny", host, port, via, "ambiguous request body length")
            await _refuse_http(writer, host, "ambiguous request body length", 400)
            return
        if upstream is None:
            try:
                upstream = await self._open(host, port, via)
            except Denied as denied:
                await _refuse_http(writer, host, str(denied), text=denied.refusal.text())
                return
        headers = [(k, v) for k, v in head.headers if k.lower() not in _HOP_HEADERS]
        headers.append(("Connection", "close"))
        first = sniff.render_head(head, target, headers)
        await _exchange(reader, writer, upstream, first, data[head.length :], framing=framing)

    async def _key_proxy(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, initial: bytes = b""
    ) -> None:
        data = initial
        if sniff.http_head(data) is sniff.NEED_MORE:
            data += await _read_until(reader, lambda more: sniff.http_head(initial + more))
        head = sniff.http_head(data)
        if not isinstance(head, sniff.HttpHead):
            return
        await self._key_request(reader, writer, head, data)

    async def _key_request(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        head: sniff.HttpHead,
        data: bytes,
    ) -> None:
        """One request on the key route; ``data[head.length:]`` is the start of its body."""
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
        via = f"key-proxy {route.var}"
        target = upstream_url.path.rstrip("/") + "/" + rest
        refusal = netpolicy.key_route_refusal(route, head.method, target)
        framing = sniff.body_framing(head)
        if refusal is None and framing is None:
            refusal = "ambiguous request body length"
        if refusal is not None:
            self._record("deny", host, port, via, refusal)
            await _refuse_http(writer, host, refusal, 405 if "method" in refusal else 403)
            return
        assert framing is not None
        own = _own_credentials(head)
        websocket = _websocket_upgrade(head)
        headers = [(k, v) for k, v in head.headers if k.lower() not in _DROPPED_HEADERS]
        headers.append(("Host", upstream_url.netloc))
        if own:
            # A login of the guest's own (a subscription's OAuth bearer): it
            # goes up as it is, and the key is not added.
            headers += own
            via += " (the guest's own credentials)"
        else:
            headers.append(_key_header(route.header, key))
        if websocket:
            headers += [("Connection", "Upgrade"), ("Upgrade", "websocket")]
        else:
            # One request per upstream connection, so every request carries
            # the key this proxy added and nothing else.
            headers.append(("Connection", "close"))
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(
                    host, port, ssl=ssl.create_default_context() if tls else None, limit=_CHUNK
                ),
                CONNECT_TIMEOUT_S,
            )
        except (OSError, TimeoutError, ssl.SSLError) as err:
            self._record("deny", host, port, "key-proxy", f"upstream unreachable: {err}")
            await _refuse_http(writer, host, f"upstream unreachable: {err}", 502)
            return
        self._record("allow", host, port, via)
        first = sniff.render_head(head, target, headers)
        meter = self.key_use.setdefault(route.var, [0, 0, 0])
        meter[0] += 1
        if websocket:
            leaked = await _websocket(
                reader,
                writer,
                (up_reader, up_writer),
                first,
                data[head.length :],
                secret=key,
                meter=meter,
            )
        else:
            leaked = await _exchange(
                reader,
                writer,
                (up_reader, up_writer),
                first,
                data[head.length :],
                framing=framing,
                secret=key,
                meter=meter,
            )
        if leaked:
            self._record("deny", host, port, via, "the response contained the key: cut off")

    # -- policy --------------------------------------------------------------------------

    async def _open(
        self, host: str, port: int, via: str
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        host = netpolicy.normalise_host(host)
        if not netpolicy.valid_hostname(host):
            raise self._deny(host, port, via, "not a host name")
        rules = self.config.rules
        live_rule = None
        if self.config.mode == NetMode.OPEN or not netpolicy.permitted(rules, host, port):
            # Spends a once rule only where no launch rule admits the name.
            live_rule = self._live.permits(host, port, take=True)
            if self.config.mode == NetMode.ALLOWLIST and live_rule is None:
                raise self._deny(host, port, via, "not in the allowlist", FIX_ALLOW)
        inward = netpolicy.private_permitted(rules, host, port) or (
            live_rule is not None and live_rule.private
        )
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), CONNECT_TIMEOUT_S
            )
        except (OSError, TimeoutError) as err:
            raise self._deny(host, port, via, f"does not resolve: {err}") from None
        addresses = [str(info[4][0]) for info in infos]
        if not inward:
            # Every address, in every mode: a public name that resolves (or
            # is rebound) to the host or the LAN is refused, not connected to.
            private = [a for a in addresses if not netpolicy.public_address(a)]
            if private:
                why = f"resolves to non-public address {private[0]}"
                raise self._deny(host, port, via, why, FIX_PRIVATE)
            own = [a for a in addresses if _local_address(a)]
            if own:
                raise self._deny(
                    host, port, via, f"resolves to this host's address {own[0]}", FIX_PRIVATE
                )
        for address in addresses:
            try:
                connection = await asyncio.wait_for(
                    asyncio.open_connection(address, port, limit=_CHUNK), CONNECT_TIMEOUT_S
                )
            except (OSError, TimeoutError):
                continue
            if not inward and _to_self(connection[1]):
                connection[1].close()
                raise self._deny(host, port, via, "resolves to this host", FIX_PRIVATE)
            self._record("allow", host, port, via)
            return connection
        raise self._deny(host, port, via, "connection failed")


async def _receive_guest(conn: socket.socket) -> tuple[int, socket.socket | None]:
    """relay.py's message: ``PORT\\n`` with the guest connection's socket attached."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(conn.fileno(), readable)
    try:
        await asyncio.wait_for(ready, HEAD_TIMEOUT_S)
    finally:
        loop.remove_reader(conn.fileno())
    message, fds, _flags, _addr = socket.recv_fds(conn, 16, 4, socket.MSG_CMSG_CLOEXEC)
    sockets = [socket.socket(fileno=fd) for fd in fds]
    guest, extra = (sockets[0], sockets[1:]) if sockets else (None, [])
    for sock in extra:
        sock.close()
    text = message.decode("ascii", "replace").strip()
    good = text.isascii() and text.isdigit()
    if guest is None or not good or guest.type != socket.SOCK_STREAM:
        if guest is not None:
            guest.close()
        return 0, None
    guest.setblocking(False)
    return int(text), guest


def _original_port(conn: socket.socket) -> int:
    """The port the VM connected to before nftables redirected it here."""
    raw = conn.getsockopt(socket.SOL_IP, _SO_ORIGINAL_DST, 16)
    port: int = struct.unpack_from("!H", raw, 2)[0]
    return port


def _own_credentials(head: sniff.HttpHead) -> list[tuple[str, str]]:
    """The guest's credential headers, if any of them is not the placeholder."""
    found = [(k, v) for k, v in head.headers if k.lower() in _CREDENTIAL_HEADERS]
    placeholders = (netpolicy.KEY_PLACEHOLDER, f"Bearer {netpolicy.KEY_PLACEHOLDER}")
    if all(v.strip() in placeholders or not v.strip() for _k, v in found):
        return []
    return found


def _websocket_upgrade(head: sniff.HttpHead) -> bool:
    """A WebSocket handshake (RFC 6455 4.1): GET, Upgrade: websocket, Connection: upgrade."""
    upgrade = (head.header("upgrade") or "").strip().lower()
    connection = {t.strip().lower() for t in (head.header("connection") or "").split(",")}
    return head.method == "GET" and upgrade == "websocket" and "upgrade" in connection


def _key_header(kind: str, key: str) -> tuple[str, str]:
    if kind == "authorization":
        return ("Authorization", f"Bearer {key}")
    return (kind, key)


def _local_address(address: str) -> bool:
    """Is ``address`` one of this host's own?  Asked of the kernel, nothing sent.

    Connecting a UDP socket only picks a route: to a local address the
    kernel's source address is that address itself.
    """
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((address, 9))
            return bool(probe.getsockname()[0] == address)
        except OSError:
            return False  # no route: the TCP connect cannot reach it either


def _to_self(writer: asyncio.StreamWriter) -> bool:
    """A connection to one of the host's own addresses has equal ends."""
    sock = writer.get_extra_info("socket")
    try:
        return bool(sock.getsockname()[0] == sock.getpeername()[0])
    except (OSError, AttributeError, IndexError):
        return True


def _vhost_refusal(head: sniff.HttpHead, host: str, port: int) -> str | None:
    """Why a plain HTTP request for ``host`` must not go to its address, or None.

    The upstream routes the request to a virtual host by its URL, if
    absolute, or by its Host header: both must name ``host``.  With more
    than one Host header, an upstream that takes the last (Twisted's
    NameVirtualHost does) would route by one the policy never saw.
    """
    hosts = [value for key, value in head.headers if key.lower() == "host"]
    if len(hosts) != 1:
        return "a request needs exactly one Host header"
    named = sniff.split_host_port(hosts[0], 0)
    if named is None or netpolicy.normalise_host(named[0]) != netpolicy.normalise_host(host):
        return "the Host header names another host"
    if not head.target.startswith("/") and head.target != "*":
        authority = _authority(head.target)
        if authority is None or not _same_authority(authority, host, port):
            return "request URL and Host header differ"
    return None


def _authority(target: str) -> str | None:
    try:
        return urlsplit(target).netloc or None
    except ValueError:
        return None


def _same_authority(authority: str, host: str, port: int) -> bool:
    """Does a Host header (or URL authority) name ``host``, on ``port`` or no port?"""
    if "@" in authority:
        return False
    parsed = sniff.split_host_port(authority, 0)
    if parsed is None:
        return False
    name, named_port = parsed
    same_name = netpolicy.normalise_host(name) == netpolicy.normalise_host(host)
    return same_name and named_port in (0, port)


async def _read_until(reader: asyncio.StreamReader, parse: Callable[[bytes], Any]) -> bytes:
    data = b""
    while len(data) < sniff.MAX_HEAD:
        chunk = await asyncio.wait_for(reader.read(4096), HEAD_TIMEOUT_S)
        if not chunk:
            break
        data += chunk
        if parse(data) is not sniff.NEED_MORE:
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
    writer: asyncio.StreamWriter, host: str, why: str, status: int = 403, *, text: str = ""
) -> None:
    """A response the guest's tool shows: which host, why, and (``text``) the fix."""
    # The host name is the guest's: show it escaped, as in the log.
    line = text or f"microvm-run egress proxy: {printable(host)}: {why}"
    body = f"{line}\n".encode("ascii", "replace")
    writer.write(
        f"HTTP/1.1 {status} Refused\r\nContent-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body
    )
    with contextlib.suppress(OSError):
        await writer.drain()


async def _exchange(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    head: bytes,
    buffered: bytes,
    *,
    framing: sniff.BodyFraming,
    secret: str | None = None,
    meter: list[int] | None = None,
) -> bool:
    """One request upstream and its response back; True if the response held ``secret``.

    ``meter`` (requests, bytes up, bytes down) gets the bytes of both ways added.

    The guest's bytes after the request's body are read and dropped, never
    forwarded: a pipelined request would otherwise reach the upstream
    unchecked.  (Reading them keeps the kernel from resetting the guest's
    connection before it has read the response.)
    """
    up_reader, up_writer = upstream
    meter = meter if meter is not None else [0, 0, 0]
    up_writer.write(head)
    meter[1] += len(head)
    sender = asyncio.ensure_future(
        _send_body_then_drop(reader, up_writer, buffered, framing, meter)
    )
    try:
        return await _copy_response(up_reader, writer, secret.encode() if secret else b"", meter)
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await sender
        up_writer.close()


async def _websocket(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    head: bytes,
    buffered: bytes,
    *,
    secret: str,
    meter: list[int],
) -> bool:
    """A WebSocket handshake upstream; after a 101, both directions spliced.

    Any other answer is passed back as one response (its Content-Length, or
    to EOF) and the connection ends: nothing the guest sends after a refused
    handshake reaches the upstream.  True if the key showed in what came back.
    """
    up_reader, up_writer = upstream
    up_writer.write(head)
    try:
        answer = await _read_until(up_reader, _response_head_end)
        end = _response_head_end(answer)
        if not isinstance(end, int):
            writer.transport.abort()
            return False
        status_line = answer.split(b"\r\n", 1)[0]
        meter[2] += len(answer)
        if secret.encode() in answer:  # before any of the guest's bytes go up
            writer.transport.abort()
            return True
        if status_line.split(b" ")[1:2] != [b"101"]:
            # Through the same cut-off as any response (a key split over two
            # reads is seen), and no faster than the guest reads it.
            length = _content_length(answer[:end])
            return await _copy_response(
                up_reader,
                writer,
                secret.encode(),
                meter,
                first=answer,
                more=length - (len(answer) - end) if length is not None else None,
                timeout=HEAD_TIMEOUT_S,
            )
        if buffered:
            up_writer.write(buffered)
        _, leaked = await asyncio.gather(
            _copy(reader, up_writer),
            _copy_response(up_reader, writer, secret.encode(), meter, first=answer),
        )
        return leaked
    except (OSError, TimeoutError, ssl.SSLError, asyncio.IncompleteReadError):
        writer.transport.abort()
        return False
    finally:
        up_writer.close()


def _response_head_end(data: bytes) -> int | object:
    """Where a response head ends (after its blank line), or NEED_MORE."""
    end = data.find(b"\r\n\r\n")
    if end >= 0:
        return end + 4
    return sniff.NEED_MORE if len(data) < sniff.MAX_HEAD else None


def _content_length(head: bytes) -> int | None:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            return int(value.strip())
    return None


async def _send_body_then_drop(
    reader: asyncio.StreamReader,
    sink: asyncio.StreamWriter,
    buffered: bytes,
    framing: sniff.BodyFraming,
    meter: list[int],
) -> None:
    try:
        await _send_body(reader, sink, buffered, framing, meter)
    except (ValueError, asyncio.IncompleteReadError, OSError):
        sink.transport.abort()  # a broken body: the response copy ends too
        return
    while await reader.read(_CHUNK):
        pass


async def _send_body(
    reader: asyncio.StreamReader,
    sink: asyncio.StreamWriter,
    buffered: bytes,
    framing: sniff.BodyFraming,
    meter: list[int],
) -> None:
    if not framing.chunked:
        left = framing.length
        piece = buffered[:left]
        while True:
            sink.write(piece)
            meter[1] += len(piece)
            await sink.drain()
            left -= len(piece)
            if left <= 0:
                return
            piece = await reader.read(min(_CHUNK, left))
            if not piece:
                raise asyncio.IncompleteReadError(b"", left)
    scanner = sniff.ChunkedScanner()
    piece = buffered
    while True:
        end = scanner.feed(piece)
        sink.write(piece if end is None else piece[:end])
        meter[1] += len(piece) if end is None else end
        await sink.drain()
        if end is not None:
            return
        piece = await reader.read(_CHUNK)
        if not piece:
            raise asyncio.IncompleteReadError(b"", None)


async def _copy_response(
    source: asyncio.StreamReader,
    sink: asyncio.StreamWriter,
    secret: bytes,
    meter: list[int],
    *,
    first: bytes = b"",
    more: int | None = None,
    timeout: float | None = None,
) -> bool:
    """Copy ``first``, then ``source`` to EOF; with a secret, stop if it shows.

    ``more``: copy no more than that many bytes of ``source`` (the rest of a
    response on a connection the upstream may keep open); ``timeout``: for
    each read.  Only an end that could be the start of the secret is held
    back until the next bytes say otherwise: everything else goes on at
    once, so a stream (server-sent events, WebSocket frames) is not delayed.
    """
    tail = b""
    chunk = first
    while True:
        window = tail + chunk
        if secret and secret in window:
            sink.transport.abort()
            return True
        cut = len(window) - _secret_prefix_at_end(window, secret)
        tail = window[cut:]
        sink.write(window[:cut])
        await sink.drain()
        if more is not None and more <= 0:
            break
        size = _CHUNK if more is None else min(_CHUNK, more)
        chunk = await asyncio.wait_for(source.read(size), timeout)
        if not chunk:
            break
        meter[2] += len(chunk)
        if more is not None:
            more -= len(chunk)
    sink.write(tail)
    await sink.drain()
    if sink.can_write_eof():
        sink.write_eof()
    return False


def _secret_prefix_at_end(data: bytes, secret: bytes) -> int:
    """The length of the longest end of ``data`` that begins ``secret`` (0 if none)."""
    for size in range(min(len(secret) - 1, len(data)), 0, -1):
        if data.endswith(secret[:size]):
            return size
    return 0


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
