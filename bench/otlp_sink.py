#!/usr/bin/env python3
"""A do-nothing OTLP/HTTP receiver for `bench/run ... --tracing-endpoint`: answers every
POST /v1/traces with 200 (an empty ExportTraceServiceResponse) and, at exit (Ctrl-C,
SIGTERM), prints how many export requests and bytes it took.

    python3 bench/otlp_sink.py 4318 &
    bench/run amqp --tracing-endpoint http://127.0.0.1:4318
"""
import http.server
import signal
import sys

requests = 0
received = 0


class Sink(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        global requests, received
        length = int(self.headers.get("content-length", 0))
        self.rfile.read(length)
        requests += 1
        received += length
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def report(*_):
    print(f"otlp sink: {requests} export requests, {received} bytes", file=sys.stderr)
    sys.exit(0)


signal.signal(signal.SIGTERM, report)
signal.signal(signal.SIGINT, report)
port = int(sys.argv[1]) if len(sys.argv) > 1 else 4318
http.server.ThreadingHTTPServer(("127.0.0.1", port), Sink).serve_forever()
