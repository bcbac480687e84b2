<?php

namespace MessageRouter\Tests;

/**
 * A Symfony Messenger app (php-tests/messenger-app: ordinary #[AsMessageHandler]
 * handlers, messages dispatched by the app's own bus through its own AMQP or Redis
 * transport, Messenger's PHP serializer or the Symfony Serializer's JSON) consumed
 * through the router with no change to a handler or a producer: in process by
 * `message-router:consume`, and behind the daemon over HTTP (php -S) and FastCGI
 * (PHP-FPM). Every message is counted afterwards.
 */
final class MessengerMigrationTest extends WorkerTestCase
{
    private const APP = __DIR__ . '/messenger-app';

    /** @var list<resource> php -S, PHP-FPM, daemons */
    private array $servers = [];
    /** @var list<callable> */
    private array $cleanups = [];

    protected function tearDown(): void
    {
        foreach ($this->servers as $p) {
            self::killTree($p);
        }
        $this->servers = [];
        parent::tearDown();
        foreach ($this->cleanups as $clean) {
            $clean();
        }
        $this->cleanups = [];
    }

    /**
     * The app's environment with its `async` transport on `$kind` (a queue or stream
     * named `$name`) and serializer `$serializer`, plus the router config for it.
     *
     * @return array<string, string>
     */
    private function app(string $kind, string $serializer, string $name, array $handler = []): array
    {
        $amqp = 'amqp://guest:guest@127.0.0.1:5672/%2f';
        $router = [
            'transports' => ['broker' => $kind === 'amqp' ? self::amqpTransport() : self::redisTransport()],
            'handlers' => ['messenger' => $handler + ['timeout' => '10s']],
            'subscriptions' => ['async' => [
                'transport' => 'broker',
                'envelope' => 'messenger',
                'default_handler' => 'messenger',
                'retry' => ['max_attempts' => 4, 'initial_delay' => '100ms', 'multiplier' => 2],
            ] + ($kind === 'amqp' ? ['queue' => $name] : ['streams' => [$name], 'group' => 'symfony'])],
        ];
        file_put_contents("$this->dir/router.yaml", json_encode($router));
        $this->cleanups[] = $kind === 'amqp'
            ? fn () => $this->deleteQueues($name, "$name.dlq", "$name-failed", ...array_map(fn ($d) => "$name.retry.$d", ['1s', '5s', '30s', '2m', '10m', '1h', '6h', '24h']))
            : fn () => $this->redis()->del([$name, "$name.dlq", "$name.symfony.retry", "$name.symfony.delayed", "{$name}__queue", "$name-failed"]);
        return [
            'APP_DIR' => $this->dir,
            'APP_TRANSPORT' => $kind,
            'APP_SERIALIZER' => $serializer,
            'APP_DSN' => $kind === 'amqp' ? "$amqp/$name" : "redis://127.0.0.1:6379/$name/symfony/app",
            'APP_FAILED_DSN' => $kind === 'amqp' ? "$amqp/$name-failed" : "redis://127.0.0.1:6379/$name-failed/symfony/app",
            'ROUTER_CONFIG' => "$this->dir/router.yaml",
        ];
    }

    /** Run one of the app's bin/ scripts to its end; its output. */
    private function runScript(array $env, string $script, string ...$args): string
    {
        $p = proc_open([PHP_BINARY, self::APP . "/bin/$script", ...$args], [0 => ['file', '/dev/null', 'r'], 1 => ['pipe', 'w'], 2 => ['pipe', 'w']], $pipes, null, $env + getenv());
        $out = stream_get_contents($pipes[1]);
        $err = stream_get_contents($pipes[2]);
        $this->assertSame(0, proc_close($p), "bin/$script failed: $out $err");
        return $out;
    }

    /** Dispatch through the app's bus: each message [type, id] plus sleep_ms, delay_ms. */
    private function dispatch(array $env, array $messages): void
    {
        $this->runScript($env, 'dispatch', json_encode($messages));
    }

