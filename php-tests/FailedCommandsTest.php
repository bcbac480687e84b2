<?php

namespace MessageRouter\Tests;

use MessageRouter\Admin\AdminClient;
use MessageRouter\Symfony\Command\FailedRemoveCommand;
use MessageRouter\Symfony\Command\FailedRetryCommand;
use MessageRouter\Symfony\Command\FailedShowCommand;
use MessageRouter\Tests\Symfony\TestKernel;
use Symfony\Bundle\FrameworkBundle\Console\Application;
use Symfony\Component\Console\Output\OutputInterface;
use Symfony\Component\Console\Tester\CommandTester;

/**
 * The bundle's `message-router:failed:show|retry|remove` against the real daemon's
 * admin API: messages a handler (tests/handlers/handler.php under php -S) rejects are
 * dead-lettered by the daemon on RabbitMQ (and Redis, Kafka), then listed, counted,
 * shown, replayed and purged through the commands in a Symfony kernel.
 */
final class FailedCommandsTest extends WorkerTestCase
{
    private const TOKEN = 'php-tests-admin-token-0123456789';

    /** @var list<resource> */
    private array $servers = [];
    /** @var list<resource> */
    private array $daemons = [];
    /** @var list<string> queues to delete */
    private array $queues = [];
    /** @var list<string> Redis keys to delete */
    private array $keys = [];

    protected function tearDown(): void
    {
        foreach ($this->daemons as $p) {
            proc_terminate($p, 9);
            proc_close($p);
        }
        foreach ($this->servers as $p) {
            self::killTree($p);
        }
        $this->servers = $this->daemons = [];
        $this->deleteQueues(...$this->queues);
        if ($this->keys) {
            $this->redis()->del(...$this->keys);
        }
        unset($_SERVER['MR_TEST_ADMIN_TOKEN']);
        parent::tearDown();
    }

    /** A queue for the daemon to consume, and everything it makes beside it (deleted in tearDown). */
    private function queue(string $prefix): string
    {
        $q = self::unique($prefix);
        // The dead-letter queue too: the daemon declares it only at its first dead letter.
        $this->declareQueue($q);
        $this->declareQueue("$q.dlq");
        array_push($this->queues, $q, "$q.dlq");
        foreach (['1s', '5s', '30s', '2m', '10m', '1h', '6h', '24h'] as $bucket) {
            $this->queues[] = "$q.retry.$bucket";
        }
        return $q;
    }

    /** tests/handlers/handler.php under `php -n -S`: 422 for `behave: reject`, 500 for `fail`. */
    private function startHandler(): string
    {
        $port = self::freePort();
        $cmd = [PHP_BINARY, '-n', '-S', "127.0.0.1:$port", realpath(__DIR__ . '/../tests/handlers/handler.php')];
        $env = ['HANDLER_LOG' => "$this->dir/handler.log", 'PATH' => getenv('PATH')];
        $this->servers[] = proc_open($cmd, [0 => ['file', '/dev/null', 'r'], 1 => ['file', "$this->dir/php-s.out", 'a'], 2 => ['file', "$this->dir/php-s.err", 'a']], $pipes, null, $env);
        $this->waitFor('php -S to listen', 10, fn () => @fsockopen('127.0.0.1', $port) !== false);
        return "http://127.0.0.1:$port/";
    }

    /**
     * The daemon with an admin listener (and `$token`), `$body` the rest of its YAML;
     * returns the admin URL once the API answers.
     */
    private function startDaemon(string $body, ?string $token = null): string
    {
        $bin = getenv('MESSAGE_ROUTER_BIN') ?: __DIR__ . '/../target/debug/message-router';
        $this->assertFileExists($bin, 'cargo build -p router-daemon (php-tests/run does)');
        $port = self::freePort();
        $admin = $token === null ? "{ listen: \"127.0.0.1:$port\" }" : "{ listen: \"127.0.0.1:$port\", token: \"$token\" }";
        file_put_contents("$this->dir/router.yaml", "admin: $admin\nshutdown: { grace_period: 1s }\n$body");
        $this->daemons[] = proc_open([$bin, 'run', '--config', "$this->dir/router.yaml"], [0 => ['file', '/dev/null', 'r'], 1 => ['file', '/dev/null', 'w'], 2 => ['file', "$this->dir/daemon.log", 'w']], $pipes);
        $this->waitFor('the admin listener', 20, fn () => @file_get_contents("http://127.0.0.1:$port/healthz") === "ok\n");
        return "http://127.0.0.1:$port";
    }

