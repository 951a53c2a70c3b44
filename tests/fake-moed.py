#!/usr/bin/env python3
"""fake-moed: a stand-in for moed's HTTP API on a Unix socket, for
test-moectl.sh. Canned answers for every endpoint moectl uses; streams
are sent in small pieces with pauses (lines and UTF-8 sequences split
across writes) so that moectl's incremental parsing is exercised.
Every request is appended to LOG as one JSON line.

Usage: fake-moed.py SOCKET LOG

Models with special behaviour (any other name answers like "tiny"):
  busy       429 with Retry-After: 7
  forbidden  403 (no tenant)
  missing    404 model_not_found
  broken     a stream that fails with an error event
  cut        a stream that stops without finish_reason or [DONE]
  drain      a stream that ends with finish_reason "cancelled"
A chat whose last user message is "slow" streams "tick " for 20 s.
/health answers 503 while the file SOCKET.draining exists.
Standard library only.
"""
import http.server
import json
import os
import socketserver
import sys
import threading
import time

SOCKET, LOG = sys.argv[1], sys.argv[2]
SPLITS = (1, 2, 31, 3, 47, 5)  # bytes per write of a stream
CREATED = 1730800800  # 2024-11-05T10:00:00Z
log_lock = threading.Lock()


def record(entry):
    with log_lock, open(LOG, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry, ensure_ascii=False) + "\n")


def error_body(message, etype, code, param=None):
    return {"error": {"message": message, "type": etype, "param": param, "code": code}}


MODELS = {"object": "list", "data": [
    {"id": "tiny", "object": "model", "created": CREATED, "owned_by": "moed"},
    {"id": "deepseek-v2-lite", "object": "model", "created": CREATED + 3600, "owned_by": "moed"},
]}

STATUS = {
    "version": "0.1.0", "state": "serving", "uptime_s": 3725,
    "models": [
        {"id": "tiny", "name": "moed tiny demo", "path": "/var/lib/moed/models/tiny.gguf",
         "context": 4096, "weight_bytes": 12582912, "kv_blocks_total": 512, "kv_blocks_used": 3},
        {"id": "deepseek-v2-lite", "name": "DeepSeek-V2-Lite-Chat",
         "path": "/var/lib/moed/models/v2-lite.gguf", "context": 32768,
         "weight_bytes": 10952166400, "kv_blocks_total": 8192, "kv_blocks_used": 0},
    ],
    "queue": {"waiting": 1, "running": 2, "active_requests": 3},
    "residency": {"mode": "strict", "ok": True, "detail": "loopback only"},
    "devices": [{"kind": "cpu", "threads": 16}],
}

TENANT = {"name": "research", "requests": 12, "refusals": 1, "prompt_tokens": 3456,
          "completion_tokens": 7890, "active": 1, "queued": 0}
OTHER = {"name": "default", "requests": 3, "refusals": 0, "prompt_tokens": 40,
         "completion_tokens": 200, "active": 0, "queued": 0}


def answer_for(messages):
    last = [m for m in messages if m.get("role") == "user"][-1]["content"]
    return "Echo «%s» ✓" % last


