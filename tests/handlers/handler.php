<?php
// Test handler for the daemon's end-to-end tests, served by `php -S` (the honest
// stand-in for a PHP-FPM pod). Behaviour is chosen per message by the message header
// `behave` (arriving as X-Message-Header-Behave):
//   ok (default)     200
//   fail             500 with a body
//   fail-until:N     500 until attempt N, then 200
//   reject           422 with a body (poison message)
//   busy:S           429 with Retry-After: S, until attempt 2, then 200
//   slow:MS          sleep MS milliseconds, then 200
//   warn             error_log() a line (PHP-FPM sends it as a FastCGI stderr record), 200
//   hang:MS          log the request at once (status 0), then sleep MS ms and 200:
//                    lets a test see a message is being handled, then kill the router
// While the file $HANDLER_DOWN_FILE exists, every request answers 500 whatever its
// behaviour (a handler whose database is down).
// Every request is appended as one JSON line to $HANDLER_LOG (flock'ed), so tests can
// count what each message id went through.

$headers = [];
foreach ($_SERVER as $k => $v) {
    if (str_starts_with($k, 'HTTP_')) {
        $headers[strtolower(str_replace('_', '-', substr($k, 5)))] = $v;
    }
}
$headers['content-type'] = $_SERVER['CONTENT_TYPE'] ?? '';
$body = file_get_contents('php://input');
$attempt = (int)($headers['x-router-attempt'] ?? 1);
$behave = $headers['x-message-header-behave'] ?? 'ok';
[$mode, $arg] = array_pad(explode(':', $behave, 2), 2, '');

$status = 200;
$out = "ok\n";
$extra = [];
$down = getenv('HANDLER_DOWN_FILE');
if ($down && file_exists($down)) {
    $mode = 'down';
    $status = 500; $out = "database unreachable\n";
}
switch ($mode) {
    case 'fail':
        $status = 500; $out = "handler failed on purpose\n"; break;
    case 'fail-until':
        if ($attempt < (int)$arg) { $status = 500; $out = "not yet\n"; }
        break;
    case 'reject':
        $status = 422; $out = "invalid order payload\n"; break;
    case 'busy':
        if ($attempt < 2) { $status = 429; $extra[] = 'Retry-After: ' . (int)$arg; $out = "slow down\n"; }
        break;
    case 'slow':
        usleep((int)$arg * 1000); break;
    case 'warn':
        error_log('handler warning for ' . ($headers['ce-id'] ?? '?')); break;
}

$log = getenv('HANDLER_LOG');
function log_request($log, $headers, $attempt, $status, $body) {
    if (!$log) {
        return;
    }
    $line = json_encode([
        'id' => $headers['ce-id'] ?? null,
        'attempt' => $attempt,
        'status' => $status,
        'port' => (int)($_SERVER['SERVER_PORT'] ?? 0),
        'time' => microtime(true),
        'body_sha1' => sha1($body),
        'pool' => getenv('FPM_POOL') ?: '',
        'headers' => $headers,
    ]) . "\n";
    file_put_contents($log, $line, FILE_APPEND | LOCK_EX);
}
if ($mode === 'hang') {
    log_request($log, $headers, $attempt, 0, $body);
    usleep((int)$arg * 1000);
}
log_request($log, $headers, $attempt, $status, $body);
http_response_code($status);
foreach ($extra as $h) {
    header($h);
}
header('Content-Type: text/plain');
echo $out;
