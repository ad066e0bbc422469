"""A local stand-in for the vendors' model APIs: records requests, streams answers.

Anthropic's Messages API, Gemini's generateContent / streamGenerateContent,
OpenAI's Responses API and the OpenAI-compatible Chat Completions (under
any prefix: Model Studio's is /compatible-mode/v1/), enough for the real
CLIs (`claude -p`, `gemini -p`, `codex exec`, `qwen`) to print an answer.  Every request is recorded
(method, path, headers, body), so a test can check which key arrived in
which header.  TLS with a certificate from a throw-away CA (``make_tls``),
so the key proxy's upstream is ``https://`` as in production.  Listens on
loopback only: nothing leaves the machine.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ANSWER = "The stand-in says hello"


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]  # names lowercased
    body: bytes


def make_tls(directory: Path, names: list[str]) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for ``names``: (ca.pem, cert.pem, key.pem)."""
    ca_key, ca = directory / "ca.key", directory / "ca.pem"
    key, csr, cert = directory / "server.key", directory / "server.csr", directory / "server.pem"
    ext = directory / "server.ext"
    ext.write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\nsubjectAltName=" + ",".join(f"DNS:{n}" for n in names) + "\n"
    )
    run = [
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=amvm test CA", "-keyout", str(ca_key), "-out", str(ca)],
        ["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={names[0]}",
         "-keyout", str(key), "-out", str(csr)],
        ["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
         "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(cert)],
    ]  # fmt: skip
    for argv in run:
        subprocess.run(argv, check=True, capture_output=True)
    return ca, cert, key


def _sse(events: list[tuple[str | None, dict[str, object]]]) -> bytes:
    out = b""
    for name, data in events:
        if name:
            out += f"event: {name}\n".encode()
        out += f"data: {json.dumps(data)}\n\n".encode()
    return out


def _anthropic(path: str, body: dict[str, object]) -> tuple[str, bytes]:
    if path.startswith("/v1/messages/count_tokens"):
        return "application/json", json.dumps({"input_tokens": 12}).encode()
    model = str(body.get("model", "claude"))
    usage = {"input_tokens": 12, "output_tokens": 6}
    message: dict[str, object] = {
        "id": "msg_standin",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": usage,
    }
    if not body.get("stream"):
        done = {**message, "content": [{"type": "text", "text": ANSWER}], "stop_reason": "end_turn"}
        return "application/json", json.dumps(done).encode()
    return "text/event-stream", _sse(
        [
            ("message_start", {"type": "message_start", "message": message}),
            (
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
            ),
            (
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": ANSWER},
                },
            ),
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            (
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": 6},
                },
            ),
            ("message_stop", {"type": "message_stop"}),
        ]
    )


def _from_schema(schema: object) -> object:
    """A value that fits a (Gemini-style) JSON schema: the CLI's own classifier calls."""
    if not isinstance(schema, dict):
        return None
    kind = str(schema.get("type", "")).upper()
    if kind == "OBJECT":
        props = schema.get("properties") or {}
        return {k: _from_schema(v) for k, v in props.items()} if isinstance(props, dict) else {}
    if kind == "ARRAY":
        return []
    if kind in ("INTEGER", "NUMBER"):
        return 10
    if kind == "BOOLEAN":
        return False
    if "enum" in schema and isinstance(schema["enum"], list) and schema["enum"]:
        return schema["enum"][0]
    return "stand-in"


def _gemini(path: str, body: dict[str, object]) -> tuple[str, bytes]:
    if ":countTokens" in path:
        return "application/json", json.dumps({"totalTokens": 12}).encode()
    config = body.get("generationConfig")
    text = ANSWER
    if isinstance(config, dict) and config.get("responseMimeType") == "application/json":
        schema = config.get("responseJsonSchema") or config.get("responseSchema")
        text = json.dumps(_from_schema(schema))
    answer: dict[str, object] = {
        "candidates": [
            {
                "content": {"role": "model", "parts": [{"text": text}]},
                "finishReason": "STOP",
                "index": 0,
            }
        ],
        "usageMetadata": {"promptTokenCount": 12, "candidatesTokenCount": 6, "totalTokenCount": 18},
        "modelVersion": "gemini-standin",
    }
    if ":streamGenerateContent" in path:
        return "text/event-stream", _sse([(None, answer)])
    return "application/json", json.dumps(answer).encode()


