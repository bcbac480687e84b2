<?php

namespace MessageRouter\Tests;

use MessageRouter\Http\Signature;

/**
 * Daemon mode: the same handler class (handlers/BehaveHandler.php) behind the bridge's
 * HTTP entry point (router-php/php/front.php under php -S, and under PHP-FPM reached
 * over FastCGI; without the extension: the polyfill serves), driven by the real
 * message-router daemon from RabbitMQ.
 */
final class BridgeHttpTest extends WorkerTestCase
{
    private const SECRET = 'php-tests-signing-secret';
    private const NEW = 'php-tests-new-secret-0123';
    private const OLD = 'php-tests-old-secret-0123';
    private const OTHER = 'php-tests-other-secret-01';

    /** @var array<int, resource> php -S servers by port */
    private array $servers = [];
    /** @var list<resource> */
    private array $daemons = [];

    protected function tearDown(): void
    {
        foreach ($this->servers as $p) {
            self::killTree($p);
        }
        foreach ($this->daemons as $p) {
            proc_terminate($p, 9);
            proc_close($p);
        }
        $this->servers = $this->daemons = [];
        parent::tearDown();
    }

    /**
     * `php -n -S` serving front.php with the test handlers (handlers/routes.php) on
     * `$port` (a free one when null); `$env` adds to or overrides its environment (a
     * null value unsets). Returns its base URL.
     */
    private function startEntryPoint(string $log, array $env = [], ?int $port = null): string
    {
        $port ??= self::freePort();
        $root = realpath(__DIR__ . '/..');
        $env = array_filter($env + [
            'MESSAGE_ROUTER_HANDLERS' => __DIR__ . '/handlers/routes.php',
            'MESSAGE_ROUTER_SIGNING_SECRET' => self::SECRET,
            'HANDLER_LOG' => $log,
            'PHP_CLI_SERVER_WORKERS' => '4',
            'PATH' => getenv('PATH'),
        ], fn ($v) => $v !== null);
        $cmd = [PHP_BINARY, '-n', '-S', "127.0.0.1:$port", "$root/router-php/php/front.php"];
        $p = proc_open($cmd, [0 => ['file', '/dev/null', 'r'], 1 => ['file', "$this->dir/php-s-$port.out", 'a'], 2 => ['file', "$this->dir/php-s-$port.err", 'a']], $pipes, null, $env);
        $this->servers[$port] = $p;
        $this->waitFor('php -S to listen', 10, fn () => @fsockopen('127.0.0.1', $port) !== false);
        return "http://127.0.0.1:$port/";
    }

    /** Stop the php -S on `$port` (and its workers) and wait until the port is free. */
    private function stopEntryPoint(int $port): void
    {
        self::killTree($this->servers[$port]);
        unset($this->servers[$port]);
        $this->waitFor("port $port to close", 10, fn () => @fsockopen('127.0.0.1', $port) === false);
    }

    /** The daemon on `$yaml`. */
    private function startDaemon(string $yaml): void
    {
        $bin = getenv('MESSAGE_ROUTER_BIN') ?: __DIR__ . '/../target/debug/message-router';
        $this->assertFileExists($bin, 'cargo build -p router-daemon (php-tests/run does)');
        file_put_contents("$this->dir/router.yaml", $yaml);
        $p = proc_open([$bin, 'run', '--config', "$this->dir/router.yaml"], [0 => ['file', '/dev/null', 'r'], 1 => ['file', '/dev/null', 'w'], 2 => ['file', "$this->dir/daemon.log", 'w']], $pipes);
        $this->daemons[] = $p;
    }

    /** Lines of the daemon's log that mention message `$id` and contain every one of `$needles`. */
    private function daemonLines(string $id, string ...$needles): array
    {
        $lines = explode("\n", (string) @file_get_contents("$this->dir/daemon.log"));
        return array_values(array_filter($lines, function (string $l) use ($id, $needles) {
            if (!str_contains($l, "id=$id ")) {
                return false;
            }
            foreach ($needles as $n) {
                if (!str_contains($l, $n)) {
                    return false;
                }
            }
            return true;
        }));
    }

    /** POST straight to `$url` (not through the daemon): [status line, headers, body]. */
    private static function post(string $url, array $headers, string $body): array
    {
        $lines = '';
        foreach ($headers + ['Content-Type' => 'application/octet-stream'] as $k => $v) {
            $lines .= "$k: $v\r\n";
        }
        $ctx = stream_context_create(['http' => ['method' => 'POST', 'content' => $body, 'ignore_errors' => true, 'header' => $lines]]);
        $text = (string) file_get_contents($url, false, $ctx);
        return [$http_response_header[0] ?? '', $http_response_header, $text];
    }

