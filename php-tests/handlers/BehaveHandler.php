<?php

namespace MessageRouter\Tests;

use MessageRouter\Handler;
use MessageRouter\Message;
use MessageRouter\Reject;
use MessageRouter\RetryLater;

/**
 * The handler class of the tests, in both modes: in process (workers/worker.php) and
 * behind the HTTP entry point (handlers/routes.php under php -S, driven by the daemon).
 * It behaves per message header `behave`:
 *   ok (default)      return (ack)
 *   fail              throw RuntimeException("boom <id>")
 *   fail-until:N      throw RuntimeException until attempt N
 *   retry-later:S     throw RetryLater(S) on attempt 1
 *   reject            throw Reject("bad <id>")
 *   slow:MS           sleep MS milliseconds, then return
 *   exit              exit(3) the first time this message is seen (a marker directory
 *                     beside the log remembers it across workers: a classic RabbitMQ
 *                     queue redelivers with no delivery count)
 *   fatal             a fatal error the first time, likewise
 * Every call is appended to the log as a JSON line when it starts ("start") and when
 * it returns ("done").
 */
final class BehaveHandler implements Handler
{
    public function __construct(private string $log)
    {
    }

    public function handle(Message $m): void
    {
        $this->note('start', $m);
        [$mode, $arg] = array_pad(explode(':', $m->header('behave') ?? 'ok', 2), 2, '');
        switch ($mode) {
            case 'fail':
                throw new \RuntimeException('boom ' . $m->id());
            case 'fail-until':
                if ($m->attempt() < (int) $arg) {
                    throw new \RuntimeException('not yet ' . $m->id());
                }
                break;
            case 'retry-later':
                if ($m->attempt() === 1) {
                    throw new RetryLater((float) $arg, 'later ' . $m->id());
                }
                break;
            case 'reject':
                throw new Reject('bad ' . $m->id());
            case 'slow':
                usleep((int) $arg * 1000);
                break;
            case 'exit':
                if ($this->firstTime($m)) {
                    exit(3);
                }
                break;
            case 'fatal':
                if ($this->firstTime($m)) {
                    trigger_error('fatal on purpose', E_USER_ERROR);
                }
                break;
        }
        $this->note('done', $m);
    }

    private function firstTime(Message $m): bool
    {
        return @mkdir(dirname($this->log) . '/seen-' . sha1($m->id()));
    }

    private function note(string $event, Message $m): void
    {
        file_put_contents($this->log, json_encode([
            'event' => $event, 'id' => $m->id(), 'attempt' => $m->attempt(), 'time' => microtime(true),
            'route' => $m->route(), 'handler' => $m->handler(), 'subscription' => $m->subscription(),
            'source' => $m->source(), 'key' => $m->key(), 'body' => $m->body(), 'headers' => $m->headers(),
            'pid' => getmypid(), 'extension' => extension_loaded('message_router'),
            'traceparent' => $m->traceparent(),
        ]) . "\n", FILE_APPEND | LOCK_EX);
    }
}
