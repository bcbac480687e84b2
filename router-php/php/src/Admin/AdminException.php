<?php

namespace MessageRouter\Admin;

/**
 * A call to the router's admin API that did not succeed: the API's own error (its
 * `{"error": "..."}` with the HTTP status), or no answer at all (`status()` null: the
 * listener is unreachable). The message never holds the admin token.
 */
final class AdminException extends \RuntimeException
{
    public function __construct(string $message, private ?int $status, private string $url)
    {
        parent::__construct($message);
    }

    /** The HTTP status of the answer; null when no answer came. */
    public function status(): ?int
    {
        return $this->status;
    }

    /** Whether the admin API could not be reached at all. */
    public function unreachable(): bool
    {
        return $this->status === null;
    }

    /** The URL called (without credentials). */
    public function url(): string
    {
        return $this->url;
    }
}
