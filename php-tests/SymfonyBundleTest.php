<?php

namespace MessageRouter\Tests;

use MessageRouter\Symfony\Command\ConsumeCommand;
use MessageRouter\Symfony\Controller\DeliveryController;
use MessageRouter\Symfony\HandlerLocator;
use MessageRouter\Tests\Symfony\OrderHandler;
use MessageRouter\Tests\Symfony\RefundHandler;
use MessageRouter\Tests\Symfony\TestKernel;
use Symfony\Bundle\FrameworkBundle\Console\Application;
use Symfony\Component\Console\Tester\CommandTester;
use Symfony\Component\HttpFoundation\Request;

/**
 * The bundle in a real Symfony kernel (Debian's Symfony 5.4): attribute-registered
 * handlers found by route, `message-router:consume` consuming RabbitMQ in process with
 * --limit, and the delivery controller answering as the HTTP contract says.
 */
final class SymfonyBundleTest extends WorkerTestCase
{
    private function kernel(string $queueA, string $queueB): TestKernel
    {
        $yaml = "$this->dir/router.yaml";
        $amqp = self::amqpTransport()['url'];
        file_put_contents($yaml, <<<YAML
transports:
  rabbit: { type: amqp, url: "$amqp" }
handlers:
  shop: {}
subscriptions:
  a: { transport: rabbit, queue: $queueA }
  b: { transport: rabbit, queue: $queueB }
routes:
  - { name: orders, match: { routing_key: "$queueA" }, handler: shop }
  - { name: refunds, match: { routing_key: "$queueB" }, handler: shop }
YAML);
        $kernel = new TestKernel($this->dir, $yaml);
        $kernel->boot();
        return $kernel;
    }

    public function testTheBundleFindsAttributeHandlersAndTheCommandConsumes(): void
    {
        [$a, $b] = [self::unique('php-sf-orders'), self::unique('php-sf-refunds')];
        $this->declareQueue($a);
        $this->declareQueue($b);
        $kernel = $this->kernel($a, $b);
        $container = $kernel->getContainer();
        $locator = $container->get(HandlerLocator::class);
        $this->assertSame(['orders' => OrderHandler::class, 'refunds' => RefundHandler::class], $locator->map());

        $this->publishAmqp($a, [['o-1', 'x', []], ['o-2', 'x', []]]);
        $this->publishAmqp($b, [['r-1', 'x', []]]);
        $app = new Application($kernel);
        $tester = new CommandTester($app->find(ConsumeCommand::NAME));
        $this->assertSame(0, $tester->execute(['--limit' => '3', '--time-limit' => '30']));
        $this->assertStringContainsString('Stopped (limit) after 3 messages', $tester->getDisplay());
        $lines = file("$this->dir/handled.log", FILE_IGNORE_NEW_LINES);
        sort($lines);
        $this->assertSame(['orders o-1', 'orders o-2', 'refunds r-1'], $lines);
        $this->assertSame(0, $this->countAmqp($a) + $this->countAmqp($b));

        $bad = new CommandTester($app->find(ConsumeCommand::NAME));
        $this->assertNotSame(0, $bad->execute(['--limit' => 'many']));
        $this->assertStringContainsString('--limit must be a positive integer', $bad->getDisplay());
        $this->deleteQueues($a, $b, "$a.dlq", "$b.dlq");
    }

    public function testTheDeliveryControllerAnswersPerTheHttpContract(): void
    {
        $kernel = $this->kernel(self::unique('q'), self::unique('q'));
        $controller = $kernel->getContainer()->get(DeliveryController::class);
        $request = Request::create('/_message-router', 'POST', [], [], [], [
            'HTTP_CE_ID' => 'o-9', 'HTTP_X_ROUTER_ROUTE' => 'orders', 'HTTP_X_ROUTER_ATTEMPT' => '1',
        ], '{"n":9}');
        $response = $controller($request);
        $this->assertSame(200, $response->getStatusCode());
        $this->assertSame(['orders o-9'], file("$this->dir/handled.log", FILE_IGNORE_NEW_LINES));
        $unknown = Request::create('/_message-router', 'POST', [], [], [], ['HTTP_X_ROUTER_ROUTE' => 'nope'], 'x');
        $this->assertSame(404, $controller($unknown)->getStatusCode());
    }
}
