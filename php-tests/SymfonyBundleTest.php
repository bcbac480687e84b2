<?php

namespace MessageRouter\Tests;

use MessageRouter\Http\Signature;
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
    private function kernel(string $queueA, string $queueB, array $options = []): TestKernel
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
        $kernel = new TestKernel($this->dir, $yaml, $options);
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
        // A route with no handler in this deployment: retried, not dead-lettered.
        $unknown = Request::create('/_message-router', 'POST', [], [], [], ['HTTP_X_ROUTER_ROUTE' => 'nope'], 'x');
        $response = $controller($unknown);
        $this->assertSame([503, '5'], [$response->getStatusCode(), $response->headers->get('Retry-After')]);
        $this->assertStringContainsString('no handler for route "nope"', (string) $response->getContent());
    }

    /** `signing_secret`: one string as before, or a list during a rotation. */
    public function testTheDeliveryControllerTakesOneSigningSecretOrSeveral(): void
    {
        [$new, $old, $other] = ['new-secret-0123456789', 'old-secret-0123456789', 'other-secret-0123456789'];
        $send = function (DeliveryController $controller, array $signs, string $id) {
            $ts = (string) time();
            $request = Request::create('/_message-router', 'POST', [], [], [], [
                'HTTP_CE_ID' => $id, 'HTTP_X_ROUTER_ROUTE' => 'orders',
                'HTTP_X_ROUTER_TIMESTAMP' => $ts, 'HTTP_X_ROUTER_SIGNATURE' => Signature::header($signs, $ts, 'b'),
            ], 'b');
            return $controller($request);
        };
        $controller = fn (array $options) => $this->kernel(self::unique('q'), self::unique('q'), $options)->getContainer()->get(DeliveryController::class);

        $one = $controller(['signing_secret' => $old]);
        $this->assertSame(200, $send($one, [$old], 'o-1')->getStatusCode());
        $this->assertSame(200, $send($one, [$new, $old], 'o-2')->getStatusCode(), 'the router rotating: its second signature matches');
        $refused = $send($one, [$new], 'o-3');
        $this->assertSame([503, '5'], [$refused->getStatusCode(), $refused->headers->get('Retry-After')]);
        $this->assertStringContainsString('matches none of the 1 signing secret configured here', (string) $refused->getContent());

        // Both keys here (an unset previous one, from %env(default::...)%, would be null).
        $two = $controller(['signing_secret' => [$new, $old, null], 'unavailable_retry_after' => 2]);
        $this->assertSame(200, $send($two, [$old], 'o-4')->getStatusCode());
        $this->assertSame(200, $send($two, [$new], 'o-5')->getStatusCode());
        $refused = $send($two, [$other], 'o-6');
        $this->assertSame([503, '2'], [$refused->getStatusCode(), $refused->headers->get('Retry-After')]);
        $this->assertStringContainsString('matches none of the 2 signing secrets configured here (a secret rotation in progress?)', (string) $refused->getContent());

        // As the README configures it: environment variables, the previous one unset.
        $_SERVER['MR_TEST_SIGNING_SECRET'] = $new;
        unset($_SERVER['MR_TEST_SIGNING_SECRET_PREVIOUS'], $_ENV['MR_TEST_SIGNING_SECRET_PREVIOUS']);
        try {
            $env = $controller(['signing_secret' => ['%env(MR_TEST_SIGNING_SECRET)%', '%env(default::MR_TEST_SIGNING_SECRET_PREVIOUS)%']]);
            $this->assertSame(200, $send($env, [$new], 'o-7')->getStatusCode());
            $this->assertSame(503, $send($env, [$old], 'o-8')->getStatusCode());
        } finally {
            unset($_SERVER['MR_TEST_SIGNING_SECRET']);
        }
        $this->assertSame(['orders o-1', 'orders o-2', 'orders o-4', 'orders o-5', 'orders o-7'], file("$this->dir/handled.log", FILE_IGNORE_NEW_LINES));
    }
}
