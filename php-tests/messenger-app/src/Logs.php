<?php

namespace MessageRouter\Tests\MessengerApp;

/** Appends "<event> <id>" lines to the app's handled.log (the tests read it). */
trait Logs
{
    public function __construct(private string $log)
    {
    }

    private function note(string $line): void
    {
        file_put_contents($this->log, "$line\n", FILE_APPEND | LOCK_EX);
    }

    /** How often `$event` was noted for `$id` before. */
    private function seen(string $event, string $id): int
    {
        $lines = is_file($this->log) ? file($this->log, FILE_IGNORE_NEW_LINES) : [];
        return count(array_keys($lines, "$event $id", true));
    }
}
