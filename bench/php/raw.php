<?php
// The raw PHP client loop, no framework: the limit of a PHP consumer.
//   php raw.php amqp QUEUE N OUT    php-amqp consume, ack each (prefetch 256)
//   php raw.php redis STREAM N OUT  phpredis XREADGROUP COUNT 256, one XACK per batch
require __DIR__ . '/common.php';

[$_, $kind, $name, $n, $out] = $argv;
$n = (int) $n;
if ($kind === 'amqp') {
    $conn = new AMQPConnection(['host' => '127.0.0.1', 'login' => 'guest', 'password' => 'guest']);
    $conn->connect();
    $ch = new AMQPChannel($conn);
    $ch->setPrefetchCount(256);
    $q = new AMQPQueue($ch);
    $q->setName($name);
    $q->consume(static function (AMQPEnvelope $e, AMQPQueue $q) use ($n): bool {
        Tally::hit();
        $q->ack($e->getDeliveryTag());
        return Tally::$n < $n;
    });
} else {
    $r = new Redis();
    $r->connect('127.0.0.1', 6379);
    $group = "$name-raw";
    while (Tally::$n < $n) {
        $got = $r->xReadGroup($group, 'raw', [$name => '>'], 256, 1000) ?: [];
        $ids = [];
        foreach ($got[$name] ?? [] as $id => $fields) {
            Tally::hit();
            $ids[] = $id;
        }
        if ($ids) {
            $r->xAck($name, $group, $ids);
        }
    }
}
Tally::report($out);
