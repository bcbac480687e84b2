<?php

namespace MessageRouter\Http;

use MessageRouter\Handler;
use MessageRouter\Message;
use MessageRouter\Reject;
use MessageRouter\RetryLater;

/**
 * The HTTP entry point of daemon mode: turns a delivery of the message-router daemon
 * (CloudEvents binary mode, README "HTTP contract") into a MessageRouter\Message, calls
 * the handler of its route, and answers with the status the daemon maps back:
 *
 *   return            → 200 (ack)
 *   RetryLater(delay) → 503 with Retry-After (retry after the delay; 0: the policy's)
 *   Reject(reason)    → 422 with the reason (dead-letter now: genuinely poison)
 *   other Throwable   → 500 with class and message (retried per policy, then dead-lettered)
 *   no handler        → 503 with Retry-After (a rolling deploy: the route's handler is
 *                       not on this instance yet; retried, never dead-lettered at once)
 *   bad signature     → 503 with Retry-After (only with secrets: no v1= signature of the
 *                       request matches a configured secret, or it is unsigned or stale;
 *                       a secret rotation in progress is retried, not dead-lettered)
 *
 * The same handler classes run in process under the extension: one class, both modes.
 * Framework-free; Symfony's DeliveryController and front.php wrap it.
 */
final class Dispatcher
{
    /** Default Retry-After (seconds) of the "not here yet" answers (no handler, no key). */
    public const RETRY_AFTER = 5;

    /** @var array<string, callable|Handler> */
    private array $handlers;

    /** @var list<string> */
    private array $secrets;

    /**
     * @param array<string, callable|Handler> $handlers by route name (x-router-route)
     *                                                  or handler name (x-router-handler)
     * @param string|list<string|null>|null $secrets the daemon's `signing.secret`, or
     *        several during a rotation (the new and the old one): requests must carry
     *        a signature made with one of them. Empty strings and nulls are skipped (an
     *        unset environment variable); null or []: requests are not checked; given
     *        but all empty: InvalidArgumentException (never serve unchecked by mistake).
     * @param int $maxAge seconds a signed request stays valid (replays)
     * @param int $retryAfter the Retry-After of the 503 for a missing handler or a
     *        signature no secret matches: with the route's max_attempts it bounds how
     *        long such a gap is survived before the message is dead-lettered
     */
    public function __construct(
        array $handlers,
        string|array|null $secrets = null,
        private int $maxAge = 300,
        private int $retryAfter = self::RETRY_AFTER,
    ) {
        $this->handlers = $handlers;
        foreach ((array) $secrets as $s) {
            if ($s !== null && !is_string($s)) {
                throw new \InvalidArgumentException('message-router: a signing secret must be a string, not ' . get_debug_type($s));
            }
        }
        $this->secrets = array_values(array_filter((array) $secrets, fn ($s) => $s !== null && $s !== ''));
        if ($secrets !== null && $secrets !== [] && $this->secrets === []) {
            // A secret was meant (e.g. '%env(ROUTER_SIGNING_SECRET)%') but is empty:
            // refuse to serve rather than accept anyone's requests.
            throw new \InvalidArgumentException('message-router: the signing secret is configured but empty');
        }
        if ($this->retryAfter < 1) {
            throw new \InvalidArgumentException('message-router: retryAfter must be at least 1 second');
        }
    }