    private function kernel(array $options): TestKernel
    {
        $kernel = new TestKernel($this->dir, "$this->dir/router.yaml", $options);
        $kernel->boot();
        return $kernel;
    }

    /**
     * Run `$name` with `$input` in `$kernel`: [exit code, display with its whitespace
     * collapsed]. With `$answers` interactive (those typed), else not.
     */
    private function command(TestKernel $kernel, string $name, array $input = [], ?array $answers = null): array
    {
        $tester = new CommandTester((new Application($kernel))->find($name));
        if ($answers !== null) {
            $tester->setInputs($answers);
        }
        $code = $tester->execute($input, ['interactive' => $answers !== null, 'decorated' => false, 'verbosity' => OutputInterface::VERBOSITY_VERBOSE]);
        $display = $tester->getDisplay();
        $this->assertStringNotContainsString(self::TOKEN, $display, 'the token is never shown');
        return [$code, trim((string) preg_replace('/\s+/', ' ', $display))];
    }

    /** Drain `$subscription` (its consumer stopped: a paused one would hold what comes, unacked). */
    private function drain(AdminClient $api, string $subscription): void
    {
        $api->request('POST', "/api/subscriptions/$subscription/drain");
        $this->waitFor("$subscription drained", 20, fn () => $api->request('GET', "/api/subscriptions/$subscription")['state'] === 'drained');
    }

