"""An S3 endpoint that misbehaves as a real one does under load: an HTTP proxy on 127.0.0.1 in
front of a (moto) S3 server that answers some requests with 503 SlowDown or 500 InternalError,
passes some on but cuts the response body half-way (the connection closed), or delays them.
Which request meets which fault comes from a seeded RNG, so a run's faults can be replayed."""

from __future__ import annotations

import collections
import http.client
import http.server
import random
import socket
import threading
import time
import urllib.parse

KINDS = ("slowdown", "internal", "cut", "delay")
_ERRORS = {"slowdown": (503, "SlowDown", "Please reduce your request rate."),
           "internal": (500, "InternalError", "We encountered an internal error. Please try again.")}
_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "proxy-connection"}


class FlakyS3:
    """The proxy; `endpoint` is its URL. Each request whose method is in `methods` meets a fault
    with probability `rate`, its kind drawn from `kinds`; `delay_s` is a delayed request's wait.
    `plan` gives the next requests of a method chosen faults first. `injected[(method, kind)]`
    counts the faults given, `requests[method]` every request."""

    def __init__(self, upstream: str, rate: float = 0.0, seed: int = 0, kinds=KINDS,
                 methods=("GET", "PUT", "POST", "HEAD", "DELETE"), delay_s: float = 0.5):
        up = urllib.parse.urlsplit(upstream)
        self.upstream = (up.hostname, up.port)
        self.rate, self.kinds, self.methods, self.delay_s = rate, tuple(kinds), set(methods), delay_s
        self.rng, self.lock = random.Random(seed), threading.Lock()
        self.injected: collections.Counter = collections.Counter()
        self.requests: collections.Counter = collections.Counter()
        self.planned: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def plan(self, method: str, *kinds: str | None) -> None:
        """The next requests of `method` meet these faults (None: none), in order."""
        with self.lock:
            self.planned[method].extend(kinds)

    def fault(self, method: str) -> str | None:
        with self.lock:
            self.requests[method] += 1
            if self.planned[method]:
                kind = self.planned[method].popleft()
            elif method in self.methods and self.rng.random() < self.rate:
                kind = self.rng.choice(self.kinds)
            else:
                kind = None
            if kind is not None:
                self.injected[(method, kind)] += 1
            return kind

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _handler(proxy: FlakyS3):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as botocore's connection pool expects

        def log_message(self, *args) -> None:  # no line per request on stderr
            pass

        def handle(self) -> None:
            try:
                super().handle()
            except ConnectionError:  # the client gave up on this connection (its own timeout)
                pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                out = b""
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    out += self.rfile.read(size)
                    self.rfile.readline()
                while self.rfile.readline() not in (b"\r\n", b""):  # trailers
                    pass
                return out
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _forward(self) -> None:
            body = self._body()
            kind = proxy.fault(self.command)
            if kind in _ERRORS:
                status, code, message = _ERRORS[kind]
                xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                       f"<Message>{message}</Message><RequestId>flaky</RequestId></Error>").encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(xml)))
                self.end_headers()
                if self.command != "HEAD":  # S3 answers a HEAD's error with headers alone
                    self.wfile.write(xml)
                return
            if kind == "delay":
                time.sleep(proxy.delay_s)
            conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
            finally:
                conn.close()
            if kind == "cut" and (self.command == "HEAD" or len(data) < 2):
                self._die()  # nothing to cut in half: the request was done, the answer is lost
                return
            self.send_response_only(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() not in _HOP_HEADERS | {"content-length", "date", "server"}:
                    self.send_header(k, v)
            length = resp.getheader("Content-Length") if self.command == "HEAD" else len(data)
            self.send_header("Content-Length", str(length or 0))
            self.end_headers()
            if kind == "cut":  # half the body, then the connection dies
                self.wfile.write(data[:len(data) // 2])
                self._die()
            elif self.command != "HEAD":
                self.wfile.write(data)

        def _die(self) -> None:
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

    return Handler