    /** `bin/console message-router:consume …` in the background. */
    private function consume(array $env, string $name, string ...$args)
    {
        $p = proc_open(
            [PHP_BINARY, self::APP . '/bin/console', 'message-router:consume', ...$args],
            [0 => ['file', '/dev/null', 'r'], 1 => ['file', "$this->dir/$name.out", 'w'], 2 => ['file', "$this->dir/$name.err", 'w']],
            $pipes,
            null,
            $env + getenv(),
        );
        $this->procs[] = $p;
        return $p;
    }

    /** @return array<string, int> "<event> <id>" line of handled.log → how often */
    private function handled(): array
    {
        $lines = @file("$this->dir/handled.log", FILE_IGNORE_NEW_LINES) ?: [];
        return array_count_values($lines);
    }

    /** @return list<array<string, string>> the dead letters' headers (AMQP) or fields (Redis) */
    private function deadLetters(string $kind, string $name): array
    {
        if ($kind === 'amqp') {
            return array_map(fn ($m) => $m[1] + ['body' => $m[0]], $this->drainAmqp("$name.dlq"));
        }
        return array_values($this->redis()->xRange("$name.dlq", '-', '+') ?: []);
    }

    private function deadLetterCount(string $kind, string $name): int
    {
        return $kind === 'amqp' ? $this->countAmqp("$name.dlq") : (int) $this->redis()->xLen("$name.dlq");
    }

    /** Nothing of `$name` left unsettled at the broker. */
    private function assertDrained(string $kind, string $name): void
    {
        if ($kind === 'amqp') {
            $this->assertSame(0, $this->countAmqp($name), 'nothing left in the queue');
            return;
        }
        $pending = $this->redis()->xPending($name, 'symfony');
        $this->assertSame(0, (int) ($pending[0] ?? 0), 'nothing pending in the group');
    }

    /** Something only Messenger's serializers cannot read, straight to the broker. */
    private function publishGarbage(string $kind, string $name): void
    {
        if ($kind === 'amqp') {
            $this->publishAmqp($name, [['garbage-1', 'not an envelope', []]]);
        } else {
            $this->redis()->xAdd($name, '*', ['message' => 'not an envelope']);
        }
    }

    public static function transports(): array
    {
        return [
            'amqp, PHP serializer' => ['amqp', 'php'],
            'amqp, Symfony Serializer JSON' => ['amqp', 'json'],
            'redis, PHP serializer' => ['redis', 'php'],
            'redis, Symfony Serializer JSON' => ['redis', 'json'],
        ];
    }

    /**
     * The three handlers' outcomes as Messenger's worker would decide them, a delayed
     * dispatch (DelayStamp) handled after its delay, an undecodable message
     * dead-lettered with the reason; each message handled once.
     *
     * @dataProvider transports
     */
    public function testMessagesDispatchedByTheAppAreHandledByItsHandlersInProcess(string $kind, string $serializer): void
    {
        $name = self::unique("php-mm-$kind");
        $env = $this->app($kind, $serializer, $name);
        $pings = array_map(fn ($i) => ['type' => 'Ping', 'id' => "p-$i"], range(1, 20));
        $this->dispatch($env, [...$pings, ['type' => 'Flaky', 'id' => 'f-1'], ['type' => 'Poison', 'id' => 'x-1'], ['type' => 'Ping', 'id' => 'later', 'delay_ms' => 1500]]);
        $dispatchedAt = microtime(true);
        $this->publishGarbage($kind, $name);
        $worker = $this->consume($env, 'consume', '--time-limit=60');

        $this->waitFor('every message handled or dead-lettered', 40, function () use ($kind, $name) {
            $h = $this->handled();
            return count(array_filter(array_keys($h), fn ($l) => str_starts_with($l, 'ping '))) === 21
                && isset($h['flaky f-1']) && $this->deadLetterCount($kind, $name) === 2;
        });
        $laterAt = microtime(true);
        proc_terminate($worker, SIGTERM);
        $this->waitFor('the worker to stop', 20, fn () => !proc_get_status($worker)['running']);
        $this->assertStringContainsString('Stopped (signal)', (string) file_get_contents("$this->dir/consume.out"));

        $h = $this->handled();
        foreach ([...array_column($pings, 'id'), 'later'] as $id) {
            $this->assertSame(1, $h["ping $id"] ?? 0, "ping $id handled once");
        }
        $this->assertSame(2, $h['flaky-failed f-1'], 'the recoverable failure retried twice');
        $this->assertSame(1, $h['flaky f-1'], 'then handled');
        $this->assertSame(1, $h['poison-failed x-1'], 'unrecoverable: never retried');
        $this->assertGreaterThan(1.4, $laterAt - $dispatchedAt, 'the DelayStamp was honoured');

        $reasons = array_column($this->deadLetters($kind, $name), 'x-router-reason');
        sort($reasons);
        $this->assertCount(2, $reasons);
        $this->assertStringStartsWith('rejected by handler: undecodable Messenger envelope (transport "async"): Symfony\Component\Messenger\Exception\MessageDecodingFailedException', $reasons[0]);
        $this->assertSame('rejected by handler: unrecoverable: Symfony\Component\Messenger\Exception\UnrecoverableMessageHandlingException: order x-1 no longer exists', $reasons[1]);
        $this->assertDrained($kind, $name);
    }

