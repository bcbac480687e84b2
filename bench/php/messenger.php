<?php
// Symfony Messenger's messenger:consume (ConsumeMessagesCommand, Debian's 5.4) on one
// transport, with a no-op handler:
//   php messenger.php fill amqp|redis NAME N       write N messages through Messenger's sender
//   php messenger.php consume amqp|redis NAME N OUT
//   php messenger.php idle amqp NAME SECONDS       consume for SECONDS (the memory bench)
require __DIR__ . '/common.php';

use Symfony\Component\Console\Input\ArrayInput;
use Symfony\Component\Console\Output\NullOutput;
use Symfony\Component\DependencyInjection\ServiceLocator;
use Symfony\Component\EventDispatcher\EventDispatcher;
use Symfony\Component\Messenger\Bridge\Amqp\Transport\AmqpTransport;
use Symfony\Component\Messenger\Bridge\Amqp\Transport\Connection as AmqpConnection;
use Symfony\Component\Messenger\Bridge\Redis\Transport\Connection as RedisConnection;
use Symfony\Component\Messenger\Bridge\Redis\Transport\RedisTransport;
use Symfony\Component\Messenger\Command\ConsumeMessagesCommand;
use Symfony\Component\Messenger\Envelope;
use Symfony\Component\Messenger\Handler\HandlersLocator;
use Symfony\Component\Messenger\MessageBus;
use Symfony\Component\Messenger\Middleware\HandleMessageMiddleware;
use Symfony\Component\Messenger\RoutableMessageBus;

[$_, $mode, $kind, $name] = $argv;
$transport = $kind === 'redis'
    ? new RedisTransport(RedisConnection::fromDsn("redis://127.0.0.1:6379/$name/$name-messenger/c1", ['auto_setup' => true, 'lazy' => false]))
    : new AmqpTransport(AmqpConnection::fromDsn('amqp://guest:guest@127.0.0.1:5672/%2f/' . $name, [
        'exchange' => ['name' => $name, 'type' => 'fanout'],
        'queues' => [$name => []],
        'prefetch_count' => 256,
    ]));

if ($mode === 'fill') {
    for ($i = 0, $n = (int) $argv[4]; $i < $n; $i++) {
        $transport->send(new Envelope(new Ping($i)));
    }
    exit(0);
}

$bus = new MessageBus([new HandleMessageMiddleware(new HandlersLocator([
    Ping::class => [static function (Ping $p): void {
        Tally::hit();
    }],
]))]);
$command = new ConsumeMessagesCommand(
    new RoutableMessageBus(new ServiceLocator([]), $bus),
    new ServiceLocator(['bench' => static fn () => $transport]),
    new EventDispatcher()
);
$args = $mode === 'idle'
    ? ['receivers' => ['bench'], '--time-limit' => $argv[4]]
    : ['receivers' => ['bench'], '--limit' => $argv[4]];
$command->run(new ArrayInput($args), new NullOutput());
if ($mode === 'consume') {
    Tally::report($argv[5]);
}
