"""An OTLP/gRPC receiver for the tracing test: serves
opentelemetry.proto.collector.trace.v1.TraceService/Export on 127.0.0.1:<argv[1]>,
appends each ExportTraceServiceRequest as it arrived (protobuf, in hex) to the file
argv[2], one line per call, and answers an empty ExportTraceServiceResponse. The test
decodes the lines with the official proto types (tests/support/otlp.rs)."""

import sys
from concurrent import futures

import grpc

port, log = sys.argv[1], sys.argv[2]


def export(request: bytes, context) -> bytes:
    with open(log, "a") as f:
        f.write(request.hex() + "\n")
    return b""


service = grpc.method_handlers_generic_handler(
    "opentelemetry.proto.collector.trace.v1.TraceService",
    {"Export": grpc.unary_unary_rpc_method_handler(export)},
)
server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
server.add_generic_rpc_handlers((service,))
server.add_insecure_port(f"127.0.0.1:{port}")
server.start()
server.wait_for_termination()
