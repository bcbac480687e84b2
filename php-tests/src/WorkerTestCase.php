<?php

namespace MessageRouter\Tests;

use PHPUnit\Framework\TestCase;

/**
 * Runs php-tests/workers/worker.php as a child process (the extension loaded through
 * PHP_INI_SCAN_DIR, see php-tests/run) against the real brokers, and reads what it
 * did. Every queue, stream, topic and group name is unique per test.
 */
abstract class WorkerTestCase extends TestCase
{
    /** @var list<resource> */
    protected array $procs = [];
    protected string $dir;

    protected function setUp(): void
    {
        $this->dir = sys_get_temp_dir() . '/php-tests-' . bin2hex(random_bytes(5));
        mkdir($this->dir);
    }

    protected function tearDown(): void
    {
        foreach ($this->procs as $p) {
            if (proc_get_status($p)['running']) {
                proc_terminate($p, 9);
            }
            proc_close($p);
        }
        $this->procs = [];
    }

    /**
     * SIGKILL a process started by proc_open and every process it forked (php -S with
     * PHP_CLI_SERVER_WORKERS forks its workers, which outlive a killed parent and keep
     * serving its port), then reap it.
     *
     * @param resource $proc
     */
    protected static function killTree($proc): void
    {
        $pid = proc_get_status($proc)['pid'];
        posix_kill($pid, SIGSTOP); // forks no more while its children are listed
        $children = [];
        foreach (glob('/proc/[0-9]*/stat') ?: [] as $stat) {
            // "pid (comm) state ppid ...": comm may hold spaces, so read after the last ')'.
            $line = (string) @file_get_contents($stat);
            $fields = explode(' ', substr($line, (int) strrpos($line, ')') + 2));
            if ((int) ($fields[1] ?? 0) === $pid) {
                $children[] = (int) basename(dirname($stat));
            }
        }
        foreach ([...$children, $pid] as $p) {
            posix_kill($p, SIGKILL);
        }
        proc_close($proc);
    }

    /**
     * Debian's PHP-FPM on 127.0.0.1:`$port` with a static pool of `$children`, its
     * workers given `$env` and nothing else of this environment (no PHP_INI_SCAN_DIR
     * of php-tests/run: no extension); `$noIni`: no php.ini either. Returns the master
     * process once it listens.
     *
     * @param array<string, string> $env
     * @return resource
     */
    protected function startFpm(int $port, int $children, array $env, bool $noIni = false)
    {
        $fpm = is_executable('/usr/sbin/php-fpm8.2') ? '/usr/sbin/php-fpm8.2' : 'php-fpm8.2';
        $vars = implode("\n", array_map(fn ($k, $v) => "env[$k] = $v", array_keys($env), $env));
        file_put_contents("$this->dir/fpm-$port.conf", <<<INI
[global]
pid = $this->dir/fpm-$port.pid
error_log = $this->dir/fpm-$port.log
daemonize = no
[pool]
listen = 127.0.0.1:$port
pm = static
pm.max_children = $children
clear_env = yes
$vars
INI);
        $cmd = [$fpm, ...($noIni ? ['-n'] : []), '-F', '-y', "$this->dir/fpm-$port.conf"];
        if (posix_getuid() === 0) {
            $cmd[] = '-R';
        }
        $out = ['file', "$this->dir/fpm-$port.out", 'a'];
        $p = proc_open($cmd, [0 => ['file', '/dev/null', 'r'], 1 => $out, 2 => $out], $pipes, null, ['PATH' => (string) getenv('PATH')]);
        $this->assertIsResource($p, 'php-fpm started');
        $this->waitFor('php-fpm to listen', 15, fn () => @fsockopen('127.0.0.1', $port) !== false);
        return $p;
    }

    protected static function unique(string $prefix): string
    {
        return $prefix . '-' . bin2hex(random_bytes(5));
    }

    /** Start a worker on `$config`; returns [process, stdout file, log file]. */
    protected function startWorker(array $config, array $options = [], string $name = 'worker'): Worker
    {
        $configFile = "$this->dir/$name.json";
        file_put_contents($configFile, json_encode($config));
        $log = "$this->dir/$name.log";
        touch($log);
        $out = "$this->dir/$name.out";
        $err = "$this->dir/$name.err";
        $cmd = [PHP_BINARY, __DIR__ . '/../workers/worker.php', $configFile, $log, json_encode((object) $options)];
        $proc = proc_open($cmd, [0 => ['file', '/dev/null', 'r'], 1 => ['file', $out, 'w'], 2 => ['file', $err, 'w']], $pipes);
        $this->assertIsResource($proc, 'worker started');
        $this->procs[] = $proc;
        return new Worker($proc, $log, $out, $err);
    }

    /** Poll `$cond` every 20 ms until true; fail with `$what` after `$timeout` seconds. */
    protected function waitFor(string $what, float $timeout, callable $cond): void
    {
        $deadline = microtime(true) + $timeout;
        while (!$cond()) {
            if (microtime(true) > $deadline) {
                $this->fail("timed out after {$timeout}s waiting for $what");
            }
            usleep(20000);
        }
    }

