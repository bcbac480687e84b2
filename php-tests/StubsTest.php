<?php

namespace MessageRouter\Tests;

use PHPUnit\Framework\TestCase;

/** router-php/stubs/message_router.php states exactly the extension's API. */
final class StubsTest extends TestCase
{
    public function testStubsMatchTheExtension(): void
    {
        $tool = escapeshellarg(__DIR__ . '/tools/api.php');
        $stubs = escapeshellarg(__DIR__ . '/../router-php/stubs/message_router.php');
        // The stubs are read by a PHP without extensions (-n), the extension's API by
        // this one (which has it loaded).
        $fromStubs = shell_exec(escapeshellarg(PHP_BINARY) . " -n $tool stubs $stubs");
        $fromExtension = shell_exec(escapeshellarg(PHP_BINARY) . " $tool ext");
        $this->assertNotEmpty($fromExtension);
        $this->assertStringNotContainsString('"missing"', $fromExtension);
        $this->assertSame($fromExtension, $fromStubs, 'router-php/stubs/message_router.php is out of date');
    }
}
