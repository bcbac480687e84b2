<?php

namespace MessageRouter\Tests\MessengerApp;

use MessageRouter\Symfony\Controller\DeliveryController;
use MessageRouter\Symfony\MessageRouterBundle;
use Symfony\Bundle\FrameworkBundle\FrameworkBundle;
use Symfony\Bundle\FrameworkBundle\Kernel\MicroKernelTrait;
use Symfony\Component\DependencyInjection\Loader\Configurator\ContainerConfigurator;
use Symfony\Component\HttpKernel\Kernel as BaseKernel;
use Symfony\Component\Routing\Loader\Configurator\RoutingConfigurator;

/**
 * An ordinary Symfony Messenger app: messages dispatched through its own AMQP or Redis
 * transport (`async`), `#[AsMessageHandler]` handlers, a failure transport. It knows
 * nothing of the router but for the bundle and the delivery route. Everything it
 * varies by comes from the environment (the test, bin/console and public/index.php
 * run it the same way):
 *
 *   APP_DIR              where it writes its cache and handled.log
 *   APP_TRANSPORT        amqp | redis
 *   APP_SERIALIZER       php (Messenger's default) | json (the Symfony Serializer)
 *   APP_DSN              the async transport's DSN (unique queue/stream per test)
 *   APP_FAILED_DSN       the failure transport's DSN
 *   ROUTER_CONFIG        router.yaml, for message-router:consume
 */
final class Kernel extends BaseKernel
{
    use MicroKernelTrait;

    public function registerBundles(): iterable
    {
        return [new FrameworkBundle(), new MessageRouterBundle()];
    }

    private function configureContainer(ContainerConfigurator $c): void
    {
        $transport = ['dsn' => '%env(APP_DSN)%'];
        if (getenv('APP_SERIALIZER') === 'json') {
            $transport['serializer'] = 'messenger.transport.symfony_serializer';
        }
        $c->extension('framework', [
            'secret' => 'messenger-app',
            'test' => true,
            'http_method_override' => false,
            'serializer' => ['enabled' => true],
            'messenger' => [
                'failure_transport' => 'failed',
                'transports' => [
                    'async' => $transport + ['retry_strategy' => ['max_retries' => 3, 'delay' => 100, 'multiplier' => 2]],
                    'failed' => ['dsn' => '%env(APP_FAILED_DSN)%'],
                ],
                'routing' => [
                    Message\Ping::class => 'async',
                    Message\Flaky::class => 'async',
                    Message\Poison::class => 'async',
                ],
            ],
        ]);
        $c->extension('message_router', ['config' => '%env(ROUTER_CONFIG)%']);
        $c->services()
            ->defaults()->autowire()->autoconfigure()
            ->bind('string $log', '%env(APP_DIR)%/handled.log')
            ->load(__NAMESPACE__ . '\\Handler\\', __DIR__ . '/Handler/');
    }

    private function configureRoutes(RoutingConfigurator $routes): void
    {
        $routes->add('message_router', '/_message-router')
            ->controller(DeliveryController::class)
            ->methods(['POST']);
    }

    public function getProjectDir(): string
    {
        return dirname(__DIR__);
    }

    public function getCacheDir(): string
    {
        // One container per transport kind and serializer: they change its wiring.
        return getenv('APP_DIR') . '/cache-' . getenv('APP_TRANSPORT') . '-' . getenv('APP_SERIALIZER');
    }

    public function getLogDir(): string
    {
        return getenv('APP_DIR') . '/log';
    }
}