    public function testTheHandlerClassGivesTheSameOutcomesBehindTheHttpEntryPoint(): void
    {
        $queue = self::unique('php-http');
        $log = "$this->dir/handler.log";
        touch($log);
        $url = $this->startEntryPoint($log);
        $secret = self::SECRET;
        $calls = $this->sameOutcomesThrough($queue, $log, "{ endpoints: [\"$url\"], timeout: 5s, signing: { secret: \"$secret\" } }");
        // Unsigned requests are refused: 503, so a router with the wrong key retries
        // instead of dead-lettering (a rotation in progress), and no handler runs.
        [$status, $headers, $body] = self::post($url, ['x-router-route' => 'work', 'ce-id' => 'forged'], 'x');
        $this->assertStringContainsString('503', $status, $body);
        $this->assertContains('Retry-After: 5', $headers);
        $this->assertStringContainsString('signature not accepted: the request is not signed', $body);
        $this->assertArrayNotHasKey('forged', $calls->started());
        $this->deleteQueues($queue, "$queue.dlq");
    }

    /**
     * The daemon drives `$queue` (declared here) into the handler `$handler` (a YAML
     * flow mapping) with the outcome messages; the same outcomes as in process.
     */
    private function sameOutcomesThrough(string $queue, string $log, string $handler): Worker
    {
        $this->declareQueue($queue);
        $amqp = self::amqpTransport()['url'];
        $this->startDaemon(<<<YAML
admin: { enabled: false }
shutdown: { grace_period: 10s }
transports:
  rabbit: { type: amqp, url: "$amqp", reconnect_max_delay: 1s }
handlers:
  php: $handler
subscriptions:
  main:
    transport: rabbit
    queue: $queue
    prefetch: 16
    retry: { max_attempts: 3, initial_delay: 200ms, multiplier: 2, max_delay: 2s, jitter: 0 }
routes:
  - { name: work, handler: php }
YAML);
        $this->publishAmqp($queue, self::OUTCOMES);
        $calls = new Worker(null, $log, '/dev/null', "$this->dir/daemon.log");
        $this->waitFor('handled and dead-lettered through the daemon', 40, function () use ($calls, $queue) {
            $done = $calls->done();
            return isset($done['ok-1'], $done['later-1'], $done['flaky-1']) && $this->countAmqp("$queue.dlq") >= 2;
        });
        $this->assertFalse($calls->done()['ok-1'][0]['extension'], 'daemon mode: the polyfill, not the extension');
        // The same outcomes as in process (InProcessAmqpTest::testOutcomesAndMetadata).
        $this->assertOutcomes($calls, $queue, true);
        return $calls;
    }

    public function testTheHandlerClassGivesTheSameOutcomesBehindPhpFpmOverFastCgi(): void
    {
        $queue = self::unique('php-fcgi');
        $log = "$this->dir/handler.log";
        touch($log);
        $port = self::freePort();
        $root = realpath(__DIR__ . '/..');
        $handlers = __DIR__ . '/handlers/routes.php';
        $secret = self::SECRET;
        // php-fpm -n: no php.ini, so no extension (the polyfill serves, as under php -n -S).
        $this->servers[$port] = $this->startFpm($port, 4, [
            'MESSAGE_ROUTER_HANDLERS' => $handlers,
            'MESSAGE_ROUTER_SIGNING_SECRET' => $secret,
            'HANDLER_LOG' => $log,
        ], noIni: true);
        $this->sameOutcomesThrough(
            $queue,
            $log,
            "{ type: fastcgi, endpoints: [\"tcp://127.0.0.1:$port\"], script_filename: \"$root/router-php/php/front.php\", max_connections: 4, timeout: 5s, signing: { secret: \"$secret\" } }"
        );
        $this->deleteQueues($queue, "$queue.dlq");
    }

