<?php

namespace MessageRouter\Symfony;

use MessageRouter\Handler;
use Psr\Container\ContainerInterface;

/** The handler services by route, created when first asked for. */
final class HandlerLocator
{
    /**
     * @param array<string, string> $routes route → service id
     * @param string $messengerHandler the name under which the app's Messenger bus is
     *        a handler (when the app has Messenger)
     */
    public function __construct(private ContainerInterface $services, private array $routes, private string $messengerHandler = 'messenger')
    {
    }

    public function messengerHandler(): string
    {
        return $this->messengerHandler;
    }

    /** @return list<string> */
    public function routes(): array
    {
        return array_keys($this->routes);
    }

    public function get(string $route): callable|Handler
    {
        return $this->services->get($route);
    }

    /** @return array<string, callable|Handler> every handler by route */
    public function all(): array
    {
        $all = [];
        foreach (array_keys($this->routes) as $route) {
            $all[$route] = $this->get($route);
        }
        return $all;
    }

    /** @return array<string, string> route → handler class (for debugging) */
    public function map(): array
    {
        return $this->routes;
    }
}
