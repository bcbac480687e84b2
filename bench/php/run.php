<?php
// Benchmark (not a test): one in-process router worker (the message_router extension)
// with a no-op PHP handler, side by side in one run with the raw PHP client loop and
// Symfony Messenger's messenger:consume, on RabbitMQ and Redis Streams; then memory:
// one worker with S subscriptions against S messenger:consume processes. Run it with
// `bench/run php` (builds the release extension); options: -n N, --subs S (100).
// Each contender gets a fresh queue or stream of N messages (Messenger's written
// through its own sender, as it reads only its own envelopes); the rate is N over the
// time from its first handled message to its last. Report: bench/results/php_inprocess.md.

$opts = getopt('n:', ['subs:', 'extension:', 'out:']);
$n = (int) ($opts['n'] ?? 20000);
$subs = (int) ($opts['subs'] ?? 100);
$ext = $opts['extension'] ?? __DIR__ . '/../../target/release/librouter_php.so';
$out = $opts['out'] ?? __DIR__ . '/../results/php_inprocess.md';
if (!is_file($ext)) {
    fwrite(STDERR, "php bench: $ext not found: bench/run php builds it\n");
    exit(1);
}
$php = PHP_BINARY;
$dir = sys_get_temp_dir() . '/php-bench-' . bin2hex(random_bytes(4));
mkdir($dir);

function sh(array $cmd): void
{
    $p = proc_open($cmd, [0 => ['file', '/dev/null', 'r'], 1 => STDOUT, 2 => STDERR], $pipes);
    if (proc_close($p) !== 0) {
        throw new RuntimeException('failed: ' . implode(' ', $cmd));
    }
}

require_once __DIR__ . '/amqp.php';

function fill_amqp(string $q, int $n): void
{
    $queue = new AMQPQueue(amqp());
    $queue->setName($q);
    $queue->setFlags(AMQP_DURABLE);
    $queue->declareQueue();
    $ex = new AMQPExchange(amqp());
    for ($i = 0; $i < $n; $i++) {
        $ex->publish('{"order":' . $i . '}', $q, AMQP_NOPARAM, ['message_id' => "m-$i", 'delivery_mode' => 2]);
    }
}

function delete_amqp(string ...$names): void
{
    // With the queues the router declared for them: its eight delay queues and the
    // dead-letter queue (100 subscriptions leave 1 000 otherwise, every run).
    $all = [];
    foreach ($names as $name) {
        $all[] = $name;
        foreach (['1s', '5s', '30s', '2m', '10m', '1h', '6h', '24h'] as $bucket) {
            $all[] = "$name.retry.$bucket";
        }
        $all[] = "$name.dlq";
    }
    foreach ($all as $name) {
        try {
            $q = new AMQPQueue(amqp());
            $q->setName($name);
            $q->delete();
            $e = new AMQPExchange(amqp());
            $e->setName($name);
            $e->delete();
        } catch (AMQPException $e) {
            // Not there (the exchange exists for Messenger's queues only).
        }
    }
}

function redis(): Redis
{
    static $r;
    if (!$r) {
        $r = new Redis();
        $r->connect('127.0.0.1', 6379);
    }
    return $r;
}

function fill_redis(string $s, int $n, ?string $group): void
{
    for ($i = 0; $i < $n; $i += 500) {
        $p = redis()->multi(Redis::PIPELINE);
        for ($j = $i; $j < min($n, $i + 500); $j++) {
            $p->xAdd($s, '*', ['message_id' => "m-$j", 'body' => '{"order":' . $j . '}']);
        }
        $p->exec();
    }
    if ($group) {
        redis()->xGroup('CREATE', $s, $group, '0');
    }
}

/** Run a contender; its msg/s from the record it wrote. */
function rate(array $cmd, string $record): float
{
    sh($cmd);
    $r = json_decode((string) file_get_contents($record), true);
    $secs = max(1e-6, $r['last'] - $r['first']);
    return ($r['handled'] - 1) / $secs;
}

$id = bin2hex(random_bytes(3));
$withExt = [$php, '-d', "extension=$ext"];
$rows = [];
foreach (['amqp', 'redis'] as $broker) {
    $names = ["bench-router-$broker-$id", "bench-raw-$broker-$id", "bench-messenger-$broker-$id"];
    [$r, $w, $m] = $names;
    fwrite(STDERR, "php bench: $broker, $n messages each\n");
    if ($broker === 'amqp') {
        fill_amqp($r, $n);
        fill_amqp($w, $n);
    } else {
        fill_redis($r, $n, null);
        fill_redis($w, $n, "$w-raw");
    }
    sh([$php, __DIR__ . '/messenger.php', 'fill', $broker, $m, (string) $n]);
    $rows[$broker] = [
        'router' => rate([...$withExt, __DIR__ . '/inprocess.php', $broker, $r, (string) $n, "$dir/r.json"], "$dir/r.json"),
        'raw' => rate([$php, __DIR__ . '/raw.php', $broker, $w, (string) $n, "$dir/w.json"], "$dir/w.json"),
        'messenger' => rate([$php, __DIR__ . '/messenger.php', 'consume', $broker, $m, (string) $n, "$dir/m.json"], "$dir/m.json"),
    ];
    // With the keys the router made for its stream (group "<stream>-router").
    $broker === 'amqp' ? delete_amqp(...$names) : redis()->del([...$names, "$r.$r-router.retry", "$r.$r-router.delayed", "$r.dlq"]);
}

