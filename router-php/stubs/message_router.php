<?php

/**
 * The PHP API of the message_router extension (router-php), for IDEs and static
 * analysis. It doubles as the polyfill the composer package loads when the extension
 * is not (daemon mode, where handlers run behind the HTTP entry point): Message,
 * Handler, RetryLater and Reject work the same; Router needs the extension.
 *
 * php-tests/StubsTest.php checks by reflection that these signatures are exactly the
 * extension's.
 */

namespace MessageRouter;

/** A handler object: `Router::route()` takes these besides callables. */
interface Handler
{
    public function handle(Message $message): void;
}

/** One delivery as a handler sees it: read-only. */
class Message
{
    private string $id;
    private string $body;
    /** @var array<string, string> */
    private array $headers;
    private ?string $key;
    private ?string $contentType;
    private ?string $kind;
    private string $source;
    private string $route;
    private string $handler;
    private string $subscription;
    private int $attempt;
    private ?string $traceparent;

    /** @param array<string, string>|null $headers */
    public function __construct(
        string $body,
        ?array $headers = null,
        ?string $id = null,
        ?string $key = null,
        ?string $route = null,
        ?int $attempt = 1,
        ?string $source = null,
        ?string $subscription = null,
        ?string $handler = null,
        ?string $contentType = null,
        ?string $kind = null,
        ?string $traceparent = null
    ) {
        $this->body = $body;
        $this->headers = $headers ?? [];
        \ksort($this->headers, \SORT_STRING);
        $this->id = $id ?? '';
        $this->key = $key;
        $this->route = $route ?? '';
        $this->attempt = $attempt ?? 1;
        $this->source = $source ?? '';
        $this->subscription = $subscription ?? '';
        $this->handler = $handler ?? '';
        $this->contentType = $contentType;
        $this->kind = $kind;
        $this->traceparent = $traceparent;
    }

    /** The broker's message id (`message_id` / `ce_id`), or one the router made. */
    public function id(): string
    {
        return $this->id;
    }

    /** The payload, byte for byte (never assumed to be UTF-8 or JSON). */
    public function body(): string
    {
        return $this->body;
    }

    /** @return array<string, string> message headers (AMQP headers, Kafka headers, Redis fields) */
    public function headers(): array
    {
        return $this->headers;
    }

    public function header(string $name): ?string
    {
        return $this->headers[$name] ?? null;
    }

    /** The routing key (AMQP), the topic (Kafka), the stream (Redis). */
    public function key(): ?string
    {
        return $this->key;
    }

    public function contentType(): ?string
    {
        return $this->contentType;
    }

    /** The message type (AMQP `type`, a `type` header or field). */
    public function type(): ?string
    {
        return $this->kind;
    }

    /** Where it came from, without credentials (`amqp://host/vhost/queue`, ...). */
    public function source(): string
    {
        return $this->source;
    }

    public function route(): string
    {
        return $this->route;
    }

    public function handler(): string
    {
        return $this->handler;
    }

    public function subscription(): string
    {
        return $this->subscription;
    }

    /** 1 for the first delivery. */
    public function attempt(): int
    {
        return $this->attempt;
    }

    /**
     * W3C trace context to continue (PHP's OpenTelemetry SDK: TraceContextPropagator
     * over `['traceparent' => $m->traceparent()]`): the router's span of this attempt
     * when tracing is on, else the message's own `traceparent` header (any case).
     */
    public function traceparent(): ?string
    {
        if ($this->traceparent !== null) {
            return $this->traceparent;
        }
        foreach ($this->headers as $name => $value) {
            if (strcasecmp((string) $name, 'traceparent') === 0) {
                return $value;
            }
        }
        return null;
    }
}

/** Throw it to have the message retried after `$delay` seconds (0: the policy's backoff). */
class RetryLater extends \Exception
{
    private float $delay;

    public function __construct(?float $delay = 0.0, ?string $message = null)
    {
        $this->delay = $delay ?? 0.0;
        parent::__construct($message ?? \sprintf('retry in %ss', $this->delay));
    }

    /** Seconds to wait before the next attempt (0: the retry policy decides). */
    public function delay(): float
    {
        return $this->delay;
    }
}

/** Throw it to dead-letter the message now, with the reason (a poison message). */
class Reject extends \Exception
{
    public function __construct(?string $reason = null)
    {
        parent::__construct($reason ?? 'rejected');
    }

    /** Why the message is dead-lettered. */
    public function reason(): string
    {
        return $this->getMessage();
    }
}

/**
 * The in-process router: the daemon's config, PHP handlers, run(). Needs the
 * message_router extension (scripts/build-extension builds it).
 */
class Router
{
    /** @param string|array<string, mixed> $config a YAML file path, or an array of the same shape */
    public function __construct(mixed $config)
    {
        throw new \LogicException('MessageRouter\Router needs the message_router extension (scripts/build-extension builds it)');
    }

    /** Build from YAML text (`$name` names it in errors). */
    public static function fromYaml(string $yaml, ?string $name = null): Router
    {
        throw new \LogicException('MessageRouter\Router needs the message_router extension');
    }

    /** Handle the messages of route `$name` (or of every route of handler `$name`). */
    public function route(string $name, mixed $handler): void
    {
    }

    /**
     * The route names and handler names of the config: what route() takes.
     *
     * @return list<string>
     */
    public function names(): array
    {
        return [];
    }

    /**
     * Consume until a limit, SIGTERM/SIGINT or stop(); then drain and return
     * `['handled' => int, 'reason' => string]`. `subscriptions` (names) and `queues`
     * (AMQP queue names) consume only those subscriptions.
     *
     * @param array{limit?: int, time_limit?: int|float, memory_limit?: int|string, subscriptions?: list<string>, queues?: list<string>}|null $options
     * @return array{handled: int, reason: string}
     */
    public function run(?array $options = null): array
    {
        return ['handled' => 0, 'reason' => 'stop'];
    }

    /** Stop after the message in hand. */
    public function stop(): void
    {
    }

    /**
     * Load a new config (a YAML file path or an array; none: the file this router
     * was built from) and apply it as a diff: during run(), between two batches,
     * keeping what did not change running. SIGHUP during run() does the same with
     * the file. A bad config throws, and the running one stays.
     *
     * @param string|array<string, mixed>|null $config
     */
    public function reload(mixed $config = null): void
    {
    }
}
