<?php

namespace MessageRouter\Tests;

use PHPUnit\Framework\TestCase;

/**
 * What a PHP team installs: the composer package (what `git archive` makes of the
 * repository, as Packagist does) and the extension through scripts/install-extension.
 */
final class PackageTest extends TestCase
{
    private const ROOT = __DIR__ . '/..';

    private string $dir;

    protected function setUp(): void
    {
        $this->dir = sys_get_temp_dir() . '/php-package-' . bin2hex(random_bytes(5));
        mkdir($this->dir);
    }

    protected function tearDown(): void
    {
        exec('rm -rf ' . escapeshellarg($this->dir));
    }

    /** Run `$cmd` (list form, no shell) in `$cwd`; its exit code and output. */
    private static function exec(array $cmd, ?string $cwd = null, ?array $env = null): array
    {
        $p = proc_open($cmd, [0 => ['file', '/dev/null', 'r'], 1 => ['pipe', 'w'], 2 => ['pipe', 'w']], $pipes, $cwd, $env);
        $out = stream_get_contents($pipes[1]) . stream_get_contents($pipes[2]);
        return [proc_close($p), $out];
    }

    public function testTheComposerPackageHoldsTheBridgeAndWorksWithoutTheRustSources(): void
    {
        [$code, $out] = self::exec(['composer', 'validate', '--strict', '--no-check-publish', '--no-check-lock'], self::ROOT);
        $this->assertSame(0, $code, "composer validate: $out");

        // The package is the archive of a commit: what .gitattributes leaves in.
        [$code, $out] = self::exec(['git', 'archive', '--format=tar', '-o', "$this->dir/package.tar", 'HEAD'], self::ROOT);
        $this->assertSame(0, $code, "git archive: $out");
        [$code, $list] = self::exec(['tar', '-tf', "$this->dir/package.tar"]);
        $this->assertSame(0, $code);
        $files = array_filter(explode("\n", $list), fn ($f) => $f !== '' && !str_ends_with($f, '/'));
        $this->assertContains('composer.json', $files);
        $this->assertContains('router-php/php/src/Http/Dispatcher.php', $files);
        $this->assertContains('router-php/php/src/Symfony/Messenger/MessengerHandler.php', $files);
        $this->assertContains('router-php/stubs/message_router.php', $files);
        $shipped = array_values(array_filter($files, fn ($f) => !str_starts_with($f, 'router-php/php/') && !str_starts_with($f, 'router-php/stubs/')));
        $this->assertEqualsCanonicalizing(['README.md', 'composer.json'], $shipped, 'no Rust sources, tests, benches or scripts in the package');

        // Unpacked on its own, composer's autoloader serves the bridge (the polyfill
        // standing in for the extension): a delivery dispatched to a handler.
        mkdir("$this->dir/app");
        [$code, $out] = self::exec(['tar', '-xf', "$this->dir/package.tar", '-C', "$this->dir/app"]);
        $this->assertSame(0, $code, $out);
        [$code, $out] = self::exec(['composer', 'dump-autoload', '--no-dev', '--no-interaction'], "$this->dir/app", ['PATH' => (string) getenv('PATH'), 'HOME' => $this->dir, 'COMPOSER_DISABLE_NETWORK' => '1']);
        $this->assertSame(0, $code, "composer dump-autoload: $out");
        $script = <<<'PHP'
require 'vendor/autoload.php';
$d = new MessageRouter\Http\Dispatcher(['orders' => function (MessageRouter\Message $m): void {
    echo 'handled ', $m->id(), ' ', $m->body(), "\n";
}]);
[$status] = $d->dispatch(['ce-id' => 'm-1', 'x-router-route' => 'orders'], '{"n":1}');
echo "status $status\n";
PHP;
        [$code, $out] = self::exec([PHP_BINARY, '-n', '-r', $script], "$this->dir/app");
        $this->assertSame(0, $code, $out);
        $this->assertSame("handled m-1 {\"n\":1}\nstatus 200\n", $out);
    }

    public function testTheExtensionInstallsWherePhpLoadsIt(): void
    {
        $so = (string) getenv('MESSAGE_ROUTER_EXTENSION');
        $this->assertFileExists($so, 'php-tests/run sets MESSAGE_ROUTER_EXTENSION to the build it tests');
        $env = ['PATH' => (string) getenv('PATH'), 'DESTDIR' => "$this->dir/stage"];
        [$code, $out] = self::exec([self::ROOT . '/scripts/install-extension', '--so', $so], null, $env);
        $this->assertSame(0, $code, $out);

        $extDir = "$this->dir/stage" . trim((string) shell_exec('php-config --extension-dir'));
        $iniDir = "$this->dir/stage" . trim((string) shell_exec('php-config --ini-dir'));
        $this->assertFileExists("$extDir/message_router.so");
        $this->assertStringContainsString('extension=message_router', (string) file_get_contents("$iniDir/20-message_router.ini"));

        // PHP as it starts with that ini dir and extension dir: the extension loads by
        // name and parses a config.
        $check = 'echo extension_loaded("message_router") ? "loaded" : "missing", " ", count((new MessageRouter\Router(["transports" => ["m" => ["type" => "memory"]], "handlers" => ["h" => ["timeout" => "5s"]], "subscriptions" => ["s" => ["transport" => "m", "queue" => "q", "default_handler" => "h"]]]))->names()), "\n";';
        [$code, $out] = self::exec([PHP_BINARY, '-d', "extension_dir=$extDir", '-r', $check], null, ['PATH' => (string) getenv('PATH'), 'PHP_INI_SCAN_DIR' => $iniDir]);
        $this->assertSame(0, $code, $out);
        $this->assertSame("loaded 1\n", $out);

        [$code, $out] = self::exec([self::ROOT . '/scripts/install-extension', '--uninstall'], null, $env);
        $this->assertSame(0, $code, $out);
        $this->assertFileDoesNotExist("$extDir/message_router.so");
        $this->assertFileDoesNotExist("$iniDir/20-message_router.ini");
    }
}
