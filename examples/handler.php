<?php
// A PHP handler as the daemon sees it: one HTTP request per message.
// Run it with: php -S 127.0.0.1:8081 examples/handler.php
// The body is the message body; metadata arrives as CloudEvents `ce-*` headers and
// `x-router-*` headers (see README "HTTP contract").
$body = file_get_contents('php://input');
$order = json_decode($body, true);
$id = $_SERVER['HTTP_CE_ID'] ?? '?';
$attempt = $_SERVER['HTTP_X_ROUTER_ATTEMPT'] ?? '1';

if (!is_array($order) || !isset($order['order'])) {
    // A 4xx other than 408/429 means "poison": the router dead-letters it at once.
    http_response_code(422);
    error_log("handler: message $id rejected: not an order: $body");
    echo "not an order\n";
    return;
}
error_log(sprintf("handler: order %s handled (message %s, attempt %s, route %s)",
    $order['order'], $id, $attempt, $_SERVER['HTTP_X_ROUTER_ROUTE'] ?? '?'));
http_response_code(204);
