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
 *   Reject(reason)    → 422 with the reason (dead-letter now)
 *   other Throwable   → 500 with class and message (retried per policy, then dead-lettered)
 *   no handler        → 404 (dead-lettered: a misrouted message is poison here)
 *   bad signature     → 401 (dead-lettered; only with a secret)
 *
 * The same handler classes run in process under the extension: one class, both modes.
 * Framework-free; Symfony's DeliveryController and front.php wrap it.
 */
final class Dispatcher
{
    /** @var array<string, callable|Handler> */
    private array $handlers;

    /**
     * @param array<string, callable|Handler> $handlers by route name (x-router-route)
     *                                                  or handler name (x-router-handler)
     * @param string|null $secret the daemon's `signing.secret`: requests must carry its signature
     * @param int $maxAge seconds a signed request stays valid (replays)
     */
    public function __construct(array $handlers, private ?string $secret = null, private int $maxAge = 300)
    {
        $this->handlers = $handlers;
    }

    /**
     * @param array<string, string> $headers request headers (any case)
     * @return array{0: int, 1: array<string, string>, 2: string} status, headers, body
     */
    public function dispatch(array $headers, string $body, ?int $now = null): array
    {
        $h = array_change_key_case($headers, CASE_LOWER);
        if ($this->secret !== null && !Signature::verify($this->secret, $h, $body, $now ?? time(), $this->maxAge)) {
            return [401, [], "invalid or missing x-router-signature\n"];
        }
        $route = $h['x-router-route'] ?? '';
        $handlerName = $h['x-router-handler'] ?? '';
        $handler = $this->handlers[$route] ?? $this->handlers[$handlerName] ?? null;
        if ($handler === null) {
            return [404, [], "no handler for route \"$route\" (handler \"$handlerName\")\n"];
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
        $headers = [];
        foreach ($lowerHeaders as $name => $value) {
            if (str_starts_with($name, $prefix)) {
                $headers[substr($name, strlen($prefix))] = (string) $value;
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