    /** The five messages of the outcome tests: [id, body, headers]. */
    protected const OUTCOMES = [
        ['ok-1', '{"n":1}', ['behave' => 'ok', 'tenant' => 'acme']],
        ['later-1', 'x', ['behave' => 'retry-later:0.4']],
        ['poison-1', 'x', ['behave' => 'reject']],
        ['broken-1', 'x', ['behave' => 'fail']],
        ['flaky-1', 'x', ['behave' => 'fail-until:2']],
    ];

    /**
     * What BehaveHandler did with OUTCOMES from `$queue`, in process or behind HTTP
     * (`$http`: the daemon's reasons start with the status, Retry-After is whole
     * seconds). Returns the dead letters' headers by id.
     */
    protected function assertOutcomes(Worker $w, string $queue, bool $http): array
    {
        $done = $w->done();
        $started = $w->started();
        $ok = $done['ok-1'][0];
        $this->assertSame(['ok-1', 1, '{"n":1}', 'acme', 'work', 'php', 'main', $queue],
            [$ok['id'], $ok['attempt'], $ok['body'], $ok['headers']['tenant'], $ok['route'], $ok['handler'], $ok['subscription'], $ok['key']]);
        $this->assertStringEndsWith("/$queue", $ok['source']);
        $this->assertSame([1, 2], array_column($started['later-1'], 'attempt'));
        $gap = $started['later-1'][1]['time'] - $started['later-1'][0]['time'];
        $this->assertGreaterThanOrEqual($http ? 0.95 : 0.39, $gap, 'RetryLater(0.4) waited its delay');
        $this->assertSame([1, 2], array_column($started['flaky-1'], 'attempt'));
        $this->assertCount(1, $started['poison-1'], 'Reject: no retry');
        $this->assertSame([1, 2, 3], array_column($started['broken-1'], 'attempt'), 'retried per policy');
        $dead = [];
        foreach ($this->drainAmqp("$queue.dlq") as [$body, $headers, $id]) {
            $dead[$id] = $headers;
        }
        $this->assertEqualsCanonicalizing(['broken-1', 'poison-1'], array_keys($dead));
        $status = fn (int $code) => $http ? "HTTP $code: " : '';
        $this->assertSame('rejected by handler: ' . $status(422) . 'bad poison-1', $dead['poison-1']['x-router-reason']);
        $this->assertSame('max attempts exhausted (3 of 3)', $dead['broken-1']['x-router-reason']);
        $this->assertStringStartsWith($status(500) . 'RuntimeException: boom broken-1', $dead['broken-1']['x-router-last-error']);
        $this->assertSame(0, $this->countAmqp($queue), 'nothing left unacked');
        return $dead;
    }

    // --- RabbitMQ (php-amqp) ---

    protected function amqp(): \AMQPChannel
    {
        static $channel = null;
        if ($channel === null || !$channel->isConnected()) {
            $conn = new \AMQPConnection(['host' => '127.0.0.1', 'port' => 5672, 'login' => 'guest', 'password' => 'guest']);
            $conn->connect();
            $channel = new \AMQPChannel($conn);
        }
        return $channel;
    }

    protected function declareQueue(string $name): void
    {
        $q = new \AMQPQueue($this->amqp());
        $q->setName($name);
        $q->setFlags(AMQP_DURABLE);
        $q->declareQueue();
    }

    /** Publish to `$queue` through the default exchange; each message [id, body, headers]. */
    protected function publishAmqp(string $queue, array $messages): void
    {
        $ex = new \AMQPExchange($this->amqp());
        foreach ($messages as [$id, $body, $headers]) {
            $ex->publish($body, $queue, AMQP_NOPARAM, ['message_id' => $id, 'delivery_mode' => 2, 'headers' => $headers]);
        }
    }

    /** Take every message of `$queue`: list of [body, headers, message id]. */
    protected function drainAmqp(string $queue): array
    {
        $q = new \AMQPQueue($this->amqp());
        $q->setName($queue);
        $got = [];
        while ($m = $q->get(AMQP_AUTOACK)) {
            $got[] = [$m->getBody(), $m->getHeaders(), $m->getMessageId()];
        }
        return $got;
    }

    protected function countAmqp(string $queue): int
    {
        $q = new \AMQPQueue($this->amqp());
        $q->setName($queue);
        $q->setFlags(AMQP_PASSIVE);
        return $q->declareQueue();
    }

    protected function deleteQueues(string ...$names): void
    {
        foreach ($names as $name) {
            $q = new \AMQPQueue($this->amqp());
            $q->setName($name);
            try {
                $q->delete();
            } catch (\AMQPException $e) {
                // Never declared: nothing to delete (the channel closes; reconnect).
            }
        }
    }

