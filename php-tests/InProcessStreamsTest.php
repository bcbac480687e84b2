<?php

namespace MessageRouter\Tests;

/** The in-process worker against Redis Streams and Kafka, and many subscriptions at once. */
final class InProcessStreamsTest extends WorkerTestCase
{
    private static function config(array $transports, array $subscriptions): array
    {
        return [
            'shutdown' => ['grace_period' => '10s'],
            'transports' => $transports,
            'handlers' => ['php' => ['max_in_flight' => 8]],
            'subscriptions' => $subscriptions,
            'routes' => [['name' => 'work', 'handler' => 'php']],
        ];
    }

    public function testRedisOutcomes(): void
    {
        $stream = self::unique('php-stream');
        $group = self::unique('group');
        $r = $this->redis();
        $r->xAdd($stream, '*', ['message_id' => 'ok-1', 'body' => 'hello', 'behave' => 'ok']);
        $r->xAdd($stream, '*', ['message_id' => 'poison-1', 'body' => 'x', 'behave' => 'reject']);
        $r->xAdd($stream, '*', ['message_id' => 'flaky-1', 'body' => 'x', 'behave' => 'fail-until:2']);
        $config = self::config(['redis' => self::redisTransport()], ['main' => [
            'transport' => 'redis', 'streams' => [$stream], 'group' => $group, 'prefetch' => 16, 'retry' => self::retry(),
        ]]);
        $w = $this->startWorker($config);
        $this->waitFor('handled and dead-lettered', 30, function () use ($w, $r, $stream) {
            return isset($w->done()['ok-1'], $w->done()['flaky-1']) && count($r->xRange("$stream.dlq", '-', '+')) >= 1;
        });
        $this->waitFor('nothing pending', 10, fn () => ($r->xPending($stream, $group)[0] ?? 0) == 0);
        $w->signal(SIGTERM);
        $this->assertSame(0, $w->wait(15), $w->stderr());
        $ok = $w->done()['ok-1'][0];
        $this->assertSame(['hello', 1, 'main', $stream], [$ok['body'], $ok['attempt'], $ok['subscription'], $ok['key']]);
        $this->assertSame([1, 2], array_column($w->started()['flaky-1'], 'attempt'));
        $dead = array_values($r->xRange("$stream.dlq", '-', '+'));
        $this->assertSame('poison-1', $dead[0]['message_id']);
        $this->assertSame('rejected by handler: bad poison-1', $dead[0]['x-router-reason']);
        $r->del($stream, "$stream.dlq", "$stream.$group.retry", "$stream.$group.delayed");
    }

    public function testKafkaOutcomes(): void
    {
        $topic = self::unique('php-topic');
        $group = self::unique('group');
        self::kafkaTool('create', $topic, '2');
        self::publishKafka($topic, [
            ['ok-1', 'hello', ['behave' => 'ok'], 'k1'],
            ['poison-1', 'x', ['behave' => 'reject'], 'k2'],
            ['flaky-1', 'x', ['behave' => 'fail-until:2'], 'k3'],
        ]);
        $config = self::config(['kafka' => self::kafkaTransport()], ['main' => [
            'transport' => 'kafka', 'topics' => [$topic], 'group' => $group, 'prefetch' => 16, 'retry' => self::retry(),
            'ordering' => 'key',
        ]]);
        $w = $this->startWorker($config);
        $this->waitFor('handled', 60, fn () => isset($w->done()['ok-1'], $w->done()['flaky-1']));
        $dead = self::readKafka("$topic.dlq", 1, 20);
        $w->signal(SIGTERM);
        $this->assertSame(0, $w->wait(15), $w->stderr());
        $ok = $w->done()['ok-1'][0];
        $this->assertSame(['hello', 'k1', $topic], [$ok['body'], $ok['headers']['kafka-key'], $ok['key']]);
        $this->assertSame([1, 2], array_column($w->started()['flaky-1'], 'attempt'));
        $this->assertCount(1, $dead);
        $this->assertSame('poison-1', $dead[0]['headers']['message_id']);
        $this->assertSame('rejected by handler: bad poison-1', $dead[0]['headers']['x-router-reason']);
        $this->assertSame($topic, $dead[0]['headers']['x-router-original-topic']);
    }

    public function testOneProcessConsumesTenSubscriptionsAcrossBrokers(): void
    {
        $transports = ['rabbit' => self::amqpTransport(), 'redis' => self::redisTransport(), 'kafka' => self::kafkaTransport()];
        $subs = [];
        $queues = [];
        $streams = [];
        for ($i = 0; $i < 4; $i++) {
            $q = self::unique("php-many-q$i");
            $this->declareQueue($q);
            $this->publishAmqp($q, [["amqp-$i", 'x', []]]);
            $queues[] = $q;
            $subs["amqp$i"] = ['transport' => 'rabbit', 'queue' => $q];
        }
        for ($i = 0; $i < 3; $i++) {
            $s = self::unique("php-many-s$i");
            $this->redis()->xAdd($s, '*', ['message_id' => "redis-$i", 'body' => 'x']);
            $streams[] = $s;
            $subs["redis$i"] = ['transport' => 'redis', 'streams' => [$s], 'group' => self::unique('group')];
        }
        for ($i = 0; $i < 3; $i++) {
            $t = self::unique("php-many-t$i");
            self::kafkaTool('create', $t, '1');
            self::publishKafka($t, [["kafka-$i", 'x', [], null]]);
            $subs["kafka$i"] = ['transport' => 'kafka', 'topics' => [$t], 'group' => self::unique('group')];
        }
        $w = $this->startWorker(self::config($transports, $subs));
        $this->waitFor('one message from each of the 10 subscriptions', 60, fn () => count($w->done()) >= 10);
        $w->signal(SIGTERM);
        $this->assertSame(0, $w->wait(15), $w->stderr());
        $bySub = [];
        foreach ($w->done() as $id => $calls) {
            $bySub[$calls[0]['subscription']] = $id;
            $this->assertCount(1, $calls, "$id handled once");
        }
        $want = [];
        foreach (array_keys($subs) as $name) {
            $want[$name] = preg_replace('/(\d)$/', '-$1', $name); // amqp0 → amqp-0
        }
        ksort($want);
        ksort($bySub);
        $this->assertSame($want, $bySub, 'each subscription delivered its message');
        $this->assertCount(1, array_unique(array_column(array_merge(...array_values($w->done())), 'pid')), 'all in one process');
        foreach ($queues as $q) {
            $this->assertSame(0, $this->countAmqp($q));
        }
        $this->deleteQueues(...array_merge($queues, array_map(fn ($q) => "$q.dlq", $queues)));
        $this->redis()->del(...$streams);
    }
}
