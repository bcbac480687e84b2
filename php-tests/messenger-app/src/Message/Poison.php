<?php

namespace MessageRouter\Tests\MessengerApp\Message;

/** Fails with an unrecoverable error, every time. */
final class Poison
{
    public function __construct(public string $id)
    {
    }
}
