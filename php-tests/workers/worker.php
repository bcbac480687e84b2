<?php
// A worker under test: a MessageRouter\Router built from the JSON config file $argv[1],
// one handler for every handler of the config, behaving per message header `behave`:
//   ok (default)      return (ack)
//   fail              throw RuntimeException("boom <id>")
//   fail-until:N      throw RuntimeException until attempt N
//   retry-later:S     throw RetryLater(S) on attempt 1
//   reject            throw Reject("bad <id>")
//   slow:MS           sleep MS milliseconds, then return
//   exit              exit(3) the first time this message is seen (a marker file
//                     beside the log remembers it across workers: a classic RabbitMQ
//                     queue redelivers with no delivery count)
//   fatal             a fatal error the first time, likewise
// Every call is appended to the log $argv[2] as a JSON line when it starts ("start")
// and when it returns ("done"); run() options are the JSON $argv[3]. The run's result
// is printed as JSON on stdout.

use MessageRouter\{Message, Reject, RetryLater, Router};

[$_, $configFile, $log] = $argv;
$options = json_decode($argv[3] ?? '{}', true) ?: [];
$config = json_decode(file_get_contents($configFile), true);

function note(string $log, string $event, Message $m): void
{
    file_put_contents($log, json_encode([
        'event' => $event, 'id' => $m->id(), 'attempt' => $m->attempt(), 'time' => microtime(true),
        'route' => $m->route(), 'handler' => $m->handler(), 'subscription' => $m->subscription(),
        'source' => $m->source(), 'key' => $m->key(), 'body' => $m->body(), 'headers' => $m->headers(),
        'pid' => getmypid(),
    ]) . "\n", FILE_APPEND | LOCK_EX);
}

function first_time(string $log, Message $m): bool
{
    $marker = dirname($log) . '/seen-' . sha1($m->id());
    return @mkdir($marker);
}

$handle = function (Message $m) use ($log): void {
    note($log, 'start', $m);
    [$mode, $arg] = array_pad(explode(':', $m->header('behave') ?? 'ok', 2), 2, '');
    $first = $m->attempt() === 1;
    switch ($mode) {
        case 'fail':
            throw new RuntimeException('boom ' . $m->id());
        case 'fail-until':
            if ($m->attempt() < (int) $arg) {
                throw new RuntimeException('not yet ' . $m->id());
            }
            break;
        case 'retry-later':
            if ($first) {
                throw new RetryLater((float) $arg, 'later ' . $m->id());
            }
            break;
        case 'reject':
            throw new Reject('bad ' . $m->id());
        case 'slow':
            usleep((int) $arg * 1000);
            break;
        case 'exit':
            if (first_time($log, $m)) {
                exit(3);
            }
            break;
        case 'fatal':
            if (first_time($log, $m)) {
                trigger_error('fatal on purpose', E_USER_ERROR);
            }
            break;
    }
    note($log, 'done', $m);
};

$router = new Router($config);
foreach (array_keys($config['handlers']) as $name) {
    $router->route($name, $handle);
}
echo json_encode($router->run($options)), "\n";
