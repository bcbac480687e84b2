<?php

namespace MessageRouter\Tests;

/** The in-process worker against RabbitMQ: outcomes, metadata, limits, signals, exit(). */
final class InProcessAmqpTest extends WorkerTestCase
{
    private function config(string $queue, array $sub = []): array
    {
        return [
            'shutdown' => ['grace_period' => '10s'],
            'transports' => ['rabbit' => self::amqpTransport()],
            'handlers' => ['php' => ['max_in_flight' => 8]],
            'subscriptions' => ['main' => $sub + ['transport' => 'rabbit', 'queue' => $queue, 'prefetch' => 16, 'retry' => self::retry()]],
            'routes' => [['name' => 'work', 'handler' => 'php']],
        ];
    }

    public function testOutcomesAndMetadata(): void
    {
        $queue = self::unique('php-amqp');
        $this->declareQueue($queue);
        $this->publishAmqp($queue, self::OUTCOMES);
        $w = $this->startWorker($this->config($queue));
        $this->waitFor('the good ones handled and the bad ones dead-lettered', 30, function () use ($w, $queue) {
            $done = $w->done();
            return isset($done['ok-1'], $done['later-1'], $done['flaky-1']) && $this->countAmqp("$queue.dlq") >= 2;
        });
        $w->signal(SIGTERM);
        $this->assertSame(0, $w->wait(15), 'clean exit on SIGTERM: ' . $w->stderr());
        $this->assertSame('signal', $w->result()['reason'] ?? null);

        $dead = $this->assertOutcomes($w, $queue, false);
        $this->assertStringContainsString('#0 ', $dead['broken-1']['x-router-last-error'], 'the trace comes along');
        $this->deleteQueues($queue, "$queue.dlq");
    }

    public function testLimitsStopTheWorker(): void
    {
        $queue = self::unique('php-limit');
        $this->declareQueue($queue);
        $this->publishAmqp($queue, array_map(fn ($i) => ["m-$i", 'x', []], range(1, 40)));
        $w = $this->startWorker($this->config($queue, ['prefetch' => 4]), ['limit' => 5], 'limit');
        $this->assertSame(0, $w->wait(30), $w->stderr());
        $this->assertSame('limit', $w->result()['reason']);
        $handled = $w->result()['handled'];
        // Stops fetching at 5; what was fetched already (prefetch 4) is finished first.
        $this->assertGreaterThanOrEqual(5, $handled);
        $this->assertLessThanOrEqual(5 + 4, $handled);
        $this->assertSame(40 - $handled, $this->countAmqp($queue), 'the rest stays queued');

        $t = $this->startWorker($this->config($queue), ['time_limit' => 1], 'time');
        $this->assertSame(0, $t->wait(30), $t->stderr());
        $this->assertSame('time_limit', $t->result()['reason']);
        $m = $this->startWorker($this->config($queue), ['memory_limit' => '1K'], 'memory');
        $this->assertSame(0, $m->wait(30), $m->stderr());
        $this->assertSame('memory_limit', $m->result()['reason']);
        $this->deleteQueues($queue, "$queue.dlq");
    }

    public function testBadOptionsAndMissingHandlersAreExplained(): void
    {
        $queue = self::unique('php-bad');
        $router = new \MessageRouter\Router($this->config($queue));
        try {
            $router->run();
            $this->fail('run() without a handler');
        } catch (\Exception $e) {
            $this->assertStringContainsString('no PHP handler for route "work"', $e->getMessage());
        }
        $router->route('work', fn () => null);
        try {
            $router->run(['limt' => 3]);
            $this->fail('an unknown option');
        } catch (\Exception $e) {
            $this->assertStringContainsString('option "limt" is unknown', $e->getMessage());
        }
        try {
            $router->route('nope', fn () => null);
            $this->fail('an unknown route');
        } catch (\Exception $e) {
            $this->assertStringContainsString('"nope" is neither a route nor a handler', $e->getMessage());
        }
        try {
            new \MessageRouter\Router(['transports' => ['x' => ['type' => 'amqp', 'url' => 'ftp://nope']]]);
            $this->fail('a bad config');
        } catch (\Exception $e) {
            $this->assertStringContainsString('<config array>', $e->getMessage());
        }
    }

