<?php

namespace MessageRouter\Tests;

/**
 * Daemon mode: the same handler class (handlers/BehaveHandler.php) behind the bridge's
 * HTTP entry point (router-php/php/front.php under php -S, without the extension: the
 * polyfill serves), driven by the real message-router daemon from RabbitMQ.
 */
final class BridgeHttpTest extends WorkerTestCase
{
    private const SECRET = 'php-tests-signing-secret';

    /** @var list<resource> */
    private array $servers = [];

    protected function tearDown(): void
    {
        foreach ($this->servers as $p) {
            proc_terminate($p, 9);
            proc_close($p);
        }
        parent::tearDown();
    }

    private static function freePort(): int
    {
        $s = stream_socket_server('tcp://127.0.0.1:0');
        $port = (int) substr(strrchr(stream_socket_get_name($s, false), ':'), 1);
        fclose($s);
        return $port;
    }

    /** `php -n -S` serving front.php with the test handlers; returns its base URL. */
    private function startEntryPoint(string $log): string
    {
        $port = self::freePort();
        $root = realpath(__DIR__ . '/..');
        $env = [
            'MESSAGE_ROUTER_HANDLERS' => __DIR__ . '/handlers/routes.php',
            'MESSAGE_ROUTER_SIGNING_SECRET' => self::SECRET,
            'HANDLER_LOG' => $log,
            'PHP_CLI_SERVER_WORKERS' => '4',
            'PATH' => getenv('PATH'),
        ];
        $cmd = [PHP_BINARY, '-n', '-S', "127.0.0.1:$port", "$root/router-php/php/front.php"];
        $p = proc_open($cmd, [0 => ['file', '/dev/null', 'r'], 1 => ['file', "$this->dir/php-s.out", 'w'], 2 => ['file', "$this->dir/php-s.err", 'w']], $pipes, null, $env);
        $this->servers[] = $p;
        $this->waitFor('php -S to listen', 10, fn () => @fsockopen('127.0.0.1', $port) !== false);
        return "http://127.0.0.1:$port/";
    }

    /** The daemon on `$yaml`. */
    private function startDaemon(string $yaml): void
    {
        $bin = getenv('MESSAGE_ROUTER_BIN') ?: __DIR__ . '/../target/debug/message-router';
        $this->assertFileExists($bin, 'cargo build -p router-daemon (scripts/test does)');
        file_put_contents("$this->dir/router.yaml", $yaml);
        $p = proc_open([$bin, 'run', '--config', "$this->dir/router.yaml"], [0 => ['file', '/dev/null', 'r'], 1 => ['file', '/dev/null', 'w'], 2 => ['file', "$this->dir/daemon.log", 'w']], $pipes);
        $this->servers[] = $p;
    }

    public function testTheHandlerClassGivesTheSameOutcomesBehindTheHttpEntryPoint(): void
    {
        $queue = self::unique('php-http');
        $this->declareQueue($queue);
        $log = "$this->dir/handler.log";
        touch($log);
        $url = $this->startEntryPoint($log);
        $amqp = self::amqpTransport()['url'];
        $secret = self::SECRET;
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

        // Unsigned requests are refused.
        $ctx = stream_context_create(['http' => ['method' => 'POST', 'content' => 'x', 'ignore_errors' => true,
            'header' => "Content-Type: application/octet-stream\r\nx-router-route: work\r\nce-id: forged\r\n"]]);
        $body = file_get_contents($url, false, $ctx);
        $this->assertStringContainsString('401', $http_response_header[0] ?? '', (string) $body);
        $this->assertArrayNotHasKey('forged', $calls->started());
        $this->deleteQueues($queue, "$queue.dlq");
    }
}