    /**
     * A secret rotation: the router signing with the new and the previous secret while
     * PHP knows only the old one, and signing with the old one while PHP knows both,
     * is handled; PHP knowing neither answers 503 and the message is retried (dead-
     * lettered only once its attempts are spent); a Reject still dead-letters at once.
     */
    public function testASecretRotationIsHandledAndAKeyMismatchIsRetriedNotDeadLettered(): void
    {
        [$queue, $mismatch] = [self::unique('php-rotate'), self::unique('php-rotate-none')];
        foreach ([$queue, "$queue.dlq", $mismatch, "$mismatch.dlq"] as $q) {
            $this->declareQueue($q);
        }
        $log = "$this->dir/handler.log";
        touch($log);
        $common = ['HANDLER_ROUTES' => 'old-php,both-php,none-php', 'MESSAGE_ROUTER_RETRY_AFTER' => '1'];
        $oldOnly = $this->startEntryPoint($log, $common + ['MESSAGE_ROUTER_SIGNING_SECRET' => self::OLD]);
        $both = $this->startEntryPoint($log, $common + ['MESSAGE_ROUTER_SIGNING_SECRET' => self::NEW, 'MESSAGE_ROUTER_SIGNING_SECRET_PREVIOUS' => self::OLD]);
        $neither = $this->startEntryPoint($log, $common + ['MESSAGE_ROUTER_SIGNING_SECRET' => self::OTHER]);
        [$new, $old, $amqp] = [self::NEW, self::OLD, self::amqpTransport()['url']];
        $this->startDaemon(<<<YAML
admin: { enabled: false }
shutdown: { grace_period: 10s }
transports:
  rabbit: { type: amqp, url: "$amqp", reconnect_max_delay: 1s }
handlers:
  rotating-router: { endpoints: ["$oldOnly"], timeout: 5s, signing: { secret: "$new", previous_secret: "$old" } }
  old-router: { endpoints: ["$both"], timeout: 5s, signing: { secret: "$old" } }
  wrong-php: { endpoints: ["$neither"], timeout: 5s, signing: { secret: "$new", previous_secret: "$old" } }
subscriptions:
  main:
    transport: rabbit
    queue: $queue
    prefetch: 16
    retry: { max_attempts: 3, initial_delay: 200ms, multiplier: 2, max_delay: 2s, jitter: 0 }
  mismatch:
    transport: rabbit
    queue: $mismatch
    prefetch: 16
    retry: { max_attempts: 3, initial_delay: 200ms, multiplier: 2, max_delay: 2s, jitter: 0 }
routes:
  - { name: old-php, match: { subscription: main, headers: { side: old } }, handler: rotating-router }
  - { name: both-php, match: { subscription: main, headers: { side: both } }, handler: old-router }
  - { name: none-php, match: { subscription: mismatch }, handler: wrong-php }
YAML);
        $this->publishAmqp($queue, [
            ['rot-old', 'x', ['side' => 'old']],
            ['rot-both', 'x', ['side' => 'both']],
            ['rot-poison', 'x', ['side' => 'old', 'behave' => 'reject']],
        ]);
        $this->publishAmqp($mismatch, [['rot-none', 'x', []]]);
        $calls = new Worker(null, $log, '/dev/null', "$this->dir/daemon.log");

        // (b) PHP knows neither key: attempt 2 is made, and nothing is dead-lettered yet.
        $this->waitFor('attempt 2 of rot-none refused and retried', 20, fn () => $this->daemonLines('rot-none', 'attempt failed; retrying', ' attempt=2 ') !== []);
        $this->assertSame(0, $this->countAmqp("$mismatch.dlq"), 'a key mismatch is not poison');
        foreach ([1, 2] as $attempt) {
            [$line] = $this->daemonLines('rot-none', 'attempt failed; retrying', " attempt=$attempt ");
            $this->assertStringContainsString('delay=1s', $line, 'the Retry-After of the 503');
            $this->assertStringContainsString('error=HTTP 503: signature not accepted: x-router-signature matches none of the 1 signing secret configured here (a secret rotation in progress?)', $line);
        }
        // (a) and (d).
        $this->waitFor('rotated deliveries handled, the poison dead-lettered', 20, function () use ($calls, $queue) {
            $done = $calls->done();
            return isset($done['rot-old'], $done['rot-both']) && $this->countAmqp("$queue.dlq") >= 1;
        });
        $done = $calls->done();
        $this->assertSame([1, 'rotating-router'], [$done['rot-old'][0]['attempt'], $done['rot-old'][0]['handler']], 'new + previous signature, PHP knows only the old secret');
        $this->assertSame([1, 'old-router'], [$done['rot-both'][0]['attempt'], $done['rot-both'][0]['handler']], 'old signature, PHP knows both');
        $this->assertCount(1, $calls->started()['rot-poison'], 'Reject: no retry');
        $dead = $this->drainAmqp("$queue.dlq");
        $this->assertSame(['rot-poison'], array_column($dead, 2));
        $this->assertSame('rejected by handler: HTTP 422: bad rot-poison', $dead[0][1]['x-router-reason']);

        // (b) continued: dead-lettered once its 3 attempts are spent, never handled.
        $this->waitFor('rot-none dead-lettered after its attempts', 20, fn () => $this->countAmqp("$mismatch.dlq") >= 1);
        [[, $headers, $id]] = $this->drainAmqp("$mismatch.dlq");
        $this->assertSame('rot-none', $id);
        $this->assertSame('max attempts exhausted (3 of 3)', $headers['x-router-reason']);
        $this->assertStringStartsWith('HTTP 503: signature not accepted: x-router-signature matches none', $headers['x-router-last-error']);
        $this->assertArrayNotHasKey('rot-none', $calls->started(), 'refused before any handler ran');
        $this->assertSame(0, $this->countAmqp($queue) + $this->countAmqp($mismatch), 'nothing left unacked');
        $this->deleteQueues($queue, "$queue.dlq", $mismatch, "$mismatch.dlq", "$mismatch.retry.1000ms", "$queue.retry.1000ms");
    }

