<?php

namespace MessageRouter\Tests;

use MessageRouter\Symfony\Command\ImportMessengerCommand;
use MessageRouter\Tests\Symfony\ImportedEvent;
use MessageRouter\Tests\Symfony\ImportedOrder;
use MessageRouter\Tests\Symfony\MessengerImportKernel;
use Symfony\Bundle\FrameworkBundle\Console\Application;
use Symfony\Component\Console\Tester\CommandTester;
use Symfony\Component\Yaml\Yaml;

/**
 * `message-router:import-messenger` in a real Symfony kernel with framework.messenger:
 * the router.yaml it writes passes the daemon's `validate`, carries the transports,
 * topology, retry policies and subscriptions over, and comments on the rest.
 *
 * Each test runs in its own process: the Messenger component it loads would turn
 * Messenger on in the other tests' kernels (FrameworkBundle enables it when present).
 *
 * @runTestsInSeparateProcesses
 */
final class ImportMessengerTest extends WorkerTestCase
{
    private const DSN_ENV = 'MESSENGER_TRANSPORT_DSN';

    protected function setUp(): void
    {
        parent::setUp();
        require_once '/usr/share/php/Symfony/Component/Messenger/autoload.php';
        require_once '/usr/share/php/Symfony/Component/Messenger/Bridge/Amqp/autoload.php';
        require_once '/usr/share/php/Symfony/Component/Messenger/Bridge/Redis/autoload.php';
        require_once '/usr/share/php/Symfony/Component/Yaml/autoload.php';
    }

    private static function setEnv(string $name, string $value): void
    {
        putenv("$name=$value");
        $_ENV[$name] = $_SERVER[$name] = $value;
    }

    /** @return array{CommandTester, int} */
    private function import(MessengerImportKernel $kernel, array $input): array
    {
        $tester = new CommandTester((new Application($kernel))->find(ImportMessengerCommand::NAME));
        $code = $tester->execute($input, ['capture_stderr_separately' => true]);
        return [$tester, $code];
    }

    /** `message-router validate` (the daemon) on the file; fails with its output. */
    private function assertValid(string $file): void
    {
        $bin = getenv('MESSAGE_ROUTER_BIN') ?: __DIR__ . '/../target/debug/message-router';
        exec(escapeshellarg($bin) . ' validate --config ' . escapeshellarg($file) . ' 2>&1', $out, $code);
        $this->assertSame(0, $code, "validate $file:\n" . implode("\n", $out) . "\n---\n" . file_get_contents($file));
    }

