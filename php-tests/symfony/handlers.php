<?php

namespace MessageRouter\Tests\Symfony;

use MessageRouter\Attribute\AsRouteHandler;
use MessageRouter\Handler;
use MessageRouter\Message;

#[AsRouteHandler('orders')]
final class OrderHandler implements Handler
{
    public function __construct(private string $log)
    {
    }

    public function handle(Message $message): void
    {
        file_put_contents($this->log, "orders {$message->id()}\n", FILE_APPEND | LOCK_EX);
    }
}

/** Invokable, no interface: the bundle takes these too. */
#[AsRouteHandler('refunds')]
final class RefundHandler
{
    public function __construct(private string $log)
    {
    }

    public function __invoke(Message $message): void
    {
        file_put_contents($this->log, "refunds {$message->id()}\n", FILE_APPEND | LOCK_EX);
    }
}