    public function testShowRetryAndRemoveDeadLettersOfRabbitMq(): void
    {
        [$a, $b] = [$this->queue('php-failed-orders'), $this->queue('php-failed-refunds')];
        $handler = $this->startHandler();
        $amqp = self::amqpTransport()['url'];
        $url = $this->startDaemon(<<<YAML
transports:
  rabbit: { type: amqp, url: "$amqp", reconnect_max_delay: 1s }
handlers:
  php: { endpoints: ["$handler"], timeout: 5s }
subscriptions:
  orders: { transport: rabbit, queue: $a, retry: { max_attempts: 1 } }
  refunds: { transport: rabbit, queue: $b, retry: { max_attempts: 1 } }
routes:
  - { name: orders, match: { routing_key: "$a" }, handler: php }
  - { name: refunds, match: { routing_key: "$b" }, handler: php }
YAML);
        $this->publishAmqp($a, [
            ['ord-1', 'body of ord-1', ['behave' => 'reject']],
            ['ord-2', '<b>body</b> of ord-2', ['behave' => 'reject']],
            ['ord/3', 'body of ord/3', ['behave' => 'fail', 'tenant' => 'acme']],
        ]);
        $this->publishAmqp($b, [['ref-1', 'body of ref-1', ['behave' => 'reject']]]);
        $this->waitFor('four dead letters', 30, fn () => $this->countAmqp("$a.dlq") === 3 && $this->countAmqp("$b.dlq") === 1);
        // Drained: a replayed message stays on its queue for the test to see.
        $api = new AdminClient($url);
        $this->drain($api, 'orders');
        $this->drain($api, 'refunds');
        $kernel = $this->kernel(['admin_url' => $url]);
        $rejected = 'rejected by handler: HTTP 422: invalid order payload';

        // The list: every subscription.
        [$code, $out] = $this->command($kernel, FailedShowCommand::NAME);
        $this->assertSame(0, $code, $out);
        foreach (['Subscription orders', 'Subscription refunds', 'ord-1', 'ord-2', 'ord/3', 'ref-1', 'body of ord-1', '<b>body</b> of ord-2', $rejected] as $needle) {
            $this->assertStringContainsString($needle, $out);
        }
        // --max, one subscription, filters.
        [$code, $out] = $this->command($kernel, FailedShowCommand::NAME, ['--subscription' => 'orders', '--max' => '2']);
        $this->assertSame(0, $code, $out);
        $this->assertStringNotContainsString('ref-1', $out);
        $this->assertSame(2, preg_match_all('/ (ord-1|ord-2|ord\/3) +\d{4}-/', $out), $out);
        $this->assertStringContainsString('Showing the first 2: more match', $out);
        [$code, $out] = $this->command($kernel, FailedShowCommand::NAME, ['--reason' => '^max attempts']);
        $this->assertSame(0, $code, $out);
        $this->assertStringContainsString('ord/3', $out);
        $this->assertStringNotContainsString('ord-1', $out);
        $this->assertStringNotContainsString('ref-1', $out);
        [$code, $out] = $this->command($kernel, FailedShowCommand::NAME, ['--route' => 'refunds']);
        $this->assertSame(0, $code, $out);
        $this->assertStringContainsString('body of ref-1', $out);
        $this->assertStringNotContainsString('ord-1', $out);
        [$code, $out] = $this->command($kernel, FailedShowCommand::NAME, ['--max' => 'lots']);
        $this->assertSame(2, $code);
        $this->assertStringContainsString('--max must be a positive integer, got "lots"', $out);

        // --stats: counts by reason and by route.
        [$code, $out] = $this->command($kernel, FailedShowCommand::NAME, ['--stats' => true]);
        $this->assertSame(0, $code, $out);
        $this->assertStringContainsString('Subscription orders: 3 dead letter(s)', $out);
        $this->assertStringContainsString('Subscription refunds: 1 dead letter(s)', $out);
        $this->assertMatchesRegularExpression('/Reason +Count .*' . preg_quote($rejected, '/') . ' +2 .*max attempts exhausted \(1 of 1\) +1 .*Route +Count .*orders +3 /', $out);
        $this->assertStringContainsString('4 dead letter(s) in subscriptions "orders", "refunds"', $out);

        // One whole, found in whichever subscription holds it; an id with a '/'.
        [$code, $out] = $this->command($kernel, FailedShowCommand::NAME, ['id' => 'ord/3']);
        $this->assertSame(0, $code, $out);
        foreach (['Dead letter ord/3 of subscription orders', 'Router headers', 'x-router-reason max attempts exhausted (1 of 1)',
            'x-router-last-error HTTP 500: handler failed on purpose', 'Other headers', 'tenant acme', "queue \"$a\"",
            'Body (13 bytes)'] as $needle) {
            $this->assertStringContainsString($needle, $out);
        }
        $this->assertMatchesRegularExpression('/Body \(13 bytes\) -+ body of ord\/3$/', $out);
        $this->assertStringNotContainsString('ord-1', $out);

        // Errors: exit 1 and the API's message.
        [$code, $out] = $this->command($kernel, FailedShowCommand::NAME, ['id' => 'nope', '--subscription' => 'orders']);
        $this->assertSame(1, $code, $out);
        $this->assertStringContainsString('no dead letter "nope" in subscription "orders"', $out);
        [$code, $out] = $this->command($kernel, FailedShowCommand::NAME, ['id' => 'nope']);
        $this->assertSame(1, $code, $out);
        $this->assertStringContainsString('No dead letter "nope" in subscriptions "orders", "refunds"', $out);
        [$code, $out] = $this->command($kernel, FailedShowCommand::NAME, ['--subscription' => 'nope']);
        $this->assertSame(1, $code, $out);
        $this->assertStringContainsString('no subscription "nope" (there are: orders, refunds)', $out);
        [$code, $out] = $this->command($kernel, FailedShowCommand::NAME, ['--reason' => '(']);
        $this->assertSame(1, $code, $out);
        $this->assertStringContainsString('reason: not a regular expression', $out);

        // retry: without --force and no terminal, refused and nothing changes.
        [$code, $out] = $this->command($kernel, FailedRetryCommand::NAME, ['id' => ['ord-1'], '--subscription' => 'orders']);
        $this->assertSame(1, $code, $out);
        $this->assertStringContainsString('1 dead letter(s) to replay: orders: 1', $out);
        $this->assertStringContainsString('Not replaying without confirmation: run again with --force', $out);
        $this->assertSame([0, 3], [$this->countAmqp($a), $this->countAmqp("$a.dlq")]);
        // Nothing selected: a usage error.
        [$code, $out] = $this->command($kernel, FailedRetryCommand::NAME, ['--force' => true]);
        $this->assertSame(2, $code, $out);
        $this->assertStringContainsString('Say which dead letters to replay', $out);
        // An id that is not there.
        [$code, $out] = $this->command($kernel, FailedRetryCommand::NAME, ['id' => ['nope'], '--subscription' => 'orders', '--force' => true]);
        $this->assertSame(1, $code, $out);
        $this->assertStringContainsString('no dead letter of "orders" matches; nothing changed', $out);
        [$code, $out] = $this->command($kernel, FailedRetryCommand::NAME, ['id' => ['nope'], '--force' => true]);
        $this->assertSame(1, $code, $out);
        $this->assertStringContainsString('No dead letter matches in subscriptions "orders", "refunds"; nothing replayed', $out);
        // Asked, and declined: nothing changes.
        [$code, $out] = $this->command($kernel, FailedRetryCommand::NAME, ['id' => ['ord-1']], ['no']);
        $this->assertSame(0, $code, $out);
        $this->assertStringContainsString('Replay these 1 dead letter(s) to their source', $out);
        $this->assertStringContainsString('Nothing replayed', $out);
        $this->assertSame([0, 3], [$this->countAmqp($a), $this->countAmqp("$a.dlq")]);

        // --force: replayed to its queue (the subscription is drained: it waits there).
        [$code, $out] = $this->command($kernel, FailedRetryCommand::NAME, ['id' => ['ord-1'], '--subscription' => 'orders', '--force' => true]);
        $this->assertSame(0, $code, $out);
        $this->assertStringContainsString('Replayed 1 dead letter(s) (orders: 1) to their source', $out);
        $this->assertSame([1, 2], [$this->countAmqp($a), $this->countAmqp("$a.dlq")]);
        // Asked and confirmed, every subscription, by id with a '/'.
        [$code, $out] = $this->command($kernel, FailedRetryCommand::NAME, ['id' => ['ord/3']], ['yes']);
        $this->assertSame(0, $code, $out);
        $this->assertStringContainsString('Replayed 1 dead letter(s) (orders: 1)', $out);
        $this->assertSame([2, 1], [$this->countAmqp($a), $this->countAmqp("$a.dlq")]);
        $back = [];
        foreach ($this->drainAmqp($a) as [$body, $headers, $id]) {
            $back[$id] = [$body, $headers['behave'] ?? null, isset($headers['x-router-replayed']), isset($headers['x-router-reason'])];
        }
        ksort($back);
        $this->assertSame(['ord-1' => ['body of ord-1', 'reject', true, false], 'ord/3' => ['body of ord/3', 'fail', true, false]], $back);

        // remove: refused without --force, then every dead letter of every subscription.
        [$code, $out] = $this->command($kernel, FailedRemoveCommand::NAME, ['--all' => true]);
        $this->assertSame(1, $code, $out);
        $this->assertStringContainsString('2 dead letter(s) to remove: orders: 1, refunds: 1', $out);
        $this->assertStringContainsString('Not removing without confirmation', $out);
        $this->assertSame([1, 1], [$this->countAmqp("$a.dlq"), $this->countAmqp("$b.dlq")]);
        [$code, $out] = $this->command($kernel, FailedRemoveCommand::NAME, ['--all' => true, '--force' => true]);
        $this->assertSame(0, $code, $out);
        $this->assertStringContainsString('Removed 2 dead letter(s) (orders: 1, refunds: 1)', $out);
        $this->assertSame([0, 0], [$this->countAmqp("$a.dlq"), $this->countAmqp("$b.dlq")]);
        [$code, $out] = $this->command($kernel, FailedShowCommand::NAME);
        $this->assertSame(0, $code, $out);
        $this->assertStringContainsString('No dead letters in subscriptions "orders", "refunds"', $out);
        [$code, $out] = $this->command($kernel, FailedRemoveCommand::NAME, ['--all' => true, '--subscription' => 'orders', '--force' => true]);
        $this->assertSame(1, $code, $out);
        $this->assertStringContainsString('no dead letter of "orders" matches; nothing changed', $out);
    }

