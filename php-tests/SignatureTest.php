<?php

namespace MessageRouter\Tests;

use MessageRouter\Http\Dispatcher;
use MessageRouter\Http\Signature;
use MessageRouter\Reject;
use PHPUnit\Framework\TestCase;

/**
 * The HTTP entry point without a daemon: signatures with several secrets and several
 * v1= signatures (a secret rotation), and the statuses Dispatcher answers.
 */
final class SignatureTest extends TestCase
{
    private const NEW = 'new-secret-0123456789';
    private const OLD = 'old-secret-0123456789';
    private const OTHER = 'someone-else-0123456789';
    private const NOW = 1700000000;

    /** Headers of a delivery signed with `$secrets` (current first) at `$ts`. */
    private static function signed(array $secrets, string $body, int $ts = self::NOW, array $more = []): array
    {
        return ['x-router-timestamp' => (string) $ts, 'x-router-signature' => Signature::header($secrets, (string) $ts, $body)] + $more;
    }

    public function testTheDaemonsSignatureFormat(): void
    {
        // Known answer, the same as router-daemon's contract.rs test.
        $this->assertSame('v1=d9a22bdcfdab07f3be7c84c30003fdc81a4c25420850e983eb235d7e17846231', Signature::sign('0123456789abcdef', '1700000000', '{"n":1}'));
        $this->assertSame(Signature::sign(self::NEW, '1', 'b'), Signature::header([self::NEW], '1', 'b'), 'one secret: one signature');
        $this->assertSame(Signature::sign(self::NEW, '1', 'b') . ', ' . Signature::sign(self::OLD, '1', 'b'), Signature::header([self::NEW, self::OLD], '1', 'b'));
    }

    public function testAnySignatureMatchingAnySecretIsAuthentic(): void
    {
        $body = '{"order":1}';
        $cases = [
            // [router signs with, endpoint knows, authentic]
            'one key, same' => [[self::NEW], [self::NEW], true],
            'one key, a string' => [[self::NEW], self::NEW, true],
            'router rotating, endpoint still old' => [[self::NEW, self::OLD], [self::OLD], true],
            'router rotating, endpoint already new' => [[self::NEW, self::OLD], [self::NEW], true],
            'router still old, endpoint rotating' => [[self::OLD], [self::NEW, self::OLD], true],
            'both rotating' => [[self::NEW, self::OLD], [self::NEW, self::OLD], true],
            'router new only, endpoint old only' => [[self::NEW], [self::OLD], false],
            'neither key' => [[self::NEW, self::OLD], [self::OTHER], false],
            'empty entries are skipped' => [[self::OLD], ['', self::OLD], true],
        ];
        foreach ($cases as $name => [$signs, $knows, $ok]) {
            $this->assertSame($ok, Signature::verify($knows, self::signed($signs, $body), $body, self::NOW, 300), $name);
        }
        // Order and spacing within the header do not matter; unknown schemes are skipped.
        $h = self::signed([self::OLD], $body);
        $h['x-router-signature'] = 'v0=abc,' . $h['x-router-signature'] . ' ,  v1=' . str_repeat('0', 64);
        $this->assertTrue(Signature::verify([self::OLD], $h, $body, self::NOW, 300));
    }

    public function testWhatIsNotAuthenticAndWhy(): void
    {
        $body = 'x';
        $problem = fn (array $h, array $knows = [self::NEW, self::OLD], int $now = self::NOW) => Signature::problem($knows, $h, $body, $now, 300);
        $this->assertNull($problem(self::signed([self::OLD], $body)));
        $this->assertStringContainsString('matches none of the 2 signing secrets configured here (a secret rotation in progress?)', $problem(self::signed([self::OTHER], $body)));
        $this->assertStringContainsString('matches none of the 1 signing secret configured here', $problem(self::signed([self::OTHER], $body), [self::NEW]));
        $this->assertStringContainsString('the request is not signed', $problem([]));
        $this->assertStringContainsString('x-router-timestamp is missing', $problem(['x-router-signature' => Signature::sign(self::NEW, '', $body)]));
        $this->assertStringContainsString('x-router-timestamp is 301s off', $problem(self::signed([self::NEW], $body), [self::NEW], self::NOW + 301));
        $this->assertNull($problem(self::signed([self::NEW], $body), [self::NEW], self::NOW + 300));
        $this->assertStringContainsString('holds no v1= signature', $problem(['x-router-timestamp' => (string) self::NOW, 'x-router-signature' => 'sha256=abc']));
        // A signature over another body or timestamp does not match.
        $this->assertNotNull($problem(self::signed([self::NEW], 'y')));
        $h = self::signed([self::NEW], $body);
        $h['x-router-timestamp'] = (string) (self::NOW - 1);
        $this->assertNotNull($problem($h));
        // No secret there: nothing is authentic (the Dispatcher does not check then).
        $this->assertFalse(Signature::verify([], self::signed([self::NEW], $body), $body, self::NOW, 300));
        // The reasons name no secret.
        foreach ([[self::OTHER], [self::NEW]] as $signs) {
            $why = (string) $problem(self::signed($signs, $body . 'z'));
            $this->assertStringNotContainsString('secret-0123456789', $why);
        }
    }

