<?php

namespace MessageRouter\Http;

/**
 * The daemon's request signature: x-router-signature = "v1=" + hex(HMAC-SHA256(secret,
 * "<x-router-timestamp>.<body>")), the timestamp in Unix seconds.
 *
 * During a secret rotation the daemon (`signing.previous_secret`) sends one signature
 * per key, comma-separated: "v1=<with the new secret>, v1=<with the previous one>".
 * A request is authentic when any of its v1 signatures matches any secret this side
 * knows, so both sides can hold two keys while they change over.
 */
final class Signature
{
    public static function sign(string $secret, string $timestamp, string $body): string
    {
        return 'v1=' . hash_hmac('sha256', "$timestamp.$body", $secret);
    }

    /**
     * The header the daemon sends for `$secrets` (current first).
     *
     * @param list<string> $secrets
     */
    public static function header(array $secrets, string $timestamp, string $body): string
    {
        return implode(', ', array_map(fn (string $s) => self::sign($s, $timestamp, $body), $secrets));
    }

    /**
     * @param string|list<string> $secrets the keys this endpoint accepts
     * @param array<string, string> $lowerHeaders
     */
    public static function verify(string|array $secrets, array $lowerHeaders, string $body, int $now, int $maxAge): bool
    {
        return self::problem($secrets, $lowerHeaders, $body, $now, $maxAge) === null;
    }

    /**
     * Why the request is not authentic, or null when one of its signatures matches one
     * of `$secrets`. The text names no secret and no signature.
     *
     * @param string|list<string> $secrets
     * @param array<string, string> $lowerHeaders
     */
    public static function problem(string|array $secrets, array $lowerHeaders, string $body, int $now, int $maxAge): ?string
    {
        $secrets = array_values(array_filter((array) $secrets, fn ($s) => is_string($s) && $s !== ''));
        if ($secrets === []) {
            return 'no signing secret is configured here';
        }
        $ts = (string) ($lowerHeaders['x-router-timestamp'] ?? '');
        $header = (string) ($lowerHeaders['x-router-signature'] ?? '');
        if ($header === '' && $ts === '') {
            return 'the request is not signed (no x-router-signature), but a signing secret is configured';
        }
        if (preg_match('/^\d{1,12}$/', $ts) !== 1) {
            return 'x-router-timestamp is missing or not Unix seconds';
        }
        $skew = $now - (int) $ts;
        if (abs($skew) > $maxAge) {
            return "x-router-timestamp is {$skew}s off this server's clock (more than {$maxAge}s): a replay, or clocks out of sync";
        }
        $given = [];
        foreach (explode(',', $header) as $part) {
            $part = trim($part);
            if (str_starts_with($part, 'v1=')) {
                $given[] = $part;
            }
        }
        if ($given === []) {
            return 'x-router-signature holds no v1= signature';
        }
        foreach ($secrets as $secret) {
            $expected = self::sign($secret, $ts, $body);
            foreach ($given as $sig) {
                if (hash_equals($expected, $sig)) {
                    return null;
                }
            }
        }
        $n = count($secrets);
        return sprintf(
            'x-router-signature matches none of the %d signing secret%s configured here (a secret rotation in progress?)',
            $n,
            $n === 1 ? '' : 's',
        );
    }
}