    public function testTheAdminTokenIsSentAndNeverShown(): void
    {
        $q = $this->queue('php-failed-token');
        $handler = $this->startHandler();
        $amqp = self::amqpTransport()['url'];
        $url = $this->startDaemon(<<<YAML
transports:
  rabbit: { type: amqp, url: "$amqp", reconnect_max_delay: 1s }
handlers:
  php: { endpoints: ["$handler"], timeout: 5s }
subscriptions:
  main: { transport: rabbit, queue: $q, retry: { max_attempts: 1 } }
routes:
  - { name: work, handler: php }
YAML, self::TOKEN);
        // "stats": an id that names another route of the API when in the path.
        $this->publishAmqp($q, [['tok-1', 'x', ['behave' => 'reject']], ['stats', 'body of stats', ['behave' => 'reject']]]);
        $this->waitFor('two dead letters', 30, fn () => $this->countAmqp("$q.dlq") === 2);

        [$code, $out] = $this->command($this->kernel(['admin_url' => $url]), FailedShowCommand::NAME);
        $this->assertSame(1, $code, $out);
        $this->assertStringContainsString('this call needs the admin token', $out);
        $this->assertStringContainsString('set message_router.admin_token to it', $out);

        $wrong = 'not-the-admin-token-0123456789';
        [$code, $out] = $this->command($this->kernel(['admin_url' => $url, 'admin_token' => $wrong]), FailedRetryCommand::NAME, ['--all' => true, '--force' => true]);
        $this->assertSame(1, $code, $out);
        $this->assertStringContainsString('The configured message_router.admin_token is not the router\'s admin.token', $out);
        $this->assertStringNotContainsString($wrong, $out);
        $this->assertSame(2, $this->countAmqp("$q.dlq"));

        // As the README configures it: from the environment.
        $_SERVER['MR_TEST_ADMIN_TOKEN'] = self::TOKEN;
        $kernel = $this->kernel(['admin_url' => $url, 'admin_token' => '%env(MR_TEST_ADMIN_TOKEN)%']);
        [$code, $out] = $this->command($kernel, FailedShowCommand::NAME);
        $this->assertSame(0, $code, $out);
        $this->assertStringContainsString('tok-1', $out);
        [$code, $out] = $this->command($kernel, FailedShowCommand::NAME, ['id' => 'tok-1']);
        $this->assertSame(0, $code, $out);
        $this->assertStringContainsString('Dead letter tok-1 of subscription main', $out);
        [$code, $out] = $this->command($kernel, FailedShowCommand::NAME, ['id' => 'stats', '--subscription' => 'main']);
        $this->assertSame(0, $code, $out);
        $this->assertStringContainsString('Dead letter stats of subscription main', $out);
        $this->assertStringContainsString('body of stats', $out);
        [$code, $out] = $this->command($kernel, FailedRemoveCommand::NAME, ['id' => ['tok-1', 'stats'], '--force' => true]);
        $this->assertSame(0, $code, $out);
        $this->assertStringContainsString('Removed 2 dead letter(s) (main: 2)', $out);
        $this->assertSame(0, $this->countAmqp("$q.dlq"));
    }

