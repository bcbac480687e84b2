<?php

namespace MessageRouter\Admin;

/**
 * A client of the message-router daemon's admin API (`/api/...` on `admin.listen`),
 * through PHP's own HTTP stream wrapper: no HTTP library needed. Each call returns the
 * decoded JSON answer, or throws an AdminException with the API's error (its status
 * and `{"error": "..."}`) or saying the API could not be reached.
 *
 * With a token (the daemon's `admin.token`) every call carries `Authorization: Bearer
 * <token>`; the token appears in no message, exception or dump.
 */
final class AdminClient
{
    public const DEFAULT_URL = 'http://127.0.0.1:9090';

    /** Path segments of the dead-letter routes an id cannot take in the path. */
    private const RESERVED_IDS = ['stats', 'replay', 'purge', '.', '..'];

    private string $base;
    private ?string $token;

    public function __construct(
        string $url = self::DEFAULT_URL,
        #[\SensitiveParameter] ?string $token = null,
        private float $timeout = 120.0,
    ) {
        $this->base = rtrim($url, '/');
        $this->token = ($token === null || $token === '') ? null : $token;
    }

    /** The admin URL as configured, without any credentials it holds. */
    public function url(): string
    {
        return self::shown($this->base);
    }

    /** Whether a token is configured (never the token itself). */
    public function hasToken(): bool
    {
        return $this->token !== null;
    }

    /** Every subscription as GET /api/subscriptions shows it (`name`, `transport`, `state`, `depths` ...). */
    public function subscriptions(): array
    {
        return $this->request('GET', '/api/subscriptions')['subscriptions'] ?? [];
    }

    /** @return list<string> the subscription names */
    public function subscriptionNames(): array
    {
        return array_values(array_map(static fn (array $s): string => (string) $s['name'], $this->subscriptions()));
    }

    /**
     * Dead letters of `$subscription` matching `$filter` (`route`, `reason` a regular
     * expression, `since`, `until`, `id`), at most `$limit`: `dead_letters` (bodies cut
     * short) and `more` (whether more match).
     */
    public function deadLetters(string $subscription, array $filter = [], int $limit = 50): array
    {
        return $this->request('GET', self::letters($subscription), ['limit' => $limit] + $filter);
    }

    /** One dead letter whole (its body up to 64 KiB); an AdminException (404) if there is none. */
    public function deadLetter(string $subscription, string $id): array
    {
        if (!in_array($id, self::RESERVED_IDS, true)) {
            return $this->request('GET', self::letters($subscription) . '/' . rawurlencode($id));
        }
        // An id like "stats" would name another route: ask the list for it.
        $found = $this->deadLetters($subscription, ['id' => $id], 1)['dead_letters'] ?? [];
        if ($found === []) {
            $url = $this->base . self::letters($subscription) . '?id=' . rawurlencode($id);
            throw new AdminException(sprintf('no dead letter %s in subscription %s', json_encode($id), json_encode($subscription)), 404, self::shown($url));
        }
        return $found[0];
    }

    /** Counts by reason and route of the dead letters matching `$filter` (`count`, `by_reason`, `by_route`, `oldest`, `newest`). */
    public function stats(string $subscription, array $filter = []): array
    {
        return $this->request('GET', self::letters($subscription) . '/stats', $filter);
    }

    /**
     * Put the selected dead letters back on their source. `$selection`: `ids`, or
     * filters (`route`, `reason` ...), or `all: true`; optional `limit`. Returns
     * `replayed`, or with `$dryRun` `matching` (nothing changed). Nothing matching is
     * an AdminException (404).
     */
    public function replay(string $subscription, array $selection, bool $dryRun = false): array
    {
        return $this->request('POST', self::letters($subscription) . '/replay', [], $selection + ($dryRun ? ['dry_run' => true] : []));
    }

    /** Delete the selected dead letters, as replay() selects them: `purged` (or `matching`). */
    public function purge(string $subscription, array $selection, bool $dryRun = false): array
    {
        return $this->request('POST', self::letters($subscription) . '/purge', [], $selection + ($dryRun ? ['dry_run' => true] : []));
    }

    /**
     * One call: the decoded JSON answer of a 2xx.
     *
     * @param array<string, scalar|null> $query
     * @throws AdminException
     */
    public function request(string $method, string $path, array $query = [], ?array $body = null): array
    {
        $query = array_filter($query, static fn ($v) => $v !== null && $v !== '');
        $url = $this->base . $path . ($query ? '?' . http_build_query($query, '', '&', PHP_QUERY_RFC3986) : '');
        $shown = self::shown($url);
        if (!preg_match('#^https?://[^/]#i', $this->base)) {
            throw new AdminException(sprintf('the admin URL "%s" is not an http:// or https:// URL', self::shown($this->base)), null, $shown);
        }
        $headers = ['Accept: application/json', 'Connection: close'];
        if ($this->token !== null) {
            if (preg_match('/[\r\n]/', $this->token)) {
                throw new AdminException('the admin token holds a line break: it cannot be sent as a header', null, $shown);
            }
            $headers[] = 'Authorization: Bearer ' . $this->token;
        }
        $http = ['method' => $method, 'ignore_errors' => true, 'timeout' => $this->timeout, 'follow_location' => 0];
        if ($body !== null) {
            $headers[] = 'Content-Type: application/json';
            $http['content'] = json_encode((object) $body, JSON_UNESCAPED_SLASHES | JSON_THROW_ON_ERROR);
        }
        $http['header'] = implode("\r\n", $headers);
        $context = stream_context_create(['http' => $http]);

        $warnings = [];
        set_error_handler(static function (int $no, string $message) use (&$warnings): bool {
            $warnings[] = $message;
            return true;
        });
        try {
            $text = file_get_contents($url, false, $context);
        } finally {
            restore_error_handler();
        }
        // PHP 8.4 has a function for what 8.5 deprecates as a magic local variable.
        $responseHeaders = function_exists('http_get_last_response_headers')
            ? (http_get_last_response_headers() ?? [])
            : ($http_response_header ?? []);
        $status = null;
        foreach ($responseHeaders as $line) {
            if (preg_match('#^HTTP/\S+\s+(\d{3})#', $line, $m)) {
                $status = (int) $m[1];
            }
        }
        if ($status === null) {
            $why = $warnings ? preg_replace('/^file_get_contents\(.*?\): /', '', (string) end($warnings)) : 'no answer';
            throw new AdminException(sprintf('cannot reach the router\'s admin API at %s: %s', $shown, rtrim($why)), null, $shown);
        }
        $text = (string) $text;
        $json = json_decode($text, true);
        if ($status >= 300) {
            $message = is_array($json) && is_string($json['error'] ?? null)
                ? $json['error']
                : (trim($text) !== '' ? trim(substr($text, 0, 500)) : "HTTP $status");
            throw new AdminException($message, $status, $shown);
        }
        if (!is_array($json)) {
            throw new AdminException(sprintf('%s %s answered HTTP %d without JSON: is this the router\'s admin listener (admin.listen)?', $method, $shown, $status), $status, $shown);
        }
        return $json;
    }

    public function __debugInfo(): array
    {
        return ['url' => $this->url(), 'token' => $this->token === null ? null : '(set)', 'timeout' => $this->timeout];
    }

    private static function letters(string $subscription): string
    {
        return '/api/subscriptions/' . rawurlencode($subscription) . '/dead-letters';
    }

    /** `$url` without the user and password it may hold. */
    private static function shown(string $url): string
    {
        return (string) preg_replace('#^([a-z][a-z0-9+.-]*://)[^/@]*@#i', '$1', $url);
    }
}
