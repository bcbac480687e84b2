<?php
// Shared by the PHP contenders of bench/php/run.php: Debian's Symfony autoloaders, and
// the record every contender writes when it is done: when it handled its first and
// last message, how many, its peak memory.

foreach ([
    '/usr/share/php/Symfony/Component/Messenger/autoload.php',
    '/usr/share/php/Symfony/Component/Messenger/Bridge/Amqp/autoload.php',
    '/usr/share/php/Symfony/Component/Messenger/Bridge/Redis/autoload.php',
    '/usr/share/php/Symfony/Component/Console/autoload.php',
    '/usr/share/php/Symfony/Component/EventDispatcher/autoload.php',
    '/usr/share/php/Symfony/Component/DependencyInjection/autoload.php',
] as $file) {
    if (is_file($file)) {
        require_once $file;
    }
}

/** The no-op handler's bookkeeping. */
final class Tally
{
    public static ?float $first = null;
    public static float $last = 0.0;
    public static int $n = 0;

    public static function hit(): void
    {
        $now = microtime(true);
        self::$first ??= $now;
        self::$last = $now;
        self::$n++;
    }

    public static function report(string $file): void
    {
        file_put_contents($file, json_encode([
            'first' => self::$first, 'last' => self::$last, 'handled' => self::$n,
            'peak_bytes' => memory_get_peak_usage(true),
        ]));
    }
}

/** A message for Messenger (its own serializer writes the body). */
final class Ping
{
    public function __construct(public int $n)
    {
    }
}