// Memory: S idle subscriptions in one worker, against S messenger:consume processes.
/** [RSS, PSS, PSS anonymous, PSS of file mappings, PSS of the extension's .so] in KiB. */
function mem(int $pid): array
{
    $status = (string) @file_get_contents("/proc/$pid/status");
    $roll = (string) @file_get_contents("/proc/$pid/smaps_rollup");
    preg_match('/VmRSS:\s+(\d+)/', $status, $rss);
    preg_match('/^Pss:\s+(\d+)/m', $roll, $pss);
    preg_match('/^Pss_Anon:\s+(\d+)/m', $roll, $anon);
    preg_match('/^Pss_File:\s+(\d+)/m', $roll, $file);
    // The extension's own mappings (code, data): smaps per mapping.
    $so = 0;
    $inSo = false;
    foreach (explode("\n", (string) @file_get_contents("/proc/$pid/smaps")) as $line) {
        if (preg_match('/^[0-9a-f]+-[0-9a-f]+ /', $line)) {
            $inSo = str_ends_with(rtrim($line), 'librouter_php.so');
        } elseif ($inSo && preg_match('/^Pss:\s+(\d+)/', $line, $m)) {
            $so += (int) $m[1];
        }
    }
    return [(int) ($rss[1] ?? 0), (int) ($pss[1] ?? 0), (int) ($anon[1] ?? 0), (int) ($file[1] ?? 0), $so];
}

$queues = [];
for ($i = 0; $i < $subs; $i++) {
    $queues[] = "bench-mem-$id-$i";
    fill_amqp($queues[$i], 0);
}
// Each process lives long enough to be measured after all of them started (starting
// 100 PHP processes takes seconds on a busy machine), then is stopped with SIGTERM.
$hold = 120;
$quiet = [0 => ['file', '/dev/null', 'r'], 1 => STDOUT, 2 => ['file', '/dev/null', 'w']];
$procs = [];
foreach ($queues as $q) {
    $procs[] = proc_open([$php, __DIR__ . '/messenger.php', 'idle', 'amqp', $q, (string) $hold], $quiet, $pipes);
}
// The worker's log to /dev/null too: 100 subscriptions' start-up lines are not the report.
$worker = proc_open([...$withExt, __DIR__ . '/inprocess.php', 'idle', implode(',', $queues), (string) $hold], $quiet, $pipes);
// The floor: a PHP process that does nothing (the same ini and extensions, without ours).
$bare = proc_open([$php, '-r', "sleep($hold);"], $quiet, $pipes);
sleep(6);
$one = mem(proc_get_status($worker)['pid']);
$floor = mem(proc_get_status($bare)['pid']);
$fleet = [0, 0];
foreach ($procs as $p) {
    [$rss, $pss] = mem(proc_get_status($p)['pid']);
    $fleet[0] += $rss;
    $fleet[1] += $pss;
}
foreach ([$worker, $bare, ...$procs] as $p) {
    proc_terminate($p);
}
foreach ([$worker, $bare, ...$procs] as $p) {
    proc_close($p);
}
delete_amqp(...$queues);

$fmt = fn (float $x) => number_format($x, 0, '.', ' ');
$md = "# In-process router worker vs raw PHP client vs Symfony Messenger\n\n";
$md .= "$n messages per contender, a no-op handler, one PHP process each (" . date('Y-m-d') . ", " . php_uname('n') . ", PHP " . PHP_VERSION . ").\n\n";
$md .= "| broker | router worker (extension) msg/s | raw PHP client loop msg/s | messenger:consume msg/s | router / Messenger | router / raw |\n| --- | ---: | ---: | ---: | ---: | ---: |\n";
foreach ($rows as $broker => $r) {
    $md .= sprintf("| %s | %s | %s | %s | **%.1f×** | %.2f |\n", $broker === 'amqp' ? 'RabbitMQ' : 'Redis Streams',
        $fmt($r['router']), $fmt($r['raw']), $fmt($r['messenger']), $r['router'] / $r['messenger'], $r['router'] / $r['raw']);
}
$mib = fn (int $kib) => number_format($kib / 1024, 1);
$md .= sprintf("\nMemory, %d idle RabbitMQ subscriptions: one router worker RSS %s MiB (PSS %s MiB); %d messenger:consume processes RSS %s MiB in all (PSS %s MiB, shared pages counted once): **%.1f×** less (PSS).\n",
    $subs, $mib($one[0]), $mib($one[1]), $subs, $mib($fleet[0]), $mib($fleet[1]), $fleet[1] / max(1, $one[1]));
$md .= sprintf("\nThe worker's PSS: %s MiB anonymous, %s MiB file mappings, of which %s MiB the extension's .so. A bare `php -r 'sleep()'` (the same PHP, without the extension): PSS %s MiB (%s anonymous, %s file); the worker above it: %s MiB.\n",
    $mib($one[2]), $mib($one[3]), $mib($one[4]), $mib($floor[1]), $mib($floor[2]), $mib($floor[3]), $mib($one[1] - $floor[1]));
echo "\n$md";
@mkdir(dirname($out), 0777, true);
file_put_contents($out, $md);
