<?php
// Benchmark (not a test): the same Symfony Messenger app (php-tests/messenger-app, its
// #[AsMessageHandler] Ping handler appending a line to handled.log) consumed by
// Symfony's `bin/console messenger:consume async --limit=N` and by the router's
// in-process worker `bin/console message-router:consume --limit=N` (the release
// extension), one process each, on RabbitMQ and Redis Streams, with Messenger's PHP
// serializer and the Symfony Serializer's JSON. Run it with `bench/run messenger-app`
// (builds the release extension). Options:
//   -n N                 messages per run (20000)
//   --rounds R           runs per contender, alternating messenger, router, … (3)
//   --brokers LIST       amqp,redis
//   --serializers LIST   php,json (the PHP serializer first)
//   --prefetch P         the router subscription's prefetch (64); Messenger 5.4 has none
//   --extension PATH, --out PATH
// Every run gets a fresh, uniquely named queue or stream filled with N Pings by the
// app's own bus (`bin/dispatch --pings N`), then one consumer process. The bench polls
// every 10 ms: handled.log's line count (first handled line → N-th line: the rate) and
// /proc/<pid>/status VmHWM (peak RSS). It also reports N over (wall time from the
// process start to its exit − the app's boot time, `bin/console list` with the same
// php command line). Report: bench/results/messenger_app.md (rewritten after each
// broker/serializer pair, so an interrupted run leaves what it measured).

$opts = getopt('n:', ['rounds:', 'brokers:', 'serializers:', 'prefetch:', 'extension:', 'out:']);
$n = (int) ($opts['n'] ?? 20000);
$rounds = (int) ($opts['rounds'] ?? 3);
$brokers = explode(',', $opts['brokers'] ?? 'amqp,redis');
$serializers = explode(',', $opts['serializers'] ?? 'php,json');
$prefetch = (int) ($opts['prefetch'] ?? 64);
$ext = $opts['extension'] ?? __DIR__ . '/../../target/release/librouter_php.so';
$out = $opts['out'] ?? __DIR__ . '/../results/messenger_app.md';
// The consumers run in the app's directory.
if (!is_file($ext) || !($ext = realpath($ext))) {
    fwrite(STDERR, "messenger-app bench: $ext not found: bench/run messenger-app builds it\n");
    exit(1);
}
if ($n < 2 || $rounds < 1 || array_diff($brokers, ['amqp', 'redis']) || array_diff($serializers, ['php', 'json'])) {
    fwrite(STDERR, "messenger-app bench: -n >= 2, --rounds >= 1, --brokers amqp,redis, --serializers php,json\n");
    exit(1);
}
const APP = __DIR__ . '/../../php-tests/messenger-app';
const POLL_US = 10000;
$php = PHP_BINARY;
$id = bin2hex(random_bytes(3));
$dir = sys_get_temp_dir() . "/messenger-app-bench-$id";
mkdir($dir);
$amqpUrl = getenv('AMQP_URL') ?: 'amqp://guest:guest@127.0.0.1:5672/%2f';
$redisHost = '127.0.0.1';
$redisPort = 6379;

require_once __DIR__ . '/amqp.php';

function redis(): Redis
{
    static $r;
    if (!$r) {
        $r = new Redis();
        $r->connect($GLOBALS['redisHost'], $GLOBALS['redisPort']);
    }
    return $r;
}

/** What is left of `$name` at the broker: AMQP ready messages, Redis pending entries. */
function leftover(string $kind, string $name): int
{
    if ($kind === 'amqp') {
        try {
            $q = new AMQPQueue(amqp());
            $q->setName($name);
            $q->setFlags(AMQP_PASSIVE);
            return $q->declareQueue();
        } catch (AMQPException $e) {
            return -1;
        }
    }
    // Delivered and not acked, and not delivered to the group at all.
    foreach (redis()->xInfo('GROUPS', $name) ?: [] as $g) {
        if ($g['name'] === 'symfony') {
            return (int) $g['pending'] + count(redis()->xRange($name, '(' . $g['last-delivered-id'], '+') ?: []);
        }
    }
    return -1;
}