    /**
     * A rolling deploy: a route reaches PHP before its handler does. The message gets
     * 503 and is retried; once PHP restarts with the handler, it is handled. Nothing is
     * dead-lettered.
     */
    public function testARouteWhoseHandlerIsNotDeployedYetIsRetriedUntilItIs(): void
    {
        $queue = self::unique('php-deploy');
        $this->declareQueue($queue);
        $this->declareQueue("$queue.dlq");
        $log = "$this->dir/handler.log";
        touch($log);
        $port = self::freePort();
        $before = ['HANDLER_ROUTES' => 'work', 'MESSAGE_ROUTER_RETRY_AFTER' => '1'];
        $url = $this->startEntryPoint($log, $before, $port);
        [$secret, $amqp] = [self::SECRET, self::amqpTransport()['url']];
        $this->startDaemon(<<<YAML
admin: { enabled: false }
shutdown: { grace_period: 10s }
transports:
  rabbit: { type: amqp, url: "$amqp", reconnect_max_delay: 1s }
handlers:
  php: { endpoints: ["$url"], timeout: 5s, signing: { secret: "$secret" } }
subscriptions:
  main:
    transport: rabbit
    queue: $queue
    prefetch: 16
    retry: { max_attempts: 10, initial_delay: 200ms, multiplier: 2, max_delay: 2s, jitter: 0 }
routes:
  - { name: late, handler: php }
YAML);
        $this->publishAmqp($queue, [['deploy-1', '{"n":1}', []]]);
        $this->waitFor('deploy-1 refused for want of a handler', 20, fn () => $this->daemonLines('deploy-1', 'attempt failed; retrying') !== []);
        [$line] = $this->daemonLines('deploy-1', 'attempt failed; retrying', ' attempt=1 ');
        $this->assertStringContainsString('delay=1s', $line);
        $this->assertStringContainsString('error=HTTP 503: no handler for route "late" (handler "php") in this deployment', $line);
        // The answer itself, signed as the daemon signs.
        $ts = (string) time();
        [$status, $headers, $body] = self::post($url, ['x-router-route' => 'late', 'x-router-handler' => 'php', 'ce-id' => 'probe',
            'x-router-timestamp' => $ts, 'x-router-signature' => Signature::header([self::SECRET], $ts, 'x')], 'x');
        $this->assertStringContainsString('503', $status, $body);
        $this->assertContains('Retry-After: 1', $headers);
        $this->assertSame("no handler for route \"late\" (handler \"php\") in this deployment (not deployed here yet?)\n", $body);

        // The deploy reaches this instance: the same port, now with the handler.
        $this->stopEntryPoint($port);
        $this->startEntryPoint($log, ['HANDLER_ROUTES' => 'work,late'] + $before, $port);
        $calls = new Worker(null, $log, '/dev/null', "$this->dir/daemon.log");
        $this->waitFor('deploy-1 handled after the deploy', 20, fn () => isset($calls->done()['deploy-1']));
        $handled = $calls->done()['deploy-1'];
        $this->assertCount(1, $handled);
        $this->assertGreaterThanOrEqual(2, $handled[0]['attempt'], 'the first attempt met no handler');
        $this->assertSame(['late', '{"n":1}'], [$handled[0]['route'], $handled[0]['body']]);
        $this->assertSame([], $this->daemonLines('deploy-1', 'dead-lettering'));
        $this->waitFor('deploy-1 acked', 10, fn () => $this->countAmqp($queue) === 0);
        $this->assertSame(0, $this->countAmqp("$queue.dlq"), 'nothing dead-lettered');
        $this->deleteQueues($queue, "$queue.dlq", "$queue.retry.1000ms");
    }
}