    public function testAnUnreachableAdminApiSaysWhereItCalledAndHowToConfigureIt(): void
    {
        $port = self::freePort();
        [$code, $out] = $this->command($this->kernel(['admin_url' => "http://127.0.0.1:$port"]), FailedShowCommand::NAME);
        $this->assertSame(1, $code, $out);
        $this->assertStringContainsString("cannot reach the router's admin API at http://127.0.0.1:$port/api/subscriptions", $out);
        $this->assertStringContainsString('set message_router.admin_url to it', $out);
        // The default: the router's default admin.listen.
        $this->assertSame('http://127.0.0.1:9090', (new AdminClient())->url());
    }

    /** Redis ids (`<stream>/<entry id>`) shown and replayed; a purge on Kafka refused with the API's reason. */
    public function testRedisIdsAndAPurgeKafkaCannotDo(): void
    {
        $stream = self::unique('php-failed-stream');
        $group = self::unique('group');
        $topic = self::unique('php-failed-topic');
        $this->keys = [$stream, "$stream.dlq", "$stream.$group.delayed", "$stream.$group.retry"];
        self::kafkaTool('create', $topic, '1');
        $handler = $this->startHandler();
        $brokers = self::kafkaTransport()['brokers'][0];
        $url = $this->startDaemon(<<<YAML
transports:
  redis: { type: redis, url: "redis://127.0.0.1:6379", consumer: php-tests }
  kafka: { type: kafka, brokers: ["$brokers"], properties: { session.timeout.ms: "6000", heartbeat.interval.ms: "500" } }
handlers:
  php: { endpoints: ["$handler"], timeout: 5s }
subscriptions:
  stream: { transport: redis, streams: [$stream], group: $group, declare: true, retry: { max_attempts: 1 } }
  log: { transport: kafka, topics: [$topic], group: $group, retry: { max_attempts: 1 } }
routes:
  - { name: work, handler: php }
YAML);
        $this->redis()->xAdd($stream, '*', ['message_id' => 'red-1', 'body' => 'body of red-1', 'behave' => 'reject']);
        self::publishKafka($topic, [['kaf-1', 'body of kaf-1', ['behave' => 'reject'], 'k1']]);
        $api = new AdminClient($url);
        $this->waitFor('a dead letter in each', 60, fn () => $api->stats('stream')['count'] === 1 && $api->stats('log')['count'] === 1);
        $this->drain($api, 'stream');
        $this->drain($api, 'log');
        $kernel = $this->kernel(['admin_url' => $url]);

        $entry = $this->redis()->xRange("$stream.dlq", '-', '+');
        $id = "$stream.dlq/" . array_key_first($entry);
        [$code, $out] = $this->command($kernel, FailedShowCommand::NAME, ['id' => $id]);
        $this->assertSame(0, $code, $out);
        $this->assertStringContainsString("Dead letter $id of subscription stream", $out);
        $this->assertStringContainsString('body of red-1', $out);
        $kafkaId = $api->deadLetters('log')['dead_letters'][0]['id'];
        $this->assertMatchesRegularExpression('/^' . preg_quote("$topic.dlq", '/') . '\/\d+\/\d+$/', $kafkaId);
        [$code, $out] = $this->command($kernel, FailedShowCommand::NAME, ['id' => $kafkaId, '--subscription' => 'log']);
        $this->assertSame(0, $code, $out);
        $this->assertStringContainsString('body of kaf-1', $out);

        [$code, $out] = $this->command($kernel, FailedRetryCommand::NAME, ['id' => [$id], '--force' => true]);
        $this->assertSame(0, $code, $out);
        $this->assertStringContainsString('Replayed 1 dead letter(s) (stream: 1)', $out);
        $this->assertSame(0, $this->redis()->xLen("$stream.dlq"));
        $this->assertSame(2, $this->redis()->xLen($stream), 'the replayed copy is back on its stream');

        [$code, $out] = $this->command($kernel, FailedRemoveCommand::NAME, ['--subscription' => 'log', '--all' => true, '--force' => true]);
        $this->assertSame(1, $code, $out);
        $this->assertStringContainsString('retention', $out);
        $this->assertSame(1, $api->stats('log')['count']);
    }
}