    /**
     * The config `message-router:import-messenger` writes from the app's Messenger
     * setup consumes the app's queue or stream as it is: the handled message acked,
     * the unrecoverable one dead-lettered, after the retry policy it carried over.
     *
     * @dataProvider kinds
     */
    public function testTheImportedConfigConsumesTheAppsTransport(string $kind): void
    {
        $name = self::unique("php-mm-import-$kind");
        $env = $this->app($kind, 'php', $name);
        unlink("$this->dir/router.yaml");
        $this->runScript($env, 'console', 'message-router:import-messenger', "--output=$this->dir/router.yaml");
        $yaml = (string) file_get_contents("$this->dir/router.yaml");
        $this->assertStringContainsString('envelope: messenger', $yaml);
        $this->assertStringContainsString('max_attempts: 4', $yaml, "the app's retry_strategy (max_retries 3)");

        $this->dispatch($env, [['type' => 'Ping', 'id' => 'p-1'], ['type' => 'Flaky', 'id' => 'f-1'], ['type' => 'Poison', 'id' => 'x-1']]);
        $worker = $this->consume($env, 'consume', '--time-limit=60');
        $this->waitFor('handled and dead-lettered', 30, fn () => isset($this->handled()['flaky f-1'], $this->handled()['ping p-1']) && $this->deadLetterCount($kind, $name) === 1);
        proc_terminate($worker, SIGTERM);
        $this->waitFor('the worker to stop', 20, fn () => !proc_get_status($worker)['running']);
        $this->assertEquals(['ping p-1' => 1, 'flaky-failed f-1' => 2, 'flaky f-1' => 1, 'poison-failed x-1' => 1], array_intersect_key($this->handled(), ['ping p-1' => 0, 'flaky-failed f-1' => 0, 'flaky f-1' => 0, 'poison-failed x-1' => 0]));
        $this->assertDrained($kind, $name);
    }

    public static function kinds(): array
    {
        return ['amqp' => ['amqp'], 'redis' => ['redis']];
    }

