"""Test handler for the gRPC target: a Python grpcio server of
message_router.v1.Handler, its stubs generated at start from the repository's proto.

Behaviour per message from the header `behave` (x-message-header-behave), as the PHP
test handler's:
  ok (default)   ACK
  reject         REJECT with a reason
  later:MS       RETRY after MS ms until attempt 2, then ACK
  fail           the call fails with UNAVAILABLE (a retry per policy)
  status:NAME    the call fails with that gRPC status code (e.g. INVALID_ARGUMENT)
  slow:MS        sleep MS ms, then ACK
Every call is appended as one JSON line to $HANDLER_LOG.
Usage: grpc_handler.py PORT  (prints "listening PORT" once serving)
"""
import hashlib
import json
import os
import sys
import threading
import time
from concurrent import futures

import grpc

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "proto"))
pb2, pb2_grpc = grpc.protos_and_services("message_router/v1/handler.proto")
LOG = os.environ.get("HANDLER_LOG")
LOCK = threading.Lock()


def log(request, status):
    if not LOG:
        return
    line = json.dumps({
        "id": request.id,
        "attempt": request.attempt,
        "status": status,
        "port": 0,
        "time": time.time(),
        "body_sha1": hashlib.sha1(request.body).hexdigest(),
        "pool": "grpc",
        "headers": dict(request.headers),
    })
    with LOCK, open(LOG, "a") as f:
        f.write(line + "\n")


class Handler(pb2_grpc.HandlerServicer):
    def Deliver(self, request, context):
        mode, _, arg = request.headers.get("x-message-header-behave", "ok").partition(":")
        Result = pb2.DeliverResponse.Result
        if mode == "reject":
            log(request, 422)
            return pb2.DeliverResponse(result=Result.REJECT, reason="invalid order payload")
        if mode == "later" and request.attempt < 2:
            log(request, 429)
            return pb2.DeliverResponse(result=Result.RETRY, retry_after_ms=int(arg), reason="not now")
        if mode == "fail":
            log(request, 503)
            context.abort(grpc.StatusCode.UNAVAILABLE, "backend down")
        if mode == "status":
            log(request, 500)
            context.abort(getattr(grpc.StatusCode, arg), "failed on purpose")
        if mode == "slow":
            time.sleep(int(arg) / 1000)
        log(request, 200)
        return pb2.DeliverResponse(result=Result.ACK)


def main():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16),
                         options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)])
    pb2_grpc.add_HandlerServicer_to_server(Handler(), server)
    port = server.add_insecure_port(f"127.0.0.1:{sys.argv[1]}")
    server.start()
    print(f"listening {port}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