def _openai(body: dict[str, object]) -> tuple[str, bytes]:
    model = str(body.get("model", "gpt"))
    item = {
        "type": "message",
        "id": "msg_standin",
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "text": ANSWER, "annotations": []}],
    }
    response = {
        "id": "resp_standin",
        "object": "response",
        "model": model,
        "status": "in_progress",
        "output": [],
    }
    usage = {
        "input_tokens": 12,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 6,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 18,
    }
    return "text/event-stream", _sse(
        [
            ("response.created", {"type": "response.created", "response": response}),
            (
                "response.output_item.added",
                {
                    "type": "response.output_item.added",
                    "output_index": 0,
                    "item": {**item, "status": "in_progress", "content": []},
                },
            ),
            (
                "response.output_text.delta",
                {
                    "type": "response.output_text.delta",
                    "item_id": "msg_standin",
                    "output_index": 0,
                    "content_index": 0,
                    "delta": ANSWER,
                },
            ),
            (
                "response.output_item.done",
                {"type": "response.output_item.done", "output_index": 0, "item": item},
            ),
            (
                "response.completed",
                {
                    "type": "response.completed",
                    "response": {
                        **response,
                        "status": "completed",
                        "output": [item],
                        "usage": usage,
                    },
                },
            ),
        ]
    )


def _chat_completions(body: dict[str, object]) -> tuple[str, bytes]:
    """Chat Completions: one chunk with the answer, then [DONE] (or one JSON answer)."""
    model = str(body.get("model", "qwen"))
    usage = {"prompt_tokens": 12, "completion_tokens": 6, "total_tokens": 18}
    base = {"id": "chatcmpl-standin", "created": 1, "model": model}
    if not body.get("stream"):
        message = {"role": "assistant", "content": ANSWER}
        done = {
            **base,
            "object": "chat.completion",
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": usage,
        }
        return "application/json", json.dumps(done).encode()
    chunk = {**base, "object": "chat.completion.chunk"}
    delta = {"role": "assistant", "content": ANSWER}
    events = [
        {**chunk, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]},
        {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
    ]
    options = body.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage"):
        events.append({**chunk, "choices": [], "usage": usage})
    return "text/event-stream", _sse([(None, e) for e in events]) + b"data: [DONE]\n\n"


class VendorAPI:
    """The stand-in server on ``address``; ``requests`` grows as it is called."""

    def __init__(
        self, address: str = "127.0.0.1", *, tls: tuple[Path, Path] | None = None, port: int = 0
    ) -> None:
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            self.rfile.readline()
                            return data
                        data += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _answer(self) -> None:
                body = self._body()
                request = Request(
                    self.command,
                    self.path,
                    {k.lower(): v for k, v in self.headers.items()},
                    body,
                )
                with owner._lock:
                    owner.requests.append(request)
                status, kind, payload = owner.respond(request)
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = _answer
            do_POST = _answer

        self.server = ThreadingHTTPServer((address, port), Handler)
        self.server.daemon_threads = True
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(tls[0]), str(tls[1]))
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def respond(self, request: Request) -> tuple[int, str, bytes]:
        path = request.path
        try:
            body = json.loads(request.body or b"{}")
        except ValueError:
            body = {}
        if not isinstance(body, dict):
            body = {}
        if path.startswith("/v1/messages"):
            return (200, *_anthropic(path, body))
        if path.startswith(("/v1beta/models/", "/v1/models/")) and ":" in path:
            return (200, *_gemini(path, body))
        if path.startswith("/v1/responses") and request.method == "POST":
            return (200, *_openai(body))
        if path.split("?")[0].endswith("/v1/chat/completions") and request.method == "POST":
            return (200, *_chat_completions(body))
        if path.split("?")[0] in ("/v1/models", "/v1beta/models", "/compatible-mode/v1/models"):
            models = {"data": [], "models": [], "object": "list"}
            return 200, "application/json", json.dumps(models).encode()
        return 404, "application/json", b'{"error": {"message": "not in the stand-in"}}'

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _main() -> None:
    """A stand-in in its own process (in a test's network namespace).

    Prints its port on stdout, then appends every request to RECORD as one
    JSON line (body base64), until stdin closes.
    """
    import argparse  # noqa: PLC0415
    import base64  # noqa: PLC0415
    import sys  # noqa: PLC0415

    parser = argparse.ArgumentParser()
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--record", required=True)
    args = parser.parse_args()
    tls = (Path(args.cert), Path(args.key)) if args.cert else None
    record = Path(args.record)

    class Recording(VendorAPI):
        def respond(self, request: Request) -> tuple[int, str, bytes]:
            line = {
                "method": request.method,
                "path": request.path,
                "headers": request.headers,
                "body": base64.b64encode(request.body).decode(),
            }
            with record.open("a") as out:
                out.write(json.dumps(line) + "\n")
            return super().respond(request)

    api = Recording(args.address, tls=tls, port=args.port)
    print(api.port, flush=True)
    sys.stdin.read()
    api.close()


if __name__ == "__main__":
    _main()