/** Delete `$name` and what Messenger and the router made for it. */
function cleanup(string $kind, string $name): void
{
    if ($kind === 'amqp') {
        $all = [$name, "$name.dlq", "$name-failed"];
        foreach (['1s', '5s', '30s', '2m', '10m', '1h', '6h', '24h'] as $bucket) {
            $all[] = "$name.retry.$bucket";
        }
        foreach ($all as $q) {
            try {
                $queue = new AMQPQueue(amqp());
                $queue->setName($q);
                $queue->delete();
            } catch (AMQPException $e) {
                // Not there.
            }
            try {
                $ex = new AMQPExchange(amqp());
                $ex->setName($q);
                $ex->delete();
            } catch (AMQPException $e) {
                // Messenger's exchanges only.
            }
        }
        return;
    }
    redis()->del([$name, "$name.dlq", "$name.symfony.retry", "$name.symfony.delayed", "{$name}__queue", "$name-failed"]);
}

$made = [];
register_shutdown_function(static function () use (&$made, $dir): void {
    foreach ($made as [$kind, $name]) {
        cleanup($kind, $name);
    }
    exec('rm -rf ' . escapeshellarg($dir));
});

/** The app's environment for a queue or stream `$name`, and its router.yaml. */
function appEnv(string $kind, string $serializer, string $name): array
{
    global $dir, $amqpUrl, $redisHost, $redisPort, $prefetch;
    $router = [
        'transports' => ['broker' => $kind === 'amqp'
            ? ['type' => 'amqp', 'url' => $amqpUrl]
            : ['type' => 'redis', 'url' => "redis://$redisHost:$redisPort", 'consumer' => 'bench']],
        'handlers' => ['messenger' => ['timeout' => '10s']],
        'subscriptions' => ['async' => [
            'transport' => 'broker',
            'envelope' => 'messenger',
            'default_handler' => 'messenger',
            'prefetch' => $prefetch,
        ] + ($kind === 'amqp' ? ['queue' => $name] : ['streams' => [$name], 'group' => 'symfony'])],
    ];
    file_put_contents("$dir/router.yaml", json_encode($router));
    return [
        'APP_DIR' => $dir,
        'APP_TRANSPORT' => $kind,
        'APP_SERIALIZER' => $serializer,
        'APP_DSN' => $kind === 'amqp' ? "$amqpUrl/$name" : "redis://$redisHost:$redisPort/$name/symfony/app",
        'APP_FAILED_DSN' => $kind === 'amqp' ? "$amqpUrl/$name-failed" : "redis://$redisHost:$redisPort/$name-failed/symfony/app",
        'ROUTER_CONFIG' => "$dir/router.yaml",
    ] + getenv();
}

/** Run to its end; seconds it took. */
function sh(array $cmd, array $env, string $what): float
{
    global $dir;
    $t = microtime(true);
    $p = proc_open($cmd, [0 => ['file', '/dev/null', 'r'], 1 => ['file', "$dir/sh.out", 'w'], 2 => ['file', "$dir/sh.err", 'w']], $pipes, APP, $env);
    if (proc_close($p) !== 0) {
        throw new RuntimeException("$what failed: " . file_get_contents("$dir/sh.out") . file_get_contents("$dir/sh.err"));
    }
    return microtime(true) - $t;
}

function median(array $xs): float
{
    sort($xs);
    $c = count($xs);
    return $c % 2 ? $xs[intdiv($c, 2)] : ($xs[$c / 2 - 1] + $xs[$c / 2]) / 2;
}

/**
 * One consumer process over a filled queue: polls handled.log and VmHWM every 10 ms.
 *
 * @return array{first: float, last: float, wall: float, lines: int, hwm_kib: int, exit: int}
 */
