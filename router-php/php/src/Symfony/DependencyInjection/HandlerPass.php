<?php

namespace MessageRouter\Symfony\DependencyInjection;

use MessageRouter\Symfony\HandlerLocator;
use MessageRouter\Symfony\Messenger\MessengerHandler;
use Symfony\Component\DependencyInjection\Compiler\CompilerPassInterface;
use Symfony\Component\DependencyInjection\Compiler\ServiceLocatorTagPass;
use Symfony\Component\DependencyInjection\ContainerBuilder;
use Symfony\Component\DependencyInjection\Exception\InvalidArgumentException;
use Symfony\Component\DependencyInjection\Reference;

/**
 * Collects the services tagged `message_router.handler` into the HandlerLocator and,
 * when the app has Symfony Messenger, adds its bus as the handler named
 * `message_router.messenger_handler` (MessengerHandler).
 */
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
        $messenger = $container->getParameter('message_router.messenger_handler');
        // Messenger with transports to receive from: an app with sync transports
        // only has nothing for the router to consume (and no default serializer).
        if (!isset($refs[$messenger]) && $container->has('messenger.routable_message_bus') && $container->findTaggedServiceIds('messenger.receiver') !== []) {
            $refs[$messenger] = new Reference(self::registerMessenger($container));
            $routes[$messenger] = MessengerHandler::class;
        }
        ksort($routes);
        $container->getDefinition(HandlerLocator::class)
            ->setArgument(0, ServiceLocatorTagPass::register($container, $refs))
            ->setArgument(1, $routes);
    }

    /**
     * MessengerHandler on the app's routable bus (it picks the bus by BusNameStamp, as
     * `messenger:consume` does), with each Messenger transport's own serializer.
     */
    private static function registerMessenger(ContainerBuilder $container): string
    {
        $serializers = [];
        foreach ($container->findTaggedServiceIds('messenger.receiver') as $id => $tags) {
            // FrameworkBundle makes each transport from [dsn, options, serializer].
            $serializer = $container->getDefinition($id)->getArguments()[2] ?? null;
            foreach ($tags as $tag) {
                if (isset($tag['alias']) && $serializer instanceof Reference) {
                    $serializers[$tag['alias']] = $serializer;
                }
            }
        }
        $container->register(MessengerHandler::class, MessengerHandler::class)->setArguments([
            new Reference('messenger.routable_message_bus'),
            ServiceLocatorTagPass::register($container, $serializers),
            new Reference('messenger.default_serializer'),
        ]);
        return MessengerHandler::class;
    }
}