    public function testSigtermDrainsWithoutLoss(): void
    {
        $queue = self::unique('php-term');
        $this->declareQueue($queue);
        $ids = array_map(fn ($i) => "t-$i", range(1, 60));
        $this->publishAmqp($queue, array_map(fn ($id) => [$id, 'x', ['behave' => 'slow:30']], $ids));
        $w = $this->startWorker($this->config($queue), [], 'first');
        $this->waitFor('10 handled', 30, fn () => count($w->done()) >= 10);
        $w->signal(SIGTERM);
        $this->assertSame(0, $w->wait(20), $w->stderr());
        $this->assertSame('signal', $w->result()['reason']);
        // Everything it started, it finished.
        $this->assertSame(array_keys($w->started()), array_keys($w->done()));
        $first = count($w->done());
        $this->assertSame(60 - $first, $this->countAmqp($queue), 'the rest left queued');
        $second = $this->startWorker($this->config($queue), [], 'second');
        $this->waitFor('the rest handled by a second worker', 30, fn () => count($second->done()) >= 60 - $first);
        $second->signal(SIGTERM);
        $this->assertSame(0, $second->wait(20));
        $all = array_merge(array_keys($w->done()), array_keys($second->done()));
        sort($all);
        $want = $ids;
        sort($want);
        $this->assertSame($want, $all, 'each message handled once across the two workers');
        $this->deleteQueues($queue, "$queue.dlq");
    }

    /** @dataProvider crashes */
    public function testAHandlerThatEndsTheProcessDoesNotLoseItsMessage(string $behave, string $what): void
    {
        $queue = self::unique('php-crash');
        $this->declareQueue($queue);
        $this->publishAmqp($queue, [['before', 'x', []], ['crasher', 'x', ['behave' => $behave]], ['after', 'x', []]]);
        $w = $this->startWorker($this->config($queue, ['prefetch' => 1]), [], 'crash');
        $this->assertNotSame(0, $w->wait(30), "$what ends the worker");
        $this->assertArrayNotHasKey('crasher', $w->done());
        $again = $this->startWorker($this->config($queue), [], 'again');
        $this->waitFor('the message handled by the next worker', 30, fn () => isset($again->done()['crasher'], $again->done()['after']));
        $again->signal(SIGTERM);
        $this->assertSame(0, $again->wait(20));
        $this->assertSame(0, $this->countAmqp($queue));
        $this->deleteQueues($queue, "$queue.dlq");
    }

    public function testSighupReloadsTheConfigFileBetweenBatches(): void
    {
        [$first, $second] = [self::unique('php-reload'), self::unique('php-reload2')];
        $this->declareQueue($first);
        $this->declareQueue($second);
        $config = $this->config($first, ['retry' => ['max_attempts' => 1, 'initial_delay' => '100ms', 'jitter' => 0]]);
        // Read from its file (so SIGHUP can read it again), logging what reloads do.
        $log = getenv('MESSAGE_ROUTER_LOG');
        putenv('WORKER_CONFIG_FROM_FILE=1');
        putenv('MESSAGE_ROUTER_LOG=info');
        $w = $this->startWorker($config, [], 'reload');
        putenv('WORKER_CONFIG_FROM_FILE');
        putenv($log === false ? 'MESSAGE_ROUTER_LOG' : "MESSAGE_ROUTER_LOG=$log");
        $this->publishAmqp($first, array_map(fn ($i) => ["a-$i", 'x', []], range(1, 20)));
        $this->publishAmqp($first, [['flaky-a', 'x', ['behave' => 'fail-until:2']]]);
        $this->waitFor('the first batch handled, the flaky one dead-lettered after one attempt', 30, function () use ($w, $first) {
            return count($w->done()) >= 20 && $this->countAmqp("$first.dlq") === 1;
        });

        // More attempts on the first queue and a second subscription: SIGHUP reads the file.
        $config['subscriptions']['main']['retry']['max_attempts'] = 3;
        $config['subscriptions']['second'] = ['transport' => 'rabbit', 'queue' => $second, 'prefetch' => 8];
        file_put_contents("$this->dir/reload.json", json_encode($config));
        $w->signal(SIGHUP);
        $this->waitFor('the reload logged', 15, fn () => str_contains($w->stderr(), 'configuration reloaded'));
        $this->assertStringContainsString('subscriptions +second ~main', $w->stderr());
        $this->publishAmqp($first, array_map(fn ($i) => ["b-$i", 'x', []], range(1, 10)));
        $this->publishAmqp($first, [['flaky-b', 'x', ['behave' => 'fail-until:2']]]);
        $this->publishAmqp($second, array_map(fn ($i) => ["c-$i", 'x', []], range(1, 10)));
        $this->waitFor('both queues handled on the new config', 30, function () use ($w) {
            $done = $w->done();
            return isset($done['flaky-b'], $done['b-10'], $done['c-10']) && count($done) >= 41;
        });
        $this->assertSame(1, $this->countAmqp("$first.dlq"), 'the new policy retried flaky-b instead of dead-lettering it');

        // A broken file is refused with its key path; the worker goes on with the running config.
        file_put_contents("$this->dir/reload.json", json_encode(['transports' => $config['transports'], 'handlers' => ['php' => ['max_in_flight' => 0]], 'subscriptions' => $config['subscriptions'], 'routes' => $config['routes']]));
        $w->signal(SIGHUP);
        $this->waitFor('the refusal logged', 15, fn () => str_contains($w->stderr(), 'reload refused'));
        $this->assertStringContainsString('handlers.php.max_in_flight', $w->stderr());
        $this->publishAmqp($second, [['d-1', 'x', []]]);
        $this->waitFor('still consuming', 30, fn () => isset($w->done()['d-1']));

        $w->signal(SIGTERM);
        $this->assertSame(0, $w->wait(20), $w->stderr());
        foreach ($w->done() as $id => $calls) {
            $this->assertCount(1, $calls, "$id handled once");
        }
        $this->assertSame(0, $this->countAmqp($first) + $this->countAmqp($second), 'nothing left behind');
        $this->deleteQueues($first, "$first.dlq", $second, "$second.dlq");
    }

