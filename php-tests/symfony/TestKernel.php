<?php

namespace MessageRouter\Tests\Symfony;

use MessageRouter\Symfony\MessageRouterBundle;
use Symfony\Bundle\FrameworkBundle\FrameworkBundle;
use Symfony\Component\Config\Loader\LoaderInterface;
use Symfony\Component\DependencyInjection\ContainerBuilder;
use Symfony\Component\HttpKernel\Kernel;

/** A minimal app: FrameworkBundle, the bridge's bundle, two attribute-marked handlers. */
final class TestKernel extends Kernel
{
    /** @param array<string, mixed> $options more `message_router:` config */
    public function __construct(private string $dir, private string $routerConfig, private array $options = [])
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
            $c->loadFromExtension('framework', ['secret' => 'test', 'test' => true, 'http_method_override' => false]);
            $c->loadFromExtension('message_router', ['config' => $this->routerConfig] + $this->options);
            foreach ([OrderHandler::class, RefundHandler::class] as $class) {
                $c->register($class, $class)->setAutowired(true)->setAutoconfigured(true)->setArgument('$log', $this->dir . '/handled.log');
            }
        });
    }

    public function getProjectDir(): string
    {
        return $this->dir;
    }

    public function getCacheDir(): string
    {
        // One container per configuration.
        return $this->dir . '/cache-' . md5(serialize($this->options));
    }

    public function getLogDir(): string
    {
        return $this->dir . '/log';
    }
}
