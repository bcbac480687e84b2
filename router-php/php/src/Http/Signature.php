<?php

namespace MessageRouter\Http;

/**
 * The daemon's request signature: x-router-signature = "v1=" + hex(HMAC-SHA256(secret,
 * "<x-router-timestamp>.<body>")), the timestamp in Unix seconds.
 */
final class Signature
{
    public static function sign(string $secret, string $timestamp, string $body): string
    {
        return 'v1=' . hash_hmac('sha256', "$timestamp.$body", $secret);
    }

    /** @param array<string, string> $lowerHeaders */
    public static function verify(string $secret, array $lowerHeaders, string $body, int $now, int $maxAge): bool
    {
        $ts = $lowerHeaders['x-router-timestamp'] ?? '';
        $sig = $lowerHeaders['x-router-signature'] ?? '';
        if (preg_match('/^\d{1,12}$/', $ts) !== 1 || abs($now - (int) $ts) > $maxAge) {
            return false;
        }
        return hash_equals(self::sign($secret, $ts, $body), $sig);
    }
}
