<?php

namespace MessageRouter\Tests\MessengerApp\Handler;

use MessageRouter\Tests\MessengerApp\Logs;
use MessageRouter\Tests\MessengerApp\Message\Poison;
use Symfony\Component\Messenger\Attribute\AsMessageHandler;
use Symfony\Component\Messenger\Exception\UnrecoverableMessageHandlingException;

#[AsMessageHandler]
final class PoisonHandler
{
    use Logs;

    public function __invoke(Poison $poison): void
    {
        $this->note("poison-failed {$poison->id}");
        throw new UnrecoverableMessageHandlingException("order {$poison->id} no longer exists");
    }
}