    public function testTheDispatcherAnswersNotHereYetWith503AndPoisonWith422(): void
    {
        $calls = [];
        $handlers = [
            'ok' => function ($m) use (&$calls) { $calls[] = $m->id(); },
            'poison' => fn () => throw new Reject('bad order'),
            'broken' => fn () => throw new \RuntimeException('boom'),
        ];
        $d = new Dispatcher($handlers, [self::NEW, null, '', self::OLD], 300, 3);
        $send = fn (string $route, array $signs, string $id = 'm-1') => $d->dispatch(
            self::signed($signs, 'b', time(), ['X-Router-Route' => $route, 'ce-id' => $id]), 'b');

        [$status, $headers, $text] = $send('ok', [self::OLD]);
        $this->assertSame([200, []], [$status, $headers]);
        $this->assertSame(['m-1'], $calls);
        $this->assertSame(200, $send('ok', [self::NEW, self::OLD], 'm-2')[0]);

        [$status, $headers, $text] = $send('ok', [self::OTHER], 'm-3');
        $this->assertSame([503, ['Retry-After' => '3']], [$status, $headers], 'a signature no secret matches: retried, not dead-lettered');
        $this->assertStringContainsString('signature not accepted: x-router-signature matches none of the 2 signing secrets', $text);
        [$status, $headers, $text] = $d->dispatch(['x-router-route' => 'ok', 'ce-id' => 'm-4'], 'b');
        $this->assertSame([503, ['Retry-After' => '3']], [$status, $headers], 'unsigned');
        $this->assertStringContainsString('not signed', $text);
        $this->assertSame(['m-1', 'm-2'], $calls, 'refused requests reach no handler');

        [$status, $headers, $text] = $send('later', [self::NEW], 'm-5');
        $this->assertSame([503, ['Retry-After' => '3']], [$status, $headers], 'no handler here: retried, not dead-lettered');
        $this->assertSame("no handler for route \"later\" (handler \"\") in this deployment (not deployed here yet?)\n", $text);

        $this->assertSame([422, [], "bad order\n"], $send('poison', [self::NEW]));
        [$status, , $text] = $send('broken', [self::NEW]);
        $this->assertSame(500, $status);
        $this->assertStringStartsWith('RuntimeException: boom', $text);

        // Without secrets nothing is checked; Retry-After defaults to a few seconds.
        [$status, $headers] = (new Dispatcher($handlers))->dispatch(['x-router-route' => 'nope'], 'b');
        $this->assertSame([503, ['Retry-After' => (string) Dispatcher::RETRY_AFTER]], [$status, $headers]);
        $this->assertSame(200, (new Dispatcher($handlers, null))->dispatch(['x-router-route' => 'ok'], 'b')[0]);
    }

    public function testASecretThatIsConfiguredButEmptyRefusesToServe(): void
    {
        $this->expectException(\InvalidArgumentException::class);
        $this->expectExceptionMessage('the signing secret is configured but empty');
        new Dispatcher([], ['', null]);
    }

    public function testASecretThatIsNotAStringIsRefused(): void
    {
        $this->expectException(\InvalidArgumentException::class);
        $this->expectExceptionMessage('a signing secret must be a string, not array');
        new Dispatcher([], [self::NEW, [self::OLD]]);
    }
}
