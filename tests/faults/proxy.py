"""A fault-injecting HTTP proxy for storage tests.

``FaultProxy(upstream)`` listens on 127.0.0.1 and forwards every request to ``upstream`` (the
moto S3 server), except where a fault is due.  Point ``AWS_ENDPOINT_URL`` at ``proxy.endpoint``
and the S3 client in front of it meets, as configured:

- ``error_rate``: answer 500 or 503 (alternating) with an S3 error body instead of forwarding;
- ``drop_rate``: send the status line, the headers and half the body, then close the
  connection (a reset mid-download);
- ``delay``: sleep this long before answering (a slow server);
- ``outage(seconds)``: stop listening, so connections are refused, then listen again on the
  same port (a server that stops for a while); ``outage_after`` starts one by itself once that
  many faultable requests were seen;
- ``expired_after``: from that many faultable requests on, answer 400 ``ExpiredToken`` as S3
  does when temporary credentials run out.

Faults apply only to requests that ``faultable(method, path)`` accepts: by default object reads
(GET or HEAD of a ``.tar``), so that listing the bucket at start-up stays clean; ``uploads`` picks
object writes instead.  Random choices come from one seeded generator; ``counts`` records what was
forwarded and what was injected, and ``forwarded`` every request the server answered, in order:
``(time, method, path, status, body)`` with the body of small writes (up to 64 bytes).
"""

from __future__ import annotations

import http.client
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}
_S3_ERROR = ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
             '<RequestId>dsclip-fault-proxy</RequestId></Error>')


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:  # clients hang up on purpose here
        pass


def object_reads(method: str, path: str) -> bool:
    return method in ("GET", "HEAD") and urlsplit(path).path.endswith(".tar")


def uploads(method: str, path: str) -> bool:
    return method == "PUT"


class FaultProxy:
    def __init__(self, upstream: str, *, error_rate: float = 0.0, drop_rate: float = 0.0, delay: float = 0.0,
                 outage_after: int | None = None, outage_seconds: float = 0.0, expired_after: int | None = None,
                 faultable: Callable[[str, str], bool] = object_reads, seed: int = 0):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.error_rate, self.drop_rate, self.delay = error_rate, drop_rate, delay
        self.outage_after, self.outage_seconds = outage_after, outage_seconds
        self.expired_after, self.faultable = expired_after, faultable
        self.counts: Counter = Counter()
        self.forwarded: list[tuple[float, str, str, int, bytes]] = []
        self.port = 0
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._outage_timer: threading.Timer | None = None
        self._down = False

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- life cycle

    def start(self) -> FaultProxy:
        for attempt in range(50):  # after an outage the old socket may linger for a moment
            try:
                server = _QuietServer(("127.0.0.1", self.port), self._handler_class())
                break
            except OSError:
                if attempt == 49:
                    raise
                time.sleep(0.1)
        self._server = server
        self._down = False
        self.port = server.server_address[1]
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def outage(self, seconds: float) -> None:
        """Refuse connections for ``seconds`` (in the background), then serve again.  Kept-alive
        connections are cut too: a stopped server answers nothing."""
        with self._lock:
            self.counts["outages"] += 1
            self._down = True
        threading.Thread(target=self.stop, daemon=True).start()
        self._outage_timer = threading.Timer(seconds, self.start)
        self._outage_timer.daemon = True
        self._outage_timer.start()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        if self._outage_timer is not None:
            self._outage_timer.cancel()
            self._outage_timer.join(timeout=10)
        self.stop()

    # -- deciding

    def _decide(self, method: str, path: str) -> str:
        with self._lock:
            if not self.faultable(method, path):
                return "forward"
            n = self.counts["faultable"]
            self.counts["faultable"] += 1
            if self.expired_after is not None and n >= self.expired_after:
                return "expired"
            if self.outage_after is not None and n == self.outage_after:
                return "outage"
            roll = self._rng.random()
            if roll < self.error_rate:
                return "error"
            if roll < self.error_rate + self.drop_rate:
                return "drop"
            return "forward"

    def _handler_class(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _relay(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if proxy._down:
                    self._close_abruptly()
                    return
                action = proxy._decide(self.command, self.path)
                if proxy.delay:
                    time.sleep(proxy.delay)
                if action == "outage":
                    with proxy._lock:
                        proxy.counts["injected_outage"] += 1
                    proxy.outage(proxy.outage_seconds)
                    self._close_abruptly()
                    return
                if action == "error":
                    with proxy._lock:
                        proxy.counts["injected_error"] += 1
                        status = 500 if proxy.counts["injected_error"] % 2 else 503
                    code = "InternalError" if status == 500 else "SlowDown"
                    self._answer(status, _S3_ERROR.format(code=code, message="injected by the fault proxy"))
                    return
                if action == "expired":
                    with proxy._lock:
                        proxy.counts["injected_expired"] += 1
                    self._answer(400, _S3_ERROR.format(code="ExpiredToken",
                                                       message="The provided token has expired."))
                    return
                status, reason, headers, data = self._forward(body)
                with proxy._lock:
                    proxy.counts["forwarded"] += 1
                    small = body if body is not None and len(body) <= 64 else b""
                    proxy.forwarded.append((time.time(), self.command, urlsplit(self.path).path, status, small))
                self.send_response(status, reason)
                for k, v in headers:  # a HEAD answer keeps the object's Content-Length
                    if k.lower() not in _HOP_BY_HOP and (k.lower() != "content-length" or self.command == "HEAD"):
                        self.send_header(k, v)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                if action == "drop" and len(data) > 1:
                    with proxy._lock:
                        proxy.counts["injected_drop"] += 1
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self._close_abruptly()
                    return
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _forward(self, body: bytes | None):
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=30)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    return resp.status, resp.reason, resp.getheaders(), resp.read()
                finally:
                    conn.close()

            def _answer(self, status: int, text: str) -> None:
                data = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":  # S3 answers a failed HEAD with the status alone
                    self.wfile.write(data)

            def _close_abruptly(self) -> None:
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _relay

        return Handler
