<?php

namespace MessageRouter\Tests\MessengerApp\Message;

/** Handled at once. */
final class Ping
{
    public function __construct(public string $id, public int $sleepMs = 0)
    {
    }
}