def pieces(text, n=3):
    return [text[i:i + n] for i in range(0, len(text), n)] or [""]


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        sys.stderr.write("fake-moed: " + (fmt % args) + "\n")

    def address_string(self):
        return "unix"  # an AF_UNIX peer has no address to show

    # -- plumbing

    def send_json(self, status, obj, headers=()):
        data = json.dumps(obj, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def start_stream(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()

    def chunk(self, data):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def send_events(self, events, eol="\n", pause=0.002):
        """events: data strings. The bytes go out in pieces of varying
        size, cut regardless of line ends or UTF-8 sequences."""
        raw = "".join("data: %s%s%s" % (e, eol, eol) for e in events).encode()
        i = k = 0
        while i < len(raw):
            n = SPLITS[k % len(SPLITS)]
            self.chunk(raw[i:i + n])
            time.sleep(pause)
            i += n
            k += 1

    def end_stream(self):
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def body(self):
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            return raw.decode("utf-8", "replace")

    def note(self, body):
        record({"method": self.command, "path": self.path,
                "auth": self.headers.get("Authorization"),
                "accept": self.headers.get("Accept"), "body": body})

    # -- endpoints

    def do_GET(self):
        self.note(None)
        admin = self.headers.get("Authorization") == "Bearer admin-token"
        if self.path == "/v1/models":
            self.send_json(200, MODELS)
        elif self.path == "/v1/moed/status":
            self.send_json(200, STATUS)
        elif self.path == "/v1/moed/usage":
            self.send_json(200, {"tenant": "research",
                                 "tenants": [TENANT, OTHER] if admin else [TENANT]})
        elif self.path == "/health":
            if os.path.exists(SOCKET + ".draining"):
                self.send_json(503, {"status": "draining"})
            else:
                self.send_json(200, {"status": "ok"})
        else:
            self.send_json(404, error_body("no such endpoint", "invalid_request_error",
                                           "not_found"))

    def do_POST(self):
        body = self.body()
        self.note(body)
        if not isinstance(body, dict):
            self.send_json(400, error_body("body is not a JSON object", "invalid_request_error",
                                           "invalid_json"))
            return
        if self.path == "/v1/moed/tokenize":
            ids = ([0] if body.get("add_special", True) else []) + list(body["prompt"].encode())
            self.send_json(200, {"model": body["model"], "tokens": ids, "count": len(ids)})
            return
        if self.path not in ("/v1/chat/completions", "/v1/completions"):
            self.send_json(404, error_body("no such endpoint", "invalid_request_error",
                                           "not_found"))
            return
        if self.refuse(body.get("model")):
            return
        try:
            self.generate(body, self.path == "/v1/chat/completions")
        except (BrokenPipeError, ConnectionResetError):
            record({"event": "disconnected", "path": self.path})
            self.close_connection = True

    def refuse(self, model):
        if model == "busy":
            self.send_json(429, error_body("tenant research: 2 requests in flight, limit 2",
                                           "rate_limit_error", "quota_exceeded"),
                           [("Retry-After", "7")])
        elif model == "forbidden":
            self.send_json(403, error_body("no tenant for uid %d" % os.getuid(),
                                           "permission_error", "no_tenant"))
        elif model == "missing":
            self.send_json(404, error_body("model 'missing' does not exist",
                                           "invalid_request_error", "model_not_found", "model"))
        else:
            return False
        return True

    def generate(self, req, chat):
        model = req["model"]
        text = answer_for(req["messages"]) if chat else "<<%s>>" % req["prompt"]
        usage = {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}
        if not req.get("stream"):
            choice = {"index": 0, "finish_reason": "stop"}
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            self.send_json(200, {"id": "cmpl-1", "object": "chat.completion" if chat
                                 else "text_completion", "created": CREATED, "model": model,
                                 "choices": [choice], "usage": usage})
            return

        def chunk(delta=None, txt=None, finish=None):
            c = {"index": 0, "finish_reason": finish}
            if chat:
                c["delta"] = delta if delta is not None else {}
            else:
                c["text"] = txt or ""
            return json.dumps({"id": "cmpl-1", "object": "chat.completion.chunk" if chat
                               else "text_completion", "created": CREATED, "model": model,
                               "choices": [c]}, ensure_ascii=False)

        self.start_stream()
        if chat:
            self.send_events([chunk(delta={"role": "assistant"})])
        if chat and req["messages"][-1]["content"] == "slow":
            for i in range(100):
                self.send_events([chunk(delta={"content": "tick "})], pause=0)
                time.sleep(0.2)
            text = "END"
        if model == "broken":
            self.send_events([chunk(delta={"content": "partial"}),
                              json.dumps(error_body("engine failed: out of KV blocks",
                                                    "server_error", "engine_error"))])
            self.end_stream()
            return
        body = [chunk(delta={"content": p}) if chat else chunk(txt=p) for p in pieces(text)]
        if model == "cut":
            self.send_events(body)
            self.end_stream()
            return
        finish = "cancelled" if model == "drain" else "stop"
        body.append(chunk(finish=finish))
        if (req.get("stream_options") or {}).get("include_usage"):
            body.append(json.dumps({"id": "cmpl-1", "object": "chat.completion.chunk",
                                    "created": CREATED, "model": model, "choices": [],
                                    "usage": usage}))
        body.append("[DONE]")
        # The completion stream uses CRLF line ends, which SSE allows too.
        self.send_events(body, eol="\n" if chat else "\r\n")
        self.end_stream()


class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def main():
    tmp = SOCKET + ".tmp"
    for p in (SOCKET, tmp):
        if os.path.exists(p):
            os.unlink(p)
    srv = Server(tmp, Handler)
    # Listening before the path appears: a client that sees the socket
    # can connect to it.
    os.rename(tmp, SOCKET)
    srv.serve_forever()


if __name__ == "__main__":
    main()