    public function testTheImportCarriesTransportsRetriesAndTopologyOverAndCommentsOnTheRest(): void
    {
        [$exchange, $orders, $refunds] = [self::unique('imp-shop'), self::unique('imp-orders'), self::unique('imp-refunds')];
        [$stream, $group] = [self::unique('imp-events'), self::unique('imp-group')];
        $messenger = [
            'failure_transport' => 'failed',
            'transports' => [
                'orders' => [
                    'dsn' => '%env(' . self::DSN_ENV . ')%',
                    'options' => [
                        'exchange' => ['type' => 'topic'],
                        'queues' => [
                            $orders => ['binding_keys' => ['order.#']],
                            $refunds => ['binding_keys' => ['refund.*', 'chargeback.*'], 'arguments' => ['x-max-priority' => 10]],
                        ],
                        'prefetch_count' => 20,
                        'persistent' => 'true',
                        'heartbeat' => 10,
                    ],
                    'retry_strategy' => ['max_retries' => 3, 'delay' => 500, 'multiplier' => 3, 'max_delay' => 0],
                ],
                'events' => [
                    'dsn' => "redis://127.0.0.1:6379/$stream/$group/worker-1?delete_after_ack=true",
                    'options' => ['redeliver_timeout' => 120, 'dbindex' => 2],
                    'retry_strategy' => ['service' => 'app.retry'],
                    'serializer' => 'app.serializer',
                    'failure_transport' => 'failed_events',
                ],
                'failed' => 'amqp://guest:guest@127.0.0.1:5672/%2f/failed',
                'failed_events' => 'in-memory://',
                'sync' => 'sync://',
                'db' => 'doctrine://default',
            ],
            'routing' => [ImportedOrder::class => ['orders'], ImportedEvent::class => ['events', 'sync']],
        ];
        // The DSN is read when the command runs, not when the container is compiled.
        self::setEnv(self::DSN_ENV, "amqp://app:s3cret@127.0.0.1:5672/%2f/$exchange");
        $kernel = new MessengerImportKernel($this->dir, $messenger);
        [$tester, $code] = $this->import($kernel, ['--output' => 'config/router.yaml']);
        $file = "$this->dir/config/router.yaml";
        $this->assertSame(0, $code, $tester->getErrorOutput());
        $this->assertMatchesRegularExpression(
            '~^wrote 2 transports, 3 subscriptions to ' . preg_quote($file, '~') . '; \d+ settings need a look: see the comments$~',
            trim($tester->getErrorOutput()),
        );
        // In process: the extension's parser (the daemon's, without the delivery target
        // section the extension ignores) takes it; it connects only in run().
        new \MessageRouter\Router($file);
        // Daemon mode: the same file with an HTTP handler passes `validate`.
        [$daemon, $code] = $this->import($kernel, ['--output' => 'config/router-daemon.yaml', '--endpoint' => 'http://127.0.0.1:8080/_message-router']);
        $this->assertSame(0, $code, $daemon->getErrorOutput());
        $this->assertValid("$this->dir/config/router-daemon.yaml");
        $yaml = file_get_contents($file);
        $config = Yaml::parse($yaml);

        $this->assertSame(['events', 'orders'], array_keys($config['transports']), 'only what the router consumes');
        $amqp = $config['transports']['orders'];
        $this->assertSame(['amqp', 'amqp://app:s3cret@127.0.0.1:5672/%2F', '10s'], [$amqp['type'], $amqp['url'], $amqp['heartbeat']]);
        $this->assertSame([
            'exchanges' => [['name' => $exchange, 'type' => 'topic', 'durable' => true]],
            'queues' => [
                ['name' => $orders, 'durable' => true],
                ['name' => $refunds, 'durable' => true, 'arguments' => ['x-max-priority' => 10]],
            ],
            'bindings' => [
                ['queue' => $orders, 'exchange' => $exchange, 'routing_key' => 'order.#'],
                ['queue' => $refunds, 'exchange' => $exchange, 'routing_key' => 'refund.*'],
                ['queue' => $refunds, 'exchange' => $exchange, 'routing_key' => 'chargeback.*'],
            ],
        ], $amqp['topology']);
        $this->assertSame(['type' => 'redis', 'url' => 'redis://127.0.0.1:6379/2'], $config['transports']['events']);
        $this->assertSame(['messenger' => []], $config['handlers']);

        $retry = ['max_attempts' => 4, 'initial_delay' => '500ms', 'multiplier' => 3, 'max_delay' => '24h'];
        $this->assertSame([
            'events' => ['transport' => 'events', 'streams' => [$stream], 'group' => $group, 'claim_idle' => '2m', 'envelope' => 'messenger', 'default_handler' => 'messenger'],
            "orders.$orders" => ['transport' => 'orders', 'queue' => $orders, 'prefetch' => 20, 'envelope' => 'messenger', 'default_handler' => 'messenger', 'retry' => $retry],
            "orders.$refunds" => ['transport' => 'orders', 'queue' => $refunds, 'prefetch' => 20, 'envelope' => 'messenger', 'default_handler' => 'messenger', 'retry' => $retry],
        ], $config['subscriptions']);

        foreach ([
            ImportedOrder::class . ' -> orders',
            ImportedEvent::class . ' -> events, sync',
            'Routing stays in Messenger',
            '# REVIEW: url: from the DSN of %env(' . self::DSN_ENV . ')%, as it resolves here, password in clear',
            'failed (amqp://): the failure transport. Not consumed',
            'failed_events (in-memory://): the failure transport. Not consumed',
            'sync: sync://: handled in the dispatching process',
            'db: REVIEW: doctrine://: the router has no database transport',
            "REVIEW: failure_transport \"failed\": the router dead-letters into \"$orders.dlq\" instead; message-router:failed:show|retry|remove replace messenger:failed:*",
            "REVIEW: failure_transport \"failed_events\": the router dead-letters into \"$stream.dlq\"",
            "max_delay: Messenger's 0 has no bound; the router needs one: 24h",
            'REVIEW: retry: a custom retry strategy service (app.retry)',
            'serializer: "app.serializer" (not the default)',
            'consumer: "worker-1": the router names its consumer itself',
            'REVIEW: delete_after_ack',
            '# persistent:',
        ] as $comment) {
            $this->assertStringContainsString($comment, $yaml);
        }
        $this->assertStringNotContainsString('env_', $yaml, 'no unresolved container placeholder');

        // A second process of the same app (the compiled container reused) sees the
        // variable's new value: the DSN was not baked in at compile time.
        self::setEnv(self::DSN_ENV, "amqp://app:s3cret@127.0.0.1:5672/shop/$exchange");
        [$again, $code] = $this->import(new MessengerImportKernel($this->dir, $messenger), []);
        $this->assertSame(0, $code, $again->getErrorOutput());
        $this->assertSame('amqp://app:s3cret@127.0.0.1:5672/shop', Yaml::parse($again->getDisplay())['transports']['orders']['url']);
        $this->assertStringContainsString('subscriptions to stdout', $again->getErrorOutput());
    }

