<?php
// Loaded by composer's autoloader (composer.json "files"): without the message_router
// extension (daemon mode, where handlers run behind the HTTP entry point), the stubs
// file serves as the polyfill of Message, Handler, RetryLater and Reject, so one
// handler class works in both modes.
if (!extension_loaded('message_router')) {
    require_once __DIR__ . '/../stubs/message_router.php';
}
