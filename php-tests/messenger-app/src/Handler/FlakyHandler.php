<?php

namespace MessageRouter\Tests\MessengerApp\Handler;

use MessageRouter\Tests\MessengerApp\Logs;
use MessageRouter\Tests\MessengerApp\Message\Flaky;
use Symfony\Component\Messenger\Attribute\AsMessageHandler;
use Symfony\Component\Messenger\Exception\RecoverableMessageHandlingException;

#[AsMessageHandler]
final class FlakyHandler
{
    use Logs;

    public function __invoke(Flaky $flaky): void
    {
        if ($this->seen('flaky-failed', $flaky->id) < 2) {
            $this->note("flaky-failed {$flaky->id}");
            throw new RecoverableMessageHandlingException("warehouse busy for {$flaky->id}");
        }
        $this->note("flaky {$flaky->id}");
    }
}