function consume(array $cmd, array $env, int $n, string $label): array
{
    global $dir;
    $log = "$dir/handled.log";
    @unlink($log);
    $t0 = microtime(true);
    $p = proc_open($cmd, [0 => ['file', '/dev/null', 'r'], 1 => ['file', "$dir/$label.out", 'w'], 2 => ['file', "$dir/$label.err", 'w']], $pipes, APP, $env);
    $pid = proc_get_status($p)['pid'];
    $hwm = 0;
    $lines = 0;
    $fh = null;
    $first = $last = null;
    $count = static function () use (&$fh, &$lines, $log): void {
        $fh ??= @fopen($log, 'r') ?: null;
        if ($fh) {
            while (($chunk = fread($fh, 1 << 16)) !== '' && $chunk !== false) {
                $lines += substr_count($chunk, "\n");
            }
        }
    };
    while (true) {
        // Before proc_get_status: once it has reaped the process, /proc/<pid> is gone.
        if (preg_match('/VmHWM:\s+(\d+)/', (string) @file_get_contents("/proc/$pid/status"), $m)) {
            $hwm = max($hwm, (int) $m[1]);
        }
        $count();
        $now = microtime(true);
        if ($lines > 0 && $first === null) {
            $first = $now;
        }
        if ($lines >= $n && $last === null) {
            $last = $now;
        }
        $status = proc_get_status($p);
        if (!$status['running']) {
            $wall = microtime(true) - $t0;
            $exit = $status['exitcode'];
            break;
        }
        if ($now - $t0 > 900) {
            proc_terminate($p, SIGKILL);
            throw new RuntimeException("$label: still running after 900 s, $lines of $n handled");
        }
        usleep(POLL_US);
    }
    proc_close($p);
    $count();
    $now = microtime(true);
    $first ??= $now;
    $last ??= $now;
    return ['first' => $first, 'last' => $last, 'wall' => $wall, 'lines' => $lines, 'hwm_kib' => $hwm, 'exit' => $exit];
}

$contenders = [
    'messenger' => [$php, 'bin/console', 'messenger:consume', 'async', "--limit=$n"],
    'router' => [$php, '-d', "extension=$ext", 'bin/console', 'message-router:consume', "--limit=$n"],
];
$boot = [
    'messenger' => [$php, 'bin/console', 'list'],
    'router' => [$php, '-d', "extension=$ext", 'bin/console', 'list'],
];

$results = [];
$notes = [];
$fmt = fn (float $x) => number_format($x, 0, '.', ' ');
$mib = fn (float $kib) => number_format($kib / 1024, 1);

$report = function () use (&$results, &$notes, $n, $rounds, $prefetch, $fmt, $mib, $out): string {
    $md = "# Symfony Messenger app: messenger:consume vs message-router:consume\n\n";
    $md .= sprintf("%d messages per run, %d runs per contender alternating (messenger, router, …), one consumer process each; the app php-tests/messenger-app, its Ping handler appending a line to handled.log (%s, %s, PHP %s, load average %s at the end).\n\n",
        $n, $rounds, date('Y-m-d H:i'), php_uname('n'), PHP_VERSION, implode(' ', array_map(fn ($l) => sprintf('%.1f', $l), sys_getloadavg())));
    $md .= "**rate** = (N − 1) / (time of the first handled.log line → time of the N-th), polled every 10 ms. ";
    $md .= "**wall − boot** = N / (process start → exit, minus the median time of `bin/console list` with the same php command line). ";
    $md .= "**peak RSS** = the consumer's VmHWM (/proc/<pid>/status, polled). Medians of the runs.\n\n";
    $md .= "Prefetch: the router subscription `prefetch: $prefetch`. Messenger 5.4 (Debian) has no prefetch to set: its AMQP receiver takes one message per `basic.get` round trip (`prefetch_count` is deprecated since 5.3 and ignored), its Redis receiver one entry per `XREADGROUP … COUNT 1`.\n\n";
    $md .= "| broker | serializer | messenger:consume msg/s | message-router:consume msg/s | router / Messenger | wall − boot: Messenger / router msg/s | ratio | boot (list): Messenger / router s | peak RSS: Messenger / router MiB |\n";
    $md .= "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n";
    foreach ($results as $key => $r) {
        [$broker, $ser] = explode('/', $key);
        $med = [];
        foreach (['messenger', 'router'] as $c) {
            $runs = array_filter($r['runs'][$c] ?? [], fn ($x) => $x['ok']);
            if (!$runs) {
                continue 2;
            }
            $med[$c] = [
                'rate' => median(array_column($runs, 'rate')),
                'net' => median(array_column($runs, 'net')),
                'hwm' => median(array_column($runs, 'hwm_kib')),
            ];
        }
        $md .= sprintf("| %s | %s | %s | %s | **%.2f×** | %s / %s | %.2f× | %.2f / %.2f | %s / %s |\n",
            $broker === 'amqp' ? 'RabbitMQ' : 'Redis Streams', $ser === 'php' ? 'PHP' : 'JSON',
            $fmt($med['messenger']['rate']), $fmt($med['router']['rate']), $med['router']['rate'] / $med['messenger']['rate'],
            $fmt($med['messenger']['net']), $fmt($med['router']['net']), $med['router']['net'] / $med['messenger']['net'],
            $r['boot']['messenger'], $r['boot']['router'],
            $mib($med['messenger']['hwm']), $mib($med['router']['hwm']));
    }
    $md .= "\nEvery run:\n\n| broker | serializer | # | contender | rate msg/s | first → last line s | wall s | wall − boot msg/s | peak RSS MiB | lines | left at broker | fill s |\n";
    $md .= "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n";
    foreach ($results as $key => $r) {
        [$broker, $ser] = explode('/', $key);
        foreach ($r['order'] as [$c, $i]) {
            $x = $r['runs'][$c][$i];
            $md .= sprintf("| %s | %s | %d | %s | %s | %.2f | %.2f | %s | %s | %d | %d | %.1f |\n", $broker, $ser, $i + 1, $c,
                $x['ok'] ? $fmt($x['rate']) : 'failed (below)', $x['last'] - $x['first'], $x['wall'], $x['ok'] ? $fmt($x['net']) : '—', $mib($x['hwm_kib']), $x['lines'], $x['left'], $x['fill']);
        }
    }
    if ($notes) {
        $md .= "\nRuns that did not handle exactly N messages and exit 0 are left out of the medians; every anomaly:\n\n" . implode("\n", array_map(fn ($s) => "- $s", $notes)) . "\n";
    }
    @mkdir(dirname($out), 0777, true);
    file_put_contents($out, $md);
    return $md;
};

