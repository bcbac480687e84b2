<?php
// Shared by the bench orchestrators (run.php, messenger_app.php): one RabbitMQ channel
// for filling and deleting their queues.

function amqp(): AMQPChannel
{
    static $c, $ch;
    if (!$c) {
        $c = new AMQPConnection(['host' => '127.0.0.1', 'login' => 'guest', 'password' => 'guest']);
        $c->connect();
    }
    // A delete of something missing closes the channel: open another.
    if (!$ch || !$ch->isConnected()) {
        $ch = new AMQPChannel($c);
    }
    return $ch;
}