    public function testTheHandlerRunsInsideTheRoutersSpanAndTheSpansAreExported(): void
    {
        $queue = self::unique('php-trace');
        $this->declareQueue($queue);
        $port = self::freePort();
        $otlpLog = "$this->dir/otlp.log";
        touch($otlpLog);
        $sink = proc_open(
            [PHP_BINARY, '-S', "127.0.0.1:$port", __DIR__ . '/handlers/otlp_sink.php'],
            [0 => ['file', '/dev/null', 'r'], 1 => ['file', '/dev/null', 'w'], 2 => ['file', '/dev/null', 'w']],
            $pipes,
            null,
            ['OTLP_LOG' => $otlpLog] + getenv()
        );
        $this->procs[] = $sink;
        $this->waitFor('the OTLP sink to listen', 10, fn () => @fsockopen('127.0.0.1', $port) !== false);
        $traceId = '4bf92f3577b34da6a3ce929d0e0e4736';
        $producer = "00-$traceId-00f067aa0ba902b7-01";
        $this->publishAmqp($queue, [['traced', 'x', ['traceparent' => $producer]], ['untraced', 'x', []]]);
        $config = $this->config($queue) + ['tracing' => ['enabled' => true, 'endpoint' => "http://127.0.0.1:$port", 'service_name' => 'php-worker']];
        $w = $this->startWorker($config, [], 'traced');
        $this->waitFor('both handled', 30, fn () => isset($w->done()['traced'], $w->done()['untraced']));
        $w->signal(SIGTERM);
        $this->assertSame(0, $w->wait(20), $w->stderr());

        // The handler saw the router's attempt span: the producer's trace, a new span.
        $seen = $w->done()['traced'][0]['traceparent'];
        $this->assertMatchesRegularExpression("/^00-$traceId-[0-9a-f]{16}-01$/", $seen);
        $this->assertNotSame($producer, $seen, 'the attempt span, not the producer\'s');
        $this->assertMatchesRegularExpression('/^00-[0-9a-f]{32}-[0-9a-f]{16}-01$/', $w->done()['untraced'][0]['traceparent'], 'a trace started for a message without one');
        // The spans reached the receiver as OTLP/HTTP protobuf, flushed at exit.
        $this->waitFor('the spans exported', 10, fn () => str_contains((string) file_get_contents($otlpLog), $traceId));
        $requests = array_map(fn ($l) => json_decode($l, true), array_filter(explode("\n", file_get_contents($otlpLog))));
        $this->assertSame(['POST /v1/traces application/x-protobuf'], array_values(array_unique(array_map(fn ($r) => "{$r['method']} {$r['path']} {$r['content_type']}", $requests))));
        $exported = implode('', array_column($requests, 'body'));
        $this->assertStringContainsString(bin2hex('php-worker'), $exported, 'service.name');
        $this->assertStringContainsString(substr($seen, 36, 16), $exported, 'the attempt span the handler saw');
        $this->assertStringContainsString(bin2hex('deliver php'), $exported);

        // Tracing off: traceparent() is the message's own.
        $this->publishAmqp($queue, [['plain', 'x', ['traceparent' => $producer]]]);
        $plain = $this->startWorker($this->config($queue), [], 'plain');
        $this->waitFor('handled', 30, fn () => isset($plain->done()['plain']));
        $plain->signal(SIGTERM);
        $this->assertSame(0, $plain->wait(20));
        $this->assertSame($producer, $plain->done()['plain'][0]['traceparent']);
        $this->deleteQueues($queue, "$queue.dlq");
    }

    public static function crashes(): array
    {
        return ['exit()' => ['exit', 'exit()'], 'a fatal error' => ['fatal', 'a fatal error']];
    }
}
