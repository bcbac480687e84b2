<?php
// Latency probe of the benches (bench/src/). The sender puts its wall-clock send time
// (unix nanoseconds) in the message header `sent-ns`, which arrives as the HTTP header
// X-Message-Header-Sent-Ns. This appends "<sent_ns> <latency_ns>\n" to $STAMP_LOG,
// where latency = the moment this script starts running minus the send time.
// microtime() as a string keeps every microsecond (a float would round them away).
[$usec, $sec] = explode(' ', microtime());
$now = (int)$sec * 1000000000 + (int)round((float)$usec * 1e9);
file_get_contents('php://input');
$sent = (int)($_SERVER['HTTP_X_MESSAGE_HEADER_SENT_NS'] ?? 0);
$log = getenv('STAMP_LOG');
if ($sent > 0 && $log) {
    // One short line per request: O_APPEND writes this small are not interleaved.
    file_put_contents($log, $sent . ' ' . ($now - $sent) . "\n", FILE_APPEND);
}
http_response_code(204);
