<?php

namespace MessageRouter\Tests\MessengerApp\Handler;

use MessageRouter\Tests\MessengerApp\Logs;
use MessageRouter\Tests\MessengerApp\Message\Ping;
use Symfony\Component\Messenger\Attribute\AsMessageHandler;

#[AsMessageHandler]
final class PingHandler
{
    use Logs;

    public function __invoke(Ping $ping): void
    {
        if ($ping->sleepMs > 0) {
            usleep($ping->sleepMs * 1000);
        }
        $this->note("ping {$ping->id}");
    }
}
