<?php
// For use without composer (tests, front.php): the polyfill and a PSR-4 loader of the
// bridge classes (MessageRouter\ → src/). Composer's autoloader does the same from
// composer.json.
require_once __DIR__ . '/bootstrap.php';
spl_autoload_register(static function (string $class): void {
    if (str_starts_with($class, 'MessageRouter\\')) {
        $file = __DIR__ . '/src/' . str_replace('\\', '/', substr($class, strlen('MessageRouter\\'))) . '.php';
        if (is_file($file)) {
            require $file;
        }
    }
});
