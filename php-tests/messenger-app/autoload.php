<?php
// The app's autoloading without composer: Debian's Symfony 5.4, the bridge, the app.
require_once '/usr/share/php/Symfony/Bundle/FrameworkBundle/autoload.php';
require_once '/usr/share/php/Symfony/Component/Console/autoload.php';
require_once '/usr/share/php/Symfony/Component/Messenger/autoload.php';
require_once '/usr/share/php/Symfony/Component/Messenger/Bridge/Amqp/autoload.php';
require_once '/usr/share/php/Symfony/Component/Messenger/Bridge/Redis/autoload.php';
require_once '/usr/share/php/Symfony/Component/Serializer/autoload.php';
require_once '/usr/share/php/Symfony/Component/PropertyAccess/autoload.php';
require_once '/usr/share/php/Symfony/Component/Routing/autoload.php';
require_once __DIR__ . '/../../router-php/php/autoload.php';
spl_autoload_register(static function (string $class): void {
    $prefix = 'MessageRouter\\Tests\\MessengerApp\\';
    if (str_starts_with($class, $prefix)) {
        $file = __DIR__ . '/src/' . str_replace('\\', '/', substr($class, strlen($prefix))) . '.php';
        if (is_file($file)) {
            require $file;
        }
    }
});