    /**
     * SIGKILL of the worker mid-stream: a second worker handles the rest and every
     * message dispatched is handled (at least once; the duplicates are the messages
     * the first one had handled but not yet acked, at most a batch).
     *
     * @dataProvider kinds
     */
    public function testAKilledWorkerLosesNothing(string $kind): void
    {
        $name = self::unique("php-mm-kill-$kind");
        $env = $this->app($kind, 'php', $name);
        $n = 300;
        $this->dispatch($env, array_map(fn ($i) => ['type' => 'Ping', 'id' => "k-$i", 'sleep_ms' => 10], range(1, $n)));
        $first = $this->consume($env, 'first', '--time-limit=60');
        $count = fn () => count(array_filter(array_keys($this->handled()), fn ($l) => str_starts_with($l, 'ping ')));
        $this->waitFor('a fifth handled', 30, fn () => $count() >= $n / 5);
        proc_terminate($first, SIGKILL);
        $this->waitFor('the first worker gone', 10, fn () => !proc_get_status($first)['running']);
        $killedAt = $count();
        $this->assertLessThan($n, $killedAt, 'killed mid-stream');

        $second = $this->consume($env, 'second', '--time-limit=60');
        $this->waitFor('every message handled', 60, fn () => $count() === $n);
        proc_terminate($second, SIGTERM);
        $this->waitFor('the second worker to stop', 20, fn () => !proc_get_status($second)['running']);

        $h = $this->handled();
        $lines = array_sum($h);
        $this->assertSame($n, $count(), 'every message handled');
        $this->assertLessThanOrEqual($n + 64, $lines, 'duplicates at most a prefetch window');
        $this->assertSame(0, $this->deadLetterCount($kind, $name), 'none dead-lettered');
        $this->assertDrained($kind, $name);
    }

    /**
     * The receivers and options messenger:consume users type: a receiver name picks
     * the subscription, --failure-limit stops after that many failures, and a name
     * that is no subscription is an error that consumes nothing.
     */
    public function testTheConsumeCommandTakesMessengerConsumeArguments(): void
    {
        $name = self::unique('php-mm-opts');
        $env = $this->app('amqp', 'php', $name);
        $this->dispatch($env, [['type' => 'Poison', 'id' => 'x-1'], ['type' => 'Poison', 'id' => 'x-2'], ['type' => 'Ping', 'id' => 'p-1']]);

        $bad = $this->consume($env, 'bad', 'nope', '--time-limit=20');
        $this->waitFor('the bad call to end', 20, fn () => !proc_get_status($bad)['running']);
        $this->assertStringContainsString('no subscription nope in the config (subscriptions: async)', (string) file_get_contents("$this->dir/bad.out"));
        $this->assertSame([], $this->handled(), 'nothing consumed');

        $limited = $this->consume($env, 'limited', 'async', '--failure-limit=2', '--sleep=1', '--time-limit=30', '-vv');
        $this->waitFor('the failure limit to stop it', 30, fn () => !proc_get_status($limited)['running']);
        $out = (string) file_get_contents("$this->dir/limited.out");
        $this->assertStringContainsString('Stopped (failure limit)', $out);
        $this->assertMatchesRegularExpression('/failed: MessageRouter\\\\Reject: unrecoverable: .*order x-1 no longer exists/', $out, '-vv says what failed');
        $this->assertSame(2, $this->deadLetterCount('amqp', $name), 'both failures still dead-lettered');
    }

    /** A stamp header's name, no HTTP token, arrives exactly as the producer wrote it. */
    public function testAHexEncodedHeaderNameIsDecoded(): void
    {
        $stamp = 'X-Message-Stamp-Symfony\\Component\\Messenger\\Stamp\\BusNameStamp';
        $m = \MessageRouter\Http\Dispatcher::message([
            'x-message-hex-header-' . bin2hex($stamp) => '[{"busName":"messenger.bus.default"}]',
            // FastCGI's HTTP_ variables come back in upper case.
            'x-message-hex-header-' . strtoupper(bin2hex('Content-Type')) => 'application/json',
            'x-message-header-type' => 'App\\Ping',
            'x-message-hex-header-zz' => 'not hex: left out',
        ], '{}');
        $this->assertEquals([$stamp => '[{"busName":"messenger.bus.default"}]', 'Content-Type' => 'application/json', 'type' => 'App\\Ping'], $m->headers());
    }

    public static function daemonTargets(): array
    {
        return [
            'http (php -S), amqp, JSON' => ['http', 'amqp', 'json'],
            'fastcgi (PHP-FPM), redis, JSON' => ['fastcgi', 'redis', 'json'],
        ];
    }

