<?php
// The router's in-process worker (the message_router extension) with a no-op handler:
//   php inprocess.php amqp QUEUE N OUT | redis STREAM N OUT | idle Q1,Q2,... SECONDS
require __DIR__ . '/common.php';

[$_, $kind, $names, $n, $out] = $argv + [4 => null];
$subs = [];
$transports = [];
if ($kind === 'redis') {
    $transports['redis'] = ['type' => 'redis', 'url' => 'redis://127.0.0.1:6379', 'consumer' => 'bench'];
    $subs['main'] = ['transport' => 'redis', 'streams' => [$names], 'group' => "$names-router", 'prefetch' => 256];
} else {
    $transports['rabbit'] = ['type' => 'amqp', 'url' => 'amqp://guest:guest@127.0.0.1:5672/%2f'];
    foreach (explode(',', $names) as $i => $q) {
        $subs["s$i"] = ['transport' => 'rabbit', 'queue' => $q, 'prefetch' => 256];
    }
}
$router = new MessageRouter\Router([
    'log' => ['level' => 'warn'],
    'transports' => $transports,
    'handlers' => ['noop' => ['max_in_flight' => 256]],
    'subscriptions' => $subs,
    'routes' => [['name' => 'all', 'handler' => 'noop']],
]);
$router->route('all', static function (MessageRouter\Message $m): void {
    Tally::hit();
});
$options = $kind === 'idle' ? ['time_limit' => (int) $n] : ['limit' => (int) $n];
$router->run($options);
if ($out) {
    Tally::report($out);
}
