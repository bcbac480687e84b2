<?php

namespace MessageRouter\Symfony\DependencyInjection;

use MessageRouter\Symfony\HandlerLocator;
use Symfony\Component\DependencyInjection\Compiler\CompilerPassInterface;
use Symfony\Component\DependencyInjection\Compiler\ServiceLocatorTagPass;
use Symfony\Component\DependencyInjection\ContainerBuilder;
use Symfony\Component\DependencyInjection\Exception\InvalidArgumentException;
use Symfony\Component\DependencyInjection\Reference;

/** Collects the services tagged `message_router.handler` into the HandlerLocator. */
final class HandlerPass implements CompilerPassInterface
{
    public const TAG = 'message_router.handler';

    public function process(ContainerBuilder $container): void
    {
        if (!$container->hasDefinition(HandlerLocator::class)) {
            return;
        }
        $refs = [];
        $routes = [];
        foreach ($container->findTaggedServiceIds(self::TAG) as $id => $tags) {
            foreach ($tags as $tag) {
                $route = $tag['route'] ?? null;
                if (!is_string($route) || $route === '') {
                    throw new InvalidArgumentException(sprintf('service "%s": the %s tag needs a route', $id, self::TAG));
                }
                if (isset($routes[$route])) {
                    throw new InvalidArgumentException("route \"$route\" has two handlers: \"{$routes[$route]}\" and \"$id\"");
                }
                $refs[$route] = new Reference($id);
                $routes[$route] = $container->getDefinition($id)->getClass() ?? $id;
            }
        }
        ksort($routes);
        $container->getDefinition(HandlerLocator::class)
            ->setArgument(0, ServiceLocatorTagPass::register($container, $refs))
            ->setArgument(1, $routes);
    }
}
