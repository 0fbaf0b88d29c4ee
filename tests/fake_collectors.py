"""Collectors that misbehave, on 127.0.0.1 only: one that accepts connections and never answers,
an HTTP one that answers 503 to everything, a gRPC one whose Export never returns.
Each is a context manager with .endpoint."""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class SilentCollector:
    """Accepts connections and reads what is sent, never answers (HTTP or gRPC alike: a gRPC
    client never even gets the HTTP/2 handshake done)."""

    def __init__(self):
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self._closed.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._swallow, args=(conn,), daemon=True).start()

    def _swallow(self, conn):
        with conn:
            while not self._closed.is_set():
                try:
                    if not conn.recv(65536):
                        return
                except OSError:
                    return

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._closed.set()
        self._listener.close()


class HttpStatusCollector:
    """An OTLP/HTTP endpoint that always answers with one HTTP status."""

    def __init__(self, status: int):
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()


class Http503Collector(HttpStatusCollector):
    """503 Service Unavailable (a retryable status)."""

    def __init__(self):
        super().__init__(503)


class GrpcHangingCollector:
    """A real gRPC server whose trace and metrics Export calls never return."""

    def __init__(self):
        import grpc
        from concurrent import futures

        self._release = threading.Event()

        def hang(request, context):
            self._release.wait()
            context.abort(grpc.StatusCode.UNAVAILABLE, "closing")

        handler = grpc.unary_unary_rpc_method_handler(hang)  # requests and responses as raw bytes
        services = [grpc.method_handlers_generic_handler(f"opentelemetry.proto.collector.{kind}.v1.{name}", {"Export": handler})
                    for kind, name in (("trace", "TraceService"), ("metrics", "MetricsService"))]
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), handlers=services)
        port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()
        self.endpoint = f"http://127.0.0.1:{port}"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._release.set()
        self._server.stop(grace=0)
