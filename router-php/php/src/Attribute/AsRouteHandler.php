<?php

namespace MessageRouter\Attribute;

/**
 * Marks a handler class for the route it handles (a route name, or a handler name, of
 * the router's config). The Symfony bundle registers every service carrying it; the
 * class implements MessageRouter\Handler or is invokable.
 *
 *     #[AsRouteHandler('orders')]
 *     final class OrderHandler implements Handler { public function handle(Message $m): void { ... } }
 */
#[\Attribute(\Attribute::TARGET_CLASS | \Attribute::IS_REPEATABLE)]
final class AsRouteHandler
{
    public function __construct(public string $route)
    {
    }
}
