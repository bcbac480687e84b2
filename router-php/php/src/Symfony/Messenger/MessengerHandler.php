<?php

namespace MessageRouter\Symfony\Messenger;

use MessageRouter\Handler;
use MessageRouter\Message;
use MessageRouter\Reject;
use MessageRouter\RetryLater;
use Psr\Container\ContainerInterface;
use Symfony\Component\Messenger\Envelope;
use Symfony\Component\Messenger\Exception\HandlerFailedException;
use Symfony\Component\Messenger\Exception\RecoverableExceptionInterface;
use Symfony\Component\Messenger\Exception\UnrecoverableExceptionInterface;
use Symfony\Component\Messenger\MessageBusInterface;
use Symfony\Component\Messenger\Stamp\ConsumedByWorkerStamp;
use Symfony\Component\Messenger\Stamp\ReceivedStamp;
use Symfony\Component\Messenger\Stamp\RedeliveryStamp;
use Symfony\Component\Messenger\Stamp\TransportMessageIdStamp;
use Symfony\Component\Messenger\Transport\Serialization\SerializerInterface;

/**
 * The app's Symfony Messenger bus as a router handler: each message is a Messenger
 * envelope as Messenger's AMQP transport (body plus `type` and `X-Message-Stamp-*`
 * headers) or Redis transport (`{"body", "headers"}` JSON in the entry's `message`
 * field) wrote it. It is decoded with the serializer of the Messenger transport named
 * like the subscription (else the default serializer) and dispatched to the bus with
 * the stamps `messenger:consume` adds on receipt, so the app's own handlers and
 * middleware run and nothing sends it again. Outcomes, as Messenger's worker decides
 * them:
 *
 *   handled                                          → ack
 *   every handler exception unrecoverable            → Reject: dead-letter with the reason
 *   (UnrecoverableMessageHandlingException, …)
 *   a RecoverableMessageHandlingException, or any    → retry per the router's policy
 *   other exception
 *   MessageRouter\RetryLater / Reject from a handler → as they say
 *   an envelope that cannot be decoded               → Reject with the reason
 *
 * In process (message-router:consume) and behind the daemon (DeliveryController) alike.
 */
final class MessengerHandler implements Handler
{
    /**
     * @param ContainerInterface $serializers Messenger transport name → its serializer
     */
    public function __construct(
        private MessageBusInterface $bus,
        private ContainerInterface $serializers,
        private SerializerInterface $defaultSerializer,
    ) {
    }

    public function handle(Message $message): void
    {
        $transport = $this->transportOf($message->subscription());
        $stamps = [
            new ReceivedStamp($transport),
            new ConsumedByWorkerStamp(),
            new TransportMessageIdStamp($message->id()),
        ];
        if ($message->attempt() > 1) {
            // The router's attempt count, for handlers that look at retries.
            $stamps[] = new RedeliveryStamp($message->attempt() - 1);
        }
        $envelope = $this->decode($message, $transport)->with(...$stamps);
        try {
            $this->bus->dispatch($envelope);
        } catch (\Throwable $e) {
            throw self::outcome($e);
        }
    }

    /**
     * The Messenger transport a subscription stands for: the one of the same name, or
     * `<transport>` of a subscription named `<transport>.<queue>` (one per queue of a
     * multi-queue AMQP transport, as message-router:import-messenger names them).
     */
    private function transportOf(string $subscription): string
    {
        $name = $subscription;
        while (!$this->serializers->has($name)) {
            $dot = strrpos($name, '.');
            if ($dot === false) {
                return $subscription;
            }
            $name = substr($name, 0, $dot);
        }
        return $name;
    }

    private function decode(Message $message, string $transport): Envelope
    {
        $serializer = $this->serializers->has($transport) ? $this->serializers->get($transport) : $this->defaultSerializer;
        try {
            return $serializer->decode(self::encoded($message));
        } catch (\Throwable $e) {
            // Decoding is deterministic: another attempt would fail the same way.
            throw new Reject(sprintf('undecodable Messenger envelope (transport "%s"): %s: %s', $transport, get_class($e), $e->getMessage()));
        }
    }

    /**
     * The `['body' => …, 'headers' => […]]` Messenger's serializers decode. A Redis
     * entry's `message` field holds exactly that as JSON (PHP-serialized by phpredis,
     * unless the transport's `serializer` option turned that off); an AMQP message is
     * the body with the headers beside it (the router's own `x-router-*` ones do no
     * harm).
     *
     * @return array{body: string, headers: array<string, string>}
     */
    private static function encoded(Message $message): array
    {
        $body = (string) $message->body();
        $headers = $message->headers();
        if (!isset($headers['type'])) {
            // phpredis stores values PHP-serialized under Messenger's default Redis
            // option `serializer` (\Redis::SERIALIZER_PHP): a string, `s:N:"…";`.
            $json = $body;
            if (str_starts_with($body, 's:') && str_ends_with($body, '";')) {
                $unserialized = @unserialize($body, ['allowed_classes' => false]);
                $json = is_string($unserialized) ? $unserialized : $body;
            }
            $inner = str_starts_with($json, '{') ? json_decode($json, true) : null;
            if (is_array($inner) && is_string($inner['body'] ?? null) && is_array($inner['headers'] ?? null)) {
                return ['body' => $inner['body'], 'headers' => $inner['headers']];
            }
        }
        return ['body' => $body, 'headers' => $headers];
    }

    /** What the router should do after `$e`, decided as Messenger's worker does. */
    private static function outcome(\Throwable $e): \Throwable
    {
        $nested = $e instanceof HandlerFailedException ? array_values($e->getNestedExceptions()) : [$e];
        $unrecoverable = $nested !== [];
        foreach ($nested as $n) {
            if ($n instanceof RetryLater || ($n instanceof Reject && count($nested) === 1)) {
                return $n;
            }
            if ($n instanceof RecoverableExceptionInterface) {
                return new RetryLater(0, sprintf('%s: %s', get_class($n), $n->getMessage()));
            }
            $unrecoverable = $unrecoverable && ($n instanceof UnrecoverableExceptionInterface || $n instanceof Reject);
        }
        if ($unrecoverable) {
            return new Reject(implode('; ', array_map(
                static fn (\Throwable $n): string => sprintf('unrecoverable: %s: %s', get_class($n), $n->getMessage()),
                $nested,
            )));
        }
        return $e;
    }
}
