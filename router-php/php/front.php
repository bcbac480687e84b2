<?php
// The HTTP entry point for apps without Symfony (php -S, PHP-FPM): point the daemon's
// handler endpoint at it. Handlers come from the file named by MESSAGE_ROUTER_HANDLERS,
// which returns an array route => handler (a callable or a MessageRouter\Handler).
// MESSAGE_ROUTER_SIGNING_SECRET, when set, must match the daemon's signing.secret;
// during a secret rotation MESSAGE_ROUTER_SIGNING_SECRET_PREVIOUS holds the other key
// (a request signed with either is accepted; README "Secret rotation").
// MESSAGE_ROUTER_RETRY_AFTER: the Retry-After (seconds, default 5) of the 503 for a
// route without handler here or a signature no secret matches.
//
//     MESSAGE_ROUTER_HANDLERS=config/handlers.php php -S 0.0.0.0:8080 vendor/message-router/message-router/router-php/php/front.php

$autoload = getenv('MESSAGE_ROUTER_AUTOLOAD') ?: __DIR__ . '/autoload.php';
require_once $autoload;
$file = getenv('MESSAGE_ROUTER_HANDLERS');
if (!$file || !is_file($file)) {
    http_response_code(500);
    echo "MESSAGE_ROUTER_HANDLERS must name a PHP file returning [route => handler]\n";
    return;
}
// Unset or empty variables name no secret.
$secrets = array_values(array_filter([
    getenv('MESSAGE_ROUTER_SIGNING_SECRET') ?: null,
    getenv('MESSAGE_ROUTER_SIGNING_SECRET_PREVIOUS') ?: null,
]));
$retryAfter = (int) (getenv('MESSAGE_ROUTER_RETRY_AFTER') ?: MessageRouter\Http\Dispatcher::RETRY_AFTER);
(new MessageRouter\Http\Dispatcher(require $file, $secrets ?: null, 300, max(1, $retryAfter)))->serveGlobals();