    protected static function amqpTransport(): array
    {
        return ['type' => 'amqp', 'url' => getenv('AMQP_URL') ?: 'amqp://guest:guest@127.0.0.1:5672/%2f', 'reconnect_max_delay' => '1s'];
    }

    // --- Redis (php-redis) ---

    protected function redis(): \Redis
    {
        static $redis = null;
        if ($redis === null) {
            $redis = new \Redis();
            $redis->connect('127.0.0.1', 6379);
        }
        return $redis;
    }

    protected static function redisTransport(): array
    {
        return ['type' => 'redis', 'url' => 'redis://127.0.0.1:6379', 'consumer' => 'php-tests'];
    }

    // --- Kafka (tests/bin/kafka_tool.rs: no PHP client speaks to tansu) ---

    private static function kafkaToolBin(): string
    {
        return getenv('KAFKA_TOOL') ?: __DIR__ . '/../../target/debug/kafka-tool';
    }

    protected static function kafkaTool(string ...$args): string
    {
        $cmd = implode(' ', array_map('escapeshellarg', [self::kafkaToolBin(), ...$args]));
        return (string) shell_exec($cmd);
    }

    protected static function publishKafka(string $topic, array $messages): void
    {
        $lines = '';
        foreach ($messages as [$id, $body, $headers, $key]) {
            $lines .= json_encode(['id' => $id, 'body' => $body, 'headers' => (object) $headers, 'key' => $key]) . "\n";
        }
        $file = tempnam(sys_get_temp_dir(), 'kafka');
        file_put_contents($file, $lines);
        exec(escapeshellarg(self::kafkaToolBin()) . ' publish ' . escapeshellarg($topic) . ' < ' . escapeshellarg($file), $out, $code);
        unlink($file);
        if ($code !== 0) {
            throw new \RuntimeException("kafka-tool publish $topic failed ($code)");
        }
    }

    /** Records of `$topic` as arrays (partition, offset, key, body, headers). */
    protected static function readKafka(string $topic, int $atLeast, int $secs): array
    {
        $out = self::kafkaTool('read', $topic, (string) $atLeast, (string) $secs);
        return array_map(fn ($l) => json_decode($l, true), array_filter(explode("\n", $out)));
    }

    protected static function kafkaTransport(): array
    {
        return [
            'type' => 'kafka',
            'brokers' => [getenv('KAFKA_BROKERS') ?: '127.0.0.1:9092'],
            // A stopped worker's partitions move after the session timeout: keep it short.
            'properties' => ['session.timeout.ms' => '6000', 'heartbeat.interval.ms' => '500'],
        ];
    }

    protected static function retry(): array
    {
        return ['max_attempts' => 3, 'initial_delay' => '200ms', 'multiplier' => 2, 'max_delay' => '2s', 'jitter' => 0];
    }

    /** A TCP port free on 127.0.0.1 now (for php -S and the daemon's admin listener). */
    protected static function freePort(): int
    {
        $s = stream_socket_server('tcp://127.0.0.1:0');
        $port = (int) substr(strrchr(stream_socket_get_name($s, false), ':'), 1);
        fclose($s);
        return $port;
    }
}

/** A worker process and what it wrote. */
final class Worker
{
    /** @param resource $proc */
    public function __construct(public $proc, public string $log, public string $out, public string $err)
    {
    }

    /** Every line of the handler log, decoded. */
    public function calls(): array
    {
        $lines = array_filter(explode("\n", (string) file_get_contents($this->log)));
        return array_map(fn ($l) => json_decode($l, true), $lines);
    }

    /** Calls that returned (acked), by message id. */
    public function done(): array
    {
        return $this->byId('done');
    }

    /** Attempts that started, by message id. */
    public function started(): array
    {
        return $this->byId('start');
    }

    private function byId(string $event): array
    {
        $by = [];
        foreach ($this->calls() as $c) {
            if ($c['event'] === $event) {
                $by[$c['id']][] = $c;
            }
        }
        return $by;
    }

    /** proc_get_status() tells the exit code once only: kept here. */
    private ?int $exit = null;

    public function running(): bool
    {
        if ($this->exit !== null) {
            return false;
        }
        $s = proc_get_status($this->proc);
        if (!$s['running']) {
            $this->exit = $s['exitcode'];
        }
        return $s['running'];
    }

    public function signal(int $sig): void
    {
        proc_terminate($this->proc, $sig);
    }

    /** Wait for the exit (at most `$timeout` s); its exit code, or null if still running. */
    public function wait(float $timeout): ?int
    {
        $deadline = microtime(true) + $timeout;
        while (microtime(true) < $deadline) {
            if (!$this->running()) {
                return $this->exit;
            }
            usleep(20000);
        }
        return null;
    }

    /** The run() result the worker printed. */
    public function result(): ?array
    {
        return json_decode(trim((string) file_get_contents($this->out)), true);
    }

    public function stderr(): string
    {
        return (string) file_get_contents($this->err);
    }
}
