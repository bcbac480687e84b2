<?php
// An OTLP/HTTP receiver for the tracing test, under php -S: every request is appended
// to $OTLP_LOG as a JSON line (method, path, content type, the body in hex), and
// answered 200 with an empty ExportTraceServiceResponse.
$body = file_get_contents('php://input');
file_put_contents(getenv('OTLP_LOG'), json_encode([
    'method' => $_SERVER['REQUEST_METHOD'],
    'path' => parse_url($_SERVER['REQUEST_URI'], PHP_URL_PATH),
    'content_type' => $_SERVER['CONTENT_TYPE'] ?? '',
    'body' => bin2hex($body),
]) . "\n", FILE_APPEND | LOCK_EX);
header('Content-Type: application/x-protobuf');
http_response_code(200);
