<?php

namespace MessageRouter\Symfony\Controller;

use MessageRouter\Http\Dispatcher;
use MessageRouter\Symfony\HandlerLocator;
use Symfony\Component\HttpFoundation\Request;
use Symfony\Component\HttpFoundation\Response;

/**
 * Daemon mode: the endpoint the message-router daemon delivers to (POST). Route it in
 * the app, e.g. `message_router: { path: /_message-router, controller: MessageRouter\Symfony\Controller\DeliveryController, methods: [POST] }`.
 */
final class DeliveryController
{
    public function __construct(private HandlerLocator $handlers, private ?string $secret = null)
    {
    }

    public function __invoke(Request $request): Response
    {
        $headers = [];
        foreach ($request->headers->all() as $name => $values) {
            $headers[$name] = (string) ($values[0] ?? '');
        }
        [$status, $out, $body] = (new Dispatcher($this->handlers->all(), $this->secret))->dispatch($headers, $request->getContent());
        return new Response($body, $status, $out + ['Content-Type' => 'text/plain; charset=utf-8']);
    }
}