    public function testAnExistingFileIsReplacedOnlyWithForce(): void
    {
        $queue = self::unique('imp-jobs');
        $kernel = new MessengerImportKernel($this->dir, [
            'transports' => ['jobs' => ['dsn' => "amqp://guest:guest@127.0.0.1:5672/%2f/$queue", 'options' => ['queues' => [$queue => []]]]],
        ]);
        mkdir("$this->dir/config");
        $file = "$this->dir/config/router.yaml";
        file_put_contents($file, "# hand-written\n");

        [$refused, $code] = $this->import($kernel, ['--output' => $file]);
        $this->assertSame(1, $code);
        $this->assertStringContainsString("$file exists: not overwritten (--force replaces it)", $refused->getErrorOutput());
        $this->assertSame("# hand-written\n", file_get_contents($file));

        [$forced, $code] = $this->import($kernel, ['--output' => $file, '--force' => true, '--handler' => 'bus', '--endpoint' => 'http://127.0.0.1:8080/_message-router']);
        $this->assertSame(0, $code, $forced->getErrorOutput());
        $this->assertValid($file);
        $config = Yaml::parseFile($file);
        $this->assertSame(['bus' => ['type' => 'http', 'endpoints' => ['http://127.0.0.1:8080/_message-router']]], $config['handlers']);
        $this->assertSame(
            ['transport' => 'jobs', 'queue' => $queue, 'envelope' => 'messenger', 'default_handler' => 'bus', 'retry' => ['max_attempts' => 4, 'initial_delay' => '1s', 'multiplier' => 2, 'max_delay' => '24h']],
            $config['subscriptions']['jobs'],
            'one queue: the subscription is named after the transport; Messenger\'s default retry strategy',
        );
        // Messenger's defaults: a fanout exchange named after the DSN's path, bound without a key.
        $this->assertSame([['queue' => $queue, 'exchange' => $queue, 'routing_key' => '']], $config['transports']['jobs']['topology']['bindings']);
        $this->assertSame('fanout', $config['transports']['jobs']['topology']['exchanges'][0]['type']);

        [$bad, $code] = $this->import($kernel, ['--endpoint' => 'ftp://x']);
        $this->assertSame(1, $code);
        $this->assertStringContainsString('--endpoint must be an http:// or https:// URL', $bad->getErrorOutput());
        [$bad, $code] = $this->import($kernel, ['--handler' => 'two words']);
        $this->assertSame(1, $code);
        $this->assertStringContainsString('--handler must be a name', $bad->getErrorOutput());
    }

    public function testAnAppWithoutMessengerTransportsIsAnError(): void
    {
        foreach ([['enabled' => false], ['transports' => []]] as $messenger) {
            [$tester, $code] = $this->import(new MessengerImportKernel($this->dir, $messenger), ['--output' => 'router.yaml']);
            $this->assertSame(1, $code);
            $this->assertStringContainsString('This app has no Symfony Messenger transports (framework.messenger.transports): nothing to import.', $tester->getErrorOutput());
            $this->assertFileDoesNotExist("$this->dir/router.yaml");
        }
        [$tester, $code] = $this->import(new MessengerImportKernel($this->dir, ['transports' => ['sync' => 'sync://']]), []);
        $this->assertSame(1, $code);
        $this->assertStringContainsString("None of the app's Messenger transports is one the router consumes (AMQP or Redis):\n  sync: sync://", $tester->getErrorOutput());
    }
}
