<?php
// Handlers of the HTTP entry point in the tests (MESSAGE_ROUTER_HANDLERS): the same
// class the in-process worker runs, for each route named in HANDLER_ROUTES
// (comma-separated; default "work").
require_once __DIR__ . '/BehaveHandler.php';

$handler = new MessageRouter\Tests\BehaveHandler((string) getenv('HANDLER_LOG'));
return array_fill_keys(explode(',', getenv('HANDLER_ROUTES') ?: 'work'), $handler);