foreach ($serializers as $ser) {
    foreach ($brokers as $broker) {
        $key = "$broker/$ser";
        fwrite(STDERR, "messenger-app bench: $broker, $ser serializer, $n messages, $rounds rounds\n");
        // Warm the container cache (one per transport kind and serializer), then time
        // the app's boot: `bin/console list`, three times per php command line.
        $env = appEnv($broker, $ser, "bench-mapp-warm-$id");
        sh($boot['messenger'], $env, 'warm-up');
        $results[$key] = ['runs' => [], 'order' => [], 'boot' => []];
        foreach ($boot as $c => $cmd) {
            $results[$key]['boot'][$c] = median(array_map(fn () => sh($cmd, $env, "$c boot"), range(1, 3)));
        }
        for ($i = 0; $i < $rounds; $i++) {
            foreach ($contenders as $c => $cmd) {
                $name = "bench-mapp-$broker-$ser-$c-$i-$id";
                $made[] = [$broker, $name];
                $env = appEnv($broker, $ser, $name);
                $fill = sh([$php, 'bin/dispatch', '--pings', (string) $n, 'b-'], $env, 'bin/dispatch');
                $r = consume($cmd, $env, $n, "$broker-$ser-$c-$i");
                $r['fill'] = $fill;
                $r['rate'] = ($n - 1) / max(1e-6, $r['last'] - $r['first']);
                $r['net'] = $n / max(1e-6, $r['wall'] - $results[$key]['boot'][$c]);
                $r['left'] = leftover($broker, $name);
                $r['ok'] = $r['exit'] === 0 && $r['lines'] === $n;
                if (!$r['ok'] || $r['left'] !== 0) {
                    $notes[] = sprintf('%s %s run %d (%s): exit %d, %d lines of %d, %d left at the broker; its output: %s', $broker, $ser, $i + 1, $c,
                        $r['exit'], $r['lines'], $n, $r['left'], trim(substr((string) file_get_contents("$dir/$broker-$ser-$c-$i.out") . ' ' . file_get_contents("$dir/$broker-$ser-$c-$i.err"), 0, 400)));
                }
                fwrite(STDERR, sprintf("  %s #%d: %s msg/s (first→last %.2f s, wall %.2f s), peak RSS %s MiB, %d lines, fill %.1f s\n",
                    $c, $i + 1, $fmt($r['rate']), $r['last'] - $r['first'], $r['wall'], $mib($r['hwm_kib']), $r['lines'], $fill));
                $results[$key]['runs'][$c][$i] = $r;
                $results[$key]['order'][] = [$c, $i];
                cleanup($broker, $name);
            }
        }
        $report();
    }
}
cleanup('amqp', "bench-mapp-warm-$id");
cleanup('redis', "bench-mapp-warm-$id");
echo "\n" . $report();
