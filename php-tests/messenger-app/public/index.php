<?php
// The app's front controller (php -S): the daemon delivers to /_message-router.
require __DIR__ . '/../autoload.php';

use MessageRouter\Tests\MessengerApp\Kernel;
use Symfony\Component\HttpFoundation\Request;

$kernel = new Kernel('prod', false);
$request = Request::createFromGlobals();
$response = $kernel->handle($request);
$response->send();
$kernel->terminate($request, $response);
