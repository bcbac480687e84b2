<?php
// PHPUnit bootstrap: the extension must be loaded (php-tests/run writes the ini file
// that loads it), and the test helpers autoloaded.
if (!extension_loaded('message_router')) {
    fwrite(STDERR, "php-tests: the message_router extension is not loaded; run php-tests/run\n");
    exit(2);
}
foreach (['amqp', 'redis'] as $ext) {
    if (!extension_loaded($ext)) {
        fwrite(STDERR, "php-tests: the $ext extension is missing (scripts/setup installs php8.2-$ext)\n");
        exit(2);
    }
}
require_once '/usr/share/php/PHPUnit/Autoload.php';
require_once __DIR__ . '/src/WorkerTestCase.php';
require_once __DIR__ . '/handlers/BehaveHandler.php';
require_once __DIR__ . '/../router-php/php/autoload.php';
// Debian's Symfony 5.4 (php-symfony-*), and the test app.
require_once '/usr/share/php/Symfony/Bundle/FrameworkBundle/autoload.php';
require_once '/usr/share/php/Symfony/Component/Console/autoload.php';
require_once __DIR__ . '/symfony/handlers.php';
require_once __DIR__ . '/symfony/TestKernel.php';
require_once __DIR__ . '/symfony/MessengerImportKernel.php';
