<?php
// Handlers of the HTTP entry point in the tests (MESSAGE_ROUTER_HANDLERS): the same
// class the in-process worker runs.
require_once __DIR__ . '/BehaveHandler.php';

return ['work' => new MessageRouter\Tests\BehaveHandler((string) getenv('HANDLER_LOG'))];