    /**
     * @param array<string, string> $headers request headers (any case)
     * @return array{0: int, 1: array<string, string>, 2: string} status, headers, body
     */
    public function dispatch(array $headers, string $body, ?int $now = null): array
    {
        $h = array_change_key_case($headers, CASE_LOWER);
        $notYet = ['Retry-After' => (string) $this->retryAfter];
        if ($this->secrets !== []) {
            $problem = Signature::problem($this->secrets, $h, $body, $now ?? time(), $this->maxAge);
            if ($problem !== null) {
                return [503, $notYet, "signature not accepted: $problem\n"];
            }
        }
        $route = $h['x-router-route'] ?? '';
        $handlerName = $h['x-router-handler'] ?? '';
        $handler = $this->handlers[$route] ?? $this->handlers[$handlerName] ?? null;
        if ($handler === null) {
            return [503, $notYet, "no handler for route \"$route\" (handler \"$handlerName\") in this deployment (not deployed here yet?)\n"];
        }
        $message = self::message($h, $body);
        try {
            $handler instanceof Handler ? $handler->handle($message) : $handler($message);
            return [200, [], "ok\n"];
        } catch (RetryLater $e) {
            $delay = $e->delay();
            return [503, $delay > 0 ? ['Retry-After' => (string) (int) ceil($delay)] : [], $e->getMessage() . "\n"];
        } catch (Reject $e) {
            return [422, [], $e->getMessage() . "\n"];
        } catch (\Throwable $e) {
            return [500, [], get_class($e) . ': ' . $e->getMessage() . "\n" . $e->getTraceAsString() . "\n"];
        }
    }

    /** The message a delivery's headers and body describe. */
    public static function message(array $lowerHeaders, string $body): Message
    {
        $prefix = 'x-message-header-';
        // A name that is no HTTP token (Messenger's `X-Message-Stamp-App\Stamp`) comes
        // hex-encoded, exactly as the producer wrote it.
        $hexPrefix = 'x-message-hex-header-';
        $headers = [];
        foreach ($lowerHeaders as $name => $value) {
            if (str_starts_with($name, $prefix)) {
                $headers[substr($name, strlen($prefix))] = (string) $value;
            } elseif (str_starts_with($name, $hexPrefix)) {
                $decoded = @hex2bin(substr($name, strlen($hexPrefix)));
                if ($decoded !== false && $decoded !== '') {
                    $headers[$decoded] = (string) $value;
                }
            }
        }
        $h = fn (string $name) => isset($lowerHeaders[$name]) ? (string) $lowerHeaders[$name] : null;
        return new Message(
            $body,
            $headers,
            $h('ce-id'),
            $h('x-router-key'),
            $h('x-router-route'),
            (int) ($h('x-router-attempt') ?? 1),
            $h('ce-source'),
            $h('x-router-subscription'),
            $h('x-router-handler'),
            $h('content-type'),
            $h('ce-type'),
            // The router's attempt span when its tracing is on (else the producer's).
            $h('traceparent'),
        );
    }

    /**
     * Serve the current PHP request (php -S, PHP-FPM) and send the answer. A handler
     * that dies (a fatal error, exit()) before the answer gets a 500, never a 200:
     * the daemon retries the message instead of acking it.
     */
    public function serveGlobals(): void
    {
        $answered = false;
        ob_start();
        register_shutdown_function(static function () use (&$answered): void {
            if ($answered) {
                return;
            }
            $e = error_get_last();
            $why = $e !== null && ($e['type'] & (E_ERROR | E_PARSE | E_CORE_ERROR | E_COMPILE_ERROR | E_USER_ERROR | E_RECOVERABLE_ERROR))
                ? "fatal error: {$e['message']} in {$e['file']}:{$e['line']}"
                : 'the handler ended the request (exit) before answering';
            while (ob_get_level() > 0) {
                ob_end_clean();
            }
            if (!headers_sent()) {
                http_response_code(500);
                header('Content-Type: text/plain; charset=utf-8');
            }
            echo $why, "\n";
        });
        $headers = function_exists('getallheaders') ? (getallheaders() ?: []) : [];
        if (isset($_SERVER['CONTENT_TYPE'])) {
            $headers['content-type'] = $_SERVER['CONTENT_TYPE'];
        }
        [$status, $out, $text] = $this->dispatch($headers, (string) file_get_contents('php://input'));
        $answered = true;
        // What the handler printed is not part of the answer.
        while (ob_get_level() > 0) {
            ob_end_clean();
        }
        http_response_code($status);
        foreach ($out as $k => $v) {
            header("$k: $v");
        }
        header('Content-Type: text/plain; charset=utf-8');
        echo $text;
    }
}
