<?php

namespace MessageRouter\Symfony\Controller;

use MessageRouter\Http\Dispatcher;
use MessageRouter\Symfony\HandlerLocator;
use Symfony\Component\HttpFoundation\Request;
use Symfony\Component\HttpFoundation\Response;

/**
 * Daemon mode: the endpoint the message-router daemon delivers to (POST). Route it in
 * the app, e.g. `message_router: { path: /_message-router, controller: MessageRouter\Symfony\Controller\DeliveryController, methods: [POST] }`.
 * Answers as Dispatcher does: a route without a handler here, or a signature none of
 * `$secrets` matches, gets 503 with Retry-After (retried by the daemon, not dead-lettered).
 */
final class DeliveryController
{
    /**
     * @param string|list<string|null>|null $secrets `message_router.signing_secret`: one
     *        secret, or the new and the old one during a rotation
     */
    public function __construct(
        private HandlerLocator $handlers,
        private string|array|null $secrets = null,
        private int $retryAfter = Dispatcher::RETRY_AFTER,
    ) {
    }

    public function __invoke(Request $request): Response
    {
        $headers = [];
        foreach ($request->headers->all() as $name => $values) {
            $headers[$name] = (string) ($values[0] ?? '');
        }
        [$status, $out, $body] = (new Dispatcher($this->handlers->all(), $this->secrets, 300, $this->retryAfter))->dispatch($headers, $request->getContent());
        return new Response($body, $status, $out + ['Content-Type' => 'text/plain; charset=utf-8']);
    }
}