    /**
     * The same app behind the daemon: its DeliveryController hands each delivery to
     * the Messenger bus (the stamps' header names, no HTTP tokens, travel hex-encoded).
     *
     * @dataProvider daemonTargets
     */
    public function testTheSameAppBehindTheDaemon(string $target, string $kind, string $serializer): void
    {
        $name = self::unique("php-mm-daemon-$kind");
        $port = self::freePort();
        $handler = $target === 'http'
            ? ['endpoints' => ["http://127.0.0.1:$port/_message-router"]]
            : ['type' => 'fastcgi', 'endpoints' => ["tcp://127.0.0.1:$port"], 'script_filename' => realpath(self::APP . '/public/index.php'), 'request_uri' => '/_message-router', 'max_connections' => 2];
        $env = $this->app($kind, $serializer, $name, $handler);
        if ($target === 'http') {
            $this->startPhpServer($env, $port);
        } else {
            $this->servers[] = $this->startFpm($port, 2, $env);
        }
        $pings = array_map(fn ($i) => ['type' => 'Ping', 'id' => "d-$i"], range(1, 10));
        $this->dispatch($env, [...$pings, ['type' => 'Flaky', 'id' => 'f-1'], ['type' => 'Poison', 'id' => 'x-1']]);

        $bin = getenv('MESSAGE_ROUTER_BIN') ?: __DIR__ . '/../target/debug/message-router';
        $admin = self::freePort();
        $config = json_decode((string) file_get_contents("$this->dir/router.yaml"), true);
        file_put_contents("$this->dir/router.yaml", json_encode(['admin' => ['listen' => "127.0.0.1:$admin"]] + $config));
        $this->servers[] = proc_open([$bin, 'run', '--config', "$this->dir/router.yaml"], [0 => ['file', '/dev/null', 'r'], 1 => ['file', '/dev/null', 'w'], 2 => ['file', "$this->dir/daemon.log", 'w']], $pipes);

        $this->waitFor('handled and dead-lettered through the daemon', 40, function () use ($kind, $name) {
            $h = $this->handled();
            return count(array_filter(array_keys($h), fn ($l) => str_starts_with($l, 'ping '))) === 10
                && isset($h['flaky f-1']) && $this->deadLetterCount($kind, $name) === 1;
        });
        $h = $this->handled();
        foreach (array_column($pings, 'id') as $id) {
            $this->assertSame(1, $h["ping $id"] ?? 0, "ping $id handled once");
        }
        $this->assertSame(2, $h['flaky-failed f-1']);
        $this->assertSame(1, $h['poison-failed x-1']);
        [$dead] = $this->deadLetters($kind, $name);
        $this->assertSame('rejected by handler: HTTP 422: unrecoverable: Symfony\Component\Messenger\Exception\UnrecoverableMessageHandlingException: order x-1 no longer exists', $dead['x-router-reason']);
        $this->waitFor('every delivery settled', 10, function () use ($kind, $name) {
            try {
                $this->assertDrained($kind, $name);
                return true;
            } catch (\PHPUnit\Framework\AssertionFailedError) {
                return false;
            }
        });
    }

    /** The app's public/index.php under php -S (no extension: the polyfill serves). */
    private function startPhpServer(array $env, int $port): void
    {
        $p = proc_open(
            [PHP_BINARY, '-S', "127.0.0.1:$port", realpath(self::APP . '/public/index.php')],
            [0 => ['file', '/dev/null', 'r'], 1 => ['file', "$this->dir/php-s.out", 'a'], 2 => ['file', "$this->dir/php-s.err", 'a']],
            $pipes,
            null,
            $env + ['PHP_CLI_SERVER_WORKERS' => '2', 'PATH' => (string) getenv('PATH')],
        );
        $this->servers[] = $p;
        $this->waitFor('php -S to listen', 10, fn () => @fsockopen('127.0.0.1', $port) !== false);
    }
}
