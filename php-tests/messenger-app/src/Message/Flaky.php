<?php

namespace MessageRouter\Tests\MessengerApp\Message;

/** Fails with a recoverable error twice, then is handled. */
final class Flaky
{
    public function __construct(public string $id)
    {
    }
}
