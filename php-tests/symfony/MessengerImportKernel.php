<?php

namespace MessageRouter\Tests\Symfony;

use MessageRouter\Symfony\MessageRouterBundle;
use Symfony\Bundle\FrameworkBundle\FrameworkBundle;
use Symfony\Component\Config\Loader\LoaderInterface;
use Symfony\Component\DependencyInjection\ContainerBuilder;
use Symfony\Component\HttpKernel\Kernel;
use Symfony\Component\Messenger\Retry\MultiplierRetryStrategy;
use Symfony\Component\Messenger\Transport\Serialization\PhpSerializer;

/** Messages routed by MessengerImportKernel's framework.messenger.routing. */
final class ImportedOrder
{
}

final class ImportedEvent
{
}

/**
 * An app with Symfony Messenger (framework.messenger as given) and the bridge's bundle,
 * for `message-router:import-messenger`. The Messenger component is loaded by the test
 * (ImportMessengerTest, in its own process): loaded here, FrameworkBundle would turn
 * Messenger on in every other test kernel of the run.
 */
final class MessengerImportKernel extends Kernel
{
    /** @param array<string, mixed> $messenger framework.messenger */
    public function __construct(private string $dir, private array $messenger)
    {
        parent::__construct('test', true);
    }

    public function registerBundles(): iterable
    {
        return [new FrameworkBundle(), new MessageRouterBundle()];
    }

    public function registerContainerConfiguration(LoaderInterface $loader): void
    {
        $loader->load(function (ContainerBuilder $c): void {
            $c->loadFromExtension('framework', [
                'secret' => 'test',
                'test' => true,
                'http_method_override' => false,
                'messenger' => $this->messenger + ['reset_on_message' => true],
            ]);
            $c->loadFromExtension('message_router', ['config' => $this->dir . '/router.yaml']);
            // A custom retry strategy and serializer, for the comments that say so.
            $c->register('app.retry', MultiplierRetryStrategy::class)->setArguments([7]);
            $c->register('app.serializer', PhpSerializer::class);
        });
    }

    public function getProjectDir(): string
    {
        return $this->dir;
    }

    public function getCacheDir(): string
    {
        return $this->dir . '/cache-' . md5(serialize($this->messenger));
    }

    public function getLogDir(): string
    {
        return $this->dir . '/log';
    }
}
