<?php

namespace MessageRouter\Symfony\Command;

use Symfony\Component\Console\Command\Command;
use Symfony\Component\Console\Input\InputInterface;
use Symfony\Component\Console\Input\InputOption;
use Symfony\Component\Console\Output\ConsoleOutputInterface;
use Symfony\Component\Console\Output\OutputInterface;

/**
 * `message-router:import-messenger`: writes the router.yaml that consumes what the
 * app's Symfony Messenger transports consume (MessengerImportPass collects them), with
 * a comment for every setting the router does not carry over as Messenger had it.
 *
 * The YAML is written by hand because the comments are the point (Yaml::dump has
 * none). Every string value is double-quoted with `$` doubled: the router expands
 * `${VAR}` in string values, and a password or queue name must stay what it was.
 */
final class ImportMessengerCommand extends Command
{
    public const NAME = 'message-router:import-messenger';

    /** Comments that need a person to decide start with this; the summary counts them. */
    private const REVIEW = 'REVIEW: ';
    /** Messenger's max_delay 0 (unbounded) becomes this: the router's longest retry queue. */
    private const UNBOUNDED_DELAY_MS = 24 * 3600 * 1000;
    private const DEFAULT_SERIALIZER = 'messenger.default_serializer';
    /** php-amqp's queue and exchange flag bits (constants of the amqp extension, which may be absent here). */
    private const AMQP_DURABLE = 2;
    private const AMQP_PASSIVE = 4;
    private const AMQP_EXCLUSIVE = 8;
    private const AMQP_AUTODELETE = 16;
    /** \Redis::SERIALIZER_PHP, Messenger's default (the redis extension may be absent here). */
    private const REDIS_SERIALIZER_PHP = 1;
    /** Messenger's AMQP queue arguments that it casts to integers (Connection::ARGUMENTS_AS_INTEGER). */
    private const INTEGER_ARGUMENTS = ['x-delay', 'x-expires', 'x-max-length', 'x-max-length-bytes', 'x-max-priority', 'x-message-ttl'];

    private int $reviews = 0;

    /**
     * @param array $messenger the app's Messenger setup, as MessengerImportPass collects it ([] without Messenger)
     * @param string $projectDir a relative --output is written here (where bin/console lives)
     */
    public function __construct(private array $messenger, private string $projectDir, private string $handler = 'messenger')
    {
        parent::__construct(self::NAME);
    }

    protected function configure(): void
    {
        $this
            ->setDescription('Write the router.yaml that consumes what the app\'s Symfony Messenger transports consume')
            ->addOption('output', 'o', InputOption::VALUE_REQUIRED, 'The file to write (relative: to the project directory); default: print it')
            ->addOption('handler', null, InputOption::VALUE_REQUIRED, 'The router handler that is the app\'s Messenger bus (default: message_router.messenger_handler)', $this->handler)
            ->addOption('endpoint', null, InputOption::VALUE_REQUIRED, 'Daemon mode: the URL of the app\'s DeliveryController route, written as that handler\'s endpoint (default: in process)')
            ->addOption('force', 'f', InputOption::VALUE_NONE, 'Overwrite the --output file if it exists')
            ->setHelp(<<<'HELP'
The <info>%command.name%</info> command reads the app's Messenger transports, retry strategies,
failure transport and routing (framework.messenger) and writes the equivalent router.yaml:

  <info>php %command.full_name% --output=config/router.yaml</info>
  <info>php %command.full_name% --endpoint=http://app:8080/_message-router</info>

AMQP and Redis transports become router transports and subscriptions (envelope: messenger),
handled by one handler (<info>--handler</info>, default "messenger"): the bundle hands its messages to
the app's Messenger bus. Settings without a router equivalent are kept as comments; the ones
that need a decision start with "REVIEW:". Routing stays in Messenger: producers keep
dispatching through their transports. An existing file is only replaced with <info>--force</info>.
HELP);
    }

    protected function execute(InputInterface $input, OutputInterface $output): int
    {
        $stderr = $output instanceof ConsoleOutputInterface ? $output->getErrorOutput() : $output;
        try {
            $handler = $this->handlerName($input);
            $endpoint = $this->endpoint($input);
            $file = $this->outputFile($input);
            if ($this->messenger === [] || ($this->messenger['transports'] ?? []) === []) {
                throw new \InvalidArgumentException('This app has no Symfony Messenger transports (framework.messenger.transports): nothing to import.');
            }
            $this->reviews = 0;
            [$yaml, $transports, $subscriptions] = $this->render($handler, $endpoint);
        } catch (\InvalidArgumentException $e) {
            $stderr->writeln('<error>' . $e->getMessage() . '</error>');
            return Command::FAILURE;
        }
        if ($file === null) {
            $output->write($yaml, false, OutputInterface::OUTPUT_RAW);
        } elseif (!$this->write($file, $yaml, $stderr)) {
            return Command::FAILURE;
        }
        $stderr->writeln(sprintf(
            'wrote %d transport%s, %d subscription%s to %s; %d setting%s need%s a look: see the comments',
            $transports, $transports === 1 ? '' : 's',
            $subscriptions, $subscriptions === 1 ? '' : 's',
            $file ?? 'stdout',
            $this->reviews, $this->reviews === 1 ? '' : 's', $this->reviews === 1 ? 's' : '',
        ));
        return Command::SUCCESS;
    }

    private function handlerName(InputInterface $input): string
    {
        $name = (string) $input->getOption('handler');
        if (!preg_match('/^[A-Za-z0-9_.-]+$/', $name)) {
            throw new \InvalidArgumentException(sprintf('--handler must be a name of letters, digits, "_", "." or "-", got "%s"', $name));
        }
        return $name;
    }

    private function endpoint(InputInterface $input): ?string
    {
        $url = $input->getOption('endpoint');
        if ($url === null) {
            return null;
        }
        $parts = parse_url((string) $url);
        if ($parts === false || !\in_array(strtolower($parts['scheme'] ?? ''), ['http', 'https'], true) || ($parts['host'] ?? '') === '') {
            throw new \InvalidArgumentException(sprintf('--endpoint must be an http:// or https:// URL (the app\'s DeliveryController route), got "%s"', $url));
        }
        return (string) $url;
    }

    /** The path to write, or null for stdout; refuses an existing file without --force. */
    private function outputFile(InputInterface $input): ?string
    {
        $file = $input->getOption('output');
        if ($file === null || $file === '') {
            return null;
        }
        $file = (string) $file;
        if (!str_starts_with($file, '/')) {
            $file = rtrim($this->projectDir, '/') . '/' . $file;
        }
        if (is_dir($file)) {
            throw new \InvalidArgumentException("--output $file is a directory");
        }
        if (file_exists($file) && !$input->getOption('force')) {
            throw new \InvalidArgumentException("$file exists: not overwritten (--force replaces it)");
        }
        return $file;
    }

    /** Write through a temporary file and a rename, so a failure leaves no half file. */
    private function write(string $file, string $yaml, OutputInterface $stderr): bool
    {
        $dir = \dirname($file);
        if (!is_dir($dir) && !@mkdir($dir, 0777, true) && !is_dir($dir)) {
            $stderr->writeln("<error>cannot create the directory $dir</error>");
            return false;
        }
        $tmp = @tempnam($dir, '.router-yaml-');
        if ($tmp === false || @file_put_contents($tmp, $yaml) !== \strlen($yaml) || !@chmod($tmp, 0644) || !@rename($tmp, $file)) {
            if ($tmp !== false) {
                @unlink($tmp);
            }
            $stderr->writeln("<error>cannot write $file: " . (error_get_last()['message'] ?? 'unknown error') . '</error>');
            return false;
        }
        return true;
    }

    /** @return array{string, int, int} the YAML, the number of transports and of subscriptions */
    private function render(string $handler, ?string $endpoint): array
    {
        $transportBlocks = [];
        $subscriptionBlocks = [];
        $notConsumed = [];
        foreach ($this->messenger['transports'] as $name => $t) {
            $name = (string) $name;
            $dsn = $t['dsn'];
            $scheme = \is_string($dsn) ? strtolower((string) strstr($dsn, '://', true)) : '';
            if ($t['is_failure_transport']) {
                $notConsumed[] = "$name ({$this->schemeLabel($scheme)}): the failure transport. Not consumed: the router dead-letters each subscription's"
                    . ' failures itself (see the subscriptions); messages already in it stay there for messenger:failed:*.';
                continue;
            }
            // A transport block and its subscriptions, or null and why the router does not consume it.
            [$transport, $subscriptionsOrWhy] = match (true) {
                $t['service'] !== null || !\is_string($dsn) => [null, $this->review(sprintf('a receiver service (%s) not built from a DSN: the router cannot consume it.', $t['service'] ?? $name))],
                $scheme === 'amqp' || $scheme === 'amqps' => $this->amqp($name, $dsn, $t),
                $scheme === 'redis' || $scheme === 'rediss' => $this->redis($name, $dsn, $t),
                $scheme === 'sync' => [null, 'sync://: handled in the dispatching process, nothing waits on a broker.'],
                $scheme === 'in-memory' => [null, 'in-memory://: a test transport that lives inside one PHP process.'],
                $scheme === 'doctrine' => [null, $this->review('doctrine://: the router has no database transport; keep messenger:consume for it.')],
                default => [null, $this->review(sprintf('%s: the router has no transport for it; keep messenger:consume for it.', $this->schemeLabel($scheme)))],
            };
            if ($transport === null) {
                $notConsumed[] = "$name: $subscriptionsOrWhy";
                continue;
            }
            $transportBlocks[] = $transport;
            foreach ($subscriptionsOrWhy as $subscription) {
                $subscriptionBlocks[] = $this->subscription($subscription, $handler, $t);
            }
        }
        if ($subscriptionBlocks === []) {
            throw new \InvalidArgumentException(sprintf(
                "None of the app's Messenger transports is one the router consumes (AMQP or Redis):\n  %s",
                implode("\n  ", $notConsumed),
            ));
        }

        $lines = [
            '# Imported from Symfony Messenger (framework.messenger) by `bin/console ' . self::NAME . '`.',
            '# Comments starting with "' . trim(self::REVIEW) . '" are settings the router does not carry over as Messenger had them.',
            '#',
            '# Routing stays in Messenger: producers keep dispatching through their transports.',
        ];
        foreach ($this->messenger['routing'] ?? [] as $message => $senders) {
            $lines[] = $this->comment(sprintf('  %s -> %s', $message, implode(', ', $senders)));
        }
        if ($notConsumed !== []) {
            $lines[] = '#';
            $lines[] = '# Messenger transports the router does not consume:';
            foreach ($notConsumed as $line) {
                $lines[] = $this->comment("  $line");
            }
        }
        $lines[] = '';
        $lines[] = 'transports:';
        foreach ($transportBlocks as $block) {
            array_push($lines, ...$this->indent($block, 2));
        }
        $lines[] = '';
        $lines[] = 'handlers:';
        $lines[] = '  # The app\'s Messenger bus: the bundle hands it every message of the subscriptions below.';
        $lines[] = '  ' . $this->key($handler) . ': ' . ($endpoint === null ? '{}' : $this->flow(['type' => 'http', 'endpoints' => [$endpoint]]));
        $lines[] = '';
        $lines[] = 'subscriptions:';
        foreach ($subscriptionBlocks as $block) {
            array_push($lines, ...$this->indent($block, 2));
        }
        return [implode("\n", $lines) . "\n", \count($transportBlocks), \count($subscriptionBlocks)];
    }

    /**
     * An AMQP transport: the connection, the topology Messenger's auto_setup declares,
     * and one subscription per queue.
     *
     * @return array{list<string>, list<array{name: string, lines: list<string>, dead_letter: string}>}
     */
    private function amqp(string $name, string $dsn, array $t): array
    {
        // As Connection::fromDsn: the DSN's path is /vhost/exchange; options, then the
        // query string, override what the DSN says; its user and password win.
        $params = parse_url($dsn);
        if ($params === false) {
            if (!\in_array($dsn, ['amqp://', 'amqps://'], true)) {
                throw new \InvalidArgumentException("transport \"$name\": its DSN is not a valid AMQP URL");
            }
            $params = [];
        }
        $tls = str_starts_with($dsn, 'amqps://');
        $path = isset($params['path']) ? explode('/', trim($params['path'], '/')) : [];
        parse_str($params['query'] ?? '', $query);
        $exchangeName = $path[1] ?? 'messages';
        $o = array_replace_recursive([
            'host' => $params['host'] ?? 'localhost',
            'port' => $params['port'] ?? ($tls ? 5671 : 5672),
            'vhost' => isset($path[0]) && $path[0] !== '' ? urldecode($path[0]) : '/',
            'exchange' => ['name' => $exchangeName],
        ], $t['options'], $query);
        $user = isset($params['user']) ? rawurldecode($params['user']) : ($o['login'] ?? $o['user'] ?? null);
        $pass = isset($params['pass']) ? rawurldecode($params['pass']) : ($o['password'] ?? null);
        $exchange = (array) $o['exchange'];
        $queues = isset($o['queues']) ? (array) $o['queues'] : [(string) $exchange['name'] => []];
        $autoSetup = filter_var($o['auto_setup'] ?? true, \FILTER_VALIDATE_BOOLEAN);

        $transport = [];
        $subscriptionExtra = [];
        $host = (string) $o['host'];
        $url = sprintf(
            '%s://%s%s:%d/%s',
            $tls ? 'amqps' : 'amqp',
            $user !== null ? rawurlencode((string) $user) . ($pass !== null ? ':' . rawurlencode((string) $pass) : '') . '@' : '',
            str_contains($host, ':') ? "[$host]" : $host,
            (int) $o['port'],
            rawurlencode((string) $o['vhost']),
        );
        $this->urlComments($transport, $t, $pass !== null);
        unset($o['host'], $o['port'], $o['vhost'], $o['exchange'], $o['queues'], $o['login'], $o['user'], $o['password'], $o['auto_setup']);
        if (isset($o['frame_max'])) {
            $url .= '?frame_max=' . (int) $o['frame_max'];
        }
        unset($o['frame_max']);
        $transport[] = 'type: amqp';
        $transport[] = 'url: ' . $this->scalar($url);
        if (isset($o['heartbeat']) && (int) $o['heartbeat'] > 0) {
            $transport[] = 'heartbeat: ' . $this->duration((int) $o['heartbeat'] * 1000);
        }
        unset($o['heartbeat']);
        if (isset($o['prefetch_count'])) {
            // Messenger 5.3+ ignores it; it still says how many messages the app meant to hold.
            $subscriptionExtra[] = 'prefetch: ' . max(1, (int) $o['prefetch_count']);
            unset($o['prefetch_count']);
        }
        $transport = array_merge($transport, $this->amqpOptionComments($o));
        if ($autoSetup) {
            array_push($transport, ...$this->topology($exchange, $queues));
        } else {
            $transport[] = '# auto_setup: false in Messenger: no topology written; the exchange and queues are declared elsewhere.';
        }

        $subscriptions = [];
        foreach (array_keys($queues) as $queue) {
            $subscriptions[] = [
                'name' => \count($queues) === 1 ? $name : "$name.$queue",
                'lines' => array_merge(['transport: ' . $this->scalar($name), 'queue: ' . $this->scalar((string) $queue)], $subscriptionExtra),
                'dead_letter' => "$queue.dlq",
            ];
        }
        return [[$this->key($name) . ':', ...$this->indent($transport, 2)], $subscriptions];
    }

    /** @return list<string> the comments for Messenger's connection options the router has no key for */
    private function amqpOptionComments(array $o): array
    {
        $lines = [];
        if (isset($o['delay'])) {
            $lines[] = '# delay (Messenger\'s delay exchange and queues): kept for producers that dispatch with a DelayStamp;'
                . ' those messages come back to the exchange when due, and the router consumes them. Router retries use their own <queue>.retry.* queues.';
            unset($o['delay']);
        }
        if (isset($o['persistent'])) {
            $lines[] = '# persistent: a PHP-FPM connection cache; the router keeps its connections open anyway.';
            unset($o['persistent']);
        }
        foreach (['read_timeout', 'write_timeout', 'connect_timeout', 'rpc_timeout', 'confirm_timeout'] as $key) {
            if (isset($o[$key])) {
                $lines[] = "# $key: the router's own timeouts apply (it always waits for publisher confirms of retries and dead letters).";
                unset($o[$key]);
            }
        }
        foreach (['cacert', 'cert', 'key', 'verify', 'sasl_method', 'channel_max'] as $key) {
            if (isset($o[$key])) {
                $lines[] = $this->comment($this->review("$key: not carried over (the router's URL takes TLS and credentials its own way); check the connection."));
                unset($o[$key]);
            }
        }
        foreach ($o as $key => $value) {
            $lines[] = $this->comment($this->review(sprintf('%s: %s: no router equivalent, not carried over.', $key, $this->shown((string) $key, $value))));
        }
        return $lines;
    }

    /**
     * The exchange, queues and bindings Messenger's auto_setup declares
     * (Connection::setupExchangeAndQueues), in the router's topology keys.
     *
     * @return list<string>
     */
    private function topology(array $exchange, array $queues): array
    {
        $name = (string) ($exchange['name'] ?? '');
        $type = (string) ($exchange['type'] ?? 'fanout');
        if (!\in_array($type, ['direct', 'topic', 'fanout', 'headers'], true)) {
            return [$this->comment($this->review("exchange \"$name\" of type \"$type\": the router declares only direct, topic, fanout and headers exchanges; no topology written, declare it as before."))];
        }
        $comments = [];
        $lines = ['topology:'];
        // The default exchange ("") and amq.* ones exist already; the router may not declare them.
        if ($name !== '' && !str_starts_with($name, 'amq.')) {
            $lines[] = '  exchanges:';
            $lines[] = '    - ' . $this->flow(['name' => $name, 'type' => $type, 'durable' => $this->durable($exchange, "exchange \"$name\"", $comments)]);
        }
        if (!empty($exchange['arguments'])) {
            $comments[] = $this->review("exchange \"$name\" arguments " . json_encode($exchange['arguments'], \JSON_UNESCAPED_SLASHES) . ': the router declares exchanges without arguments.');
        }
        if (isset($exchange['default_publish_routing_key'])) {
            $comments[] = "exchange \"$name\" default_publish_routing_key: producer side, stays in Messenger.";
        }
        $queueLines = [];
        $bindingLines = [];
        foreach ($queues as $queue => $q) {
            $queue = (string) $queue;
            $q = \is_array($q) ? $q : [];
            $decl = ['name' => $queue, 'durable' => $this->durable($q, "queue \"$queue\"", $comments)];
            $arguments = $this->queueArguments($queue, (array) ($q['arguments'] ?? []), $comments);
            if ($arguments !== []) {
                $decl['arguments'] = $arguments;
            }
            $queueLines[] = '    - ' . $this->flow($decl);
            if ($name === '') {
                continue; // the default exchange routes by queue name: nothing to bind
            }
            foreach ($q['binding_keys'] ?? [null] as $key) {
                $bindingLines[] = '    - ' . $this->flow(['queue' => $queue, 'exchange' => $name, 'routing_key' => (string) $key]);
            }
            if (!empty($q['binding_arguments'])) {
                $comments[] = $this->review("queue \"$queue\" binding_arguments " . json_encode($q['binding_arguments'], \JSON_UNESCAPED_SLASHES) . ': the router binds without arguments; a headers exchange needs this binding made by hand.');
            }
        }
        array_push($lines, '  queues:', ...$queueLines);
        if ($bindingLines !== []) {
            array_push($lines, '  bindings:', ...$bindingLines);
        }
        foreach ($comments as $comment) {
            $lines[] = '  ' . $this->comment($comment);
        }
        return $lines;
    }

    /** Whether Messenger's flags (default AMQP_DURABLE) make it durable; other flags get a comment. */
    private function durable(array $options, string $what, array &$comments): bool
    {
        $flags = (int) ($options['flags'] ?? self::AMQP_DURABLE);
        $other = array_keys(array_filter([
            'passive' => $flags & self::AMQP_PASSIVE,
            'exclusive' => $flags & self::AMQP_EXCLUSIVE,
            'auto_delete' => $flags & self::AMQP_AUTODELETE,
        ]));
        if ($other !== []) {
            $comments[] = $this->review("$what flags " . implode(', ', $other) . ': the router declares only durable or not.');
        }
        return ($flags & self::AMQP_DURABLE) !== 0;
    }

    /** @return array<string, bool|int|string> the arguments the router can declare; comments for the others */
    private function queueArguments(string $queue, array $arguments, array &$comments): array
    {
        $kept = [];
        foreach ($arguments as $key => $value) {
            if (\in_array($key, self::INTEGER_ARGUMENTS, true) && is_numeric($value)) {
                $value = (int) $value;
            }
            if (\is_bool($value) || \is_int($value) || \is_string($value)) {
                $kept[(string) $key] = $value;
            } else {
                $comments[] = $this->review("queue \"$queue\" argument $key " . json_encode($value) . ': the router takes booleans, integers and strings only; not declared.');
            }
        }
        return $kept;
    }

    /**
     * A Redis transport (one stream, one group) and its subscription.
     *
     * @return array{list<string>|null, list<array{name: string, lines: list<string>, dead_letter: string}>|string}
     *         the transport block and its subscription, or null and why the router cannot consume it
     */
    private function redis(string $name, string $dsn, array $t): array
    {
        if (str_contains($dsn, ',')) {
            return [null, $this->review('a Redis Cluster DSN (several hosts): the router reads one Redis server; keep messenger:consume or point it at one node.')];
        }
        $scheme = str_starts_with($dsn, 'rediss:') ? 'rediss' : 'redis';
        if (preg_match('#^' . $scheme . ':///#', $dsn)) {
            return [null, $this->review('a Redis unix socket DSN: the router connects over TCP; give it host:port.')];
        }
        $params = parse_url($dsn);
        if ($params === false || !isset($params['host'])) {
            throw new \InvalidArgumentException("transport \"$name\": its DSN is not a valid Redis URL");
        }
        // As Connection::fromDsn: the query string adds to the options; the path is /stream/group/consumer.
        $o = $t['options'];
        parse_str($params['query'] ?? '', $query);
        $o = array_merge($o, $query);
        $path = explode('/', rtrim($params['path'] ?? '', '/'));
        $stream = (string) ($path[1] ?? $o['stream'] ?? 'messages');
        $group = (string) ($path[2] ?? $o['group'] ?? 'symfony');
        $consumer = $path[3] ?? $o['consumer'] ?? null;
        if (filter_var($o['tls'] ?? false, \FILTER_VALIDATE_BOOLEAN)) {
            $scheme = 'rediss';
        }
        $user = isset($params['user']) && $params['user'] !== '' ? rawurldecode($params['user']) : null;
        $pass = isset($params['pass']) && $params['pass'] !== '' ? rawurldecode($params['pass']) : null;
        if (isset($o['auth'])) {
            [$user, $pass] = \is_array($o['auth']) ? [$o['auth'][0] ?? null, $o['auth'][1] ?? null] : [null, (string) $o['auth']];
        } elseif ($user !== null && $pass === null) {
            [$user, $pass] = [null, $user]; // phpredis: a lone user in the DSN is the password
        }
        $db = (int) ($o['dbindex'] ?? 0);
        $url = sprintf(
            '%s://%s%s:%d%s',
            $scheme,
            $pass !== null ? ($user !== null ? rawurlencode((string) $user) : '') . ':' . rawurlencode((string) $pass) . '@' : '',
            $params['host'],
            (int) ($params['port'] ?? 6379),
            $db !== 0 ? "/$db" : '',
        );
        $transport = [];
        $this->urlComments($transport, $t, $pass !== null);
        $transport[] = 'type: redis';
        $transport[] = 'url: ' . $this->scalar($url);
        $transport[] = $this->comment(sprintf(
            'consumer: %s: the router names its consumer itself (this key, default: the host name); stable across restarts, unique per instance.',
            $consumer === null ? 'Messenger\'s default "consumer"' : json_encode((string) $consumer),
        ));

        $subscription = ['transport: ' . $this->scalar($name), 'streams: [' . $this->scalar($stream) . ']', 'group: ' . $this->scalar($group)];
        $notes = ['delayed messages (Messenger\'s ' . $stream . '__queue): envelope: messenger moves them into the stream when due.'];
        if (isset($o['auto_setup']) && !filter_var($o['auto_setup'], \FILTER_VALIDATE_BOOLEAN)) {
            $subscription[] = 'declare: false';
        }
        if (isset($o['redeliver_timeout'])) {
            $subscription[] = 'claim_idle: ' . $this->duration(max(1, (int) $o['redeliver_timeout']) * 1000);
        } else {
            $notes[] = 'redeliver_timeout: Messenger claims a dead consumer\'s entries after 1h by default; the router after claim_idle (default 1m, above every handler timeout).';
        }
        if (isset($o['claim_interval'])) {
            $notes[] = 'claim_interval: the router looks for idle entries every claim_idle / 4.';
        }
        if (filter_var($o['delete_after_ack'] ?? false, \FILTER_VALIDATE_BOOLEAN)) {
            $notes[] = $this->review("delete_after_ack: the router acks (XACK) and never deletes entries; trim \"$stream\" another way (XTRIM, or stream_max_entries on the producers).");
        }
        if (isset($o['delete_after_reject'])) {
            $notes[] = "delete_after_reject: the router dead-letters rejected messages into \"$stream.dlq\" instead.";
        }
        if (isset($o['stream_max_entries'])) {
            $notes[] = 'stream_max_entries: producer side (XADD MAXLEN), stays in Messenger.';
        }
        if (isset($o['serializer']) && (int) $o['serializer'] !== self::REDIS_SERIALIZER_PHP) {
            $notes[] = $this->review('serializer: phpredis serializer ' . json_encode($o['serializer']) . '; envelope: messenger reads the default (PHP serialize).');
        }
        unset($o['stream'], $o['group'], $o['consumer'], $o['tls'], $o['auth'], $o['dbindex'], $o['auto_setup'], $o['redeliver_timeout'],
            $o['claim_interval'], $o['delete_after_ack'], $o['delete_after_reject'], $o['stream_max_entries'], $o['serializer'], $o['lazy']);
        foreach ($o as $key => $value) {
            $notes[] = $this->review(sprintf('%s: %s: no router equivalent, not carried over.', $key, $this->shown((string) $key, $value)));
        }
        foreach ($notes as $note) {
            $subscription[] = $this->comment($note);
        }
        return [
            [$this->key($name) . ':', ...$this->indent($transport, 2)],
            [['name' => $name, 'lines' => $subscription, 'dead_letter' => "$stream.dlq"]],
        ];
    }

    /** The comments on where a transport's URL came from; credentials in clear need a look. */
    private function urlComments(array &$lines, array $t, bool $hasPassword): void
    {
        $source = $t['env'] === [] ? 'the DSN' : 'the DSN of %env(' . implode(')%, %env(', $t['env']) . ')%, as it resolves here';
        if ($hasPassword) {
            $lines[] = $this->comment($this->review("url: from $source, password in clear; the router expands \${VAR} in values: write the secret as one."));
        } elseif ($t['env'] !== []) {
            $lines[] = $this->comment("url: from $source.");
        }
    }

    /**
     * A subscription: what the transport gave, plus what every one gets (the Messenger
     * envelope, the bus handler) and the retry, failure and serializer comments.
     *
     * @return list<string>
     */
    private function subscription(array $s, string $handler, array $t): array
    {
        $lines = array_merge($s['lines'], ['envelope: messenger', 'default_handler: ' . $this->scalar($handler)]);
        $retry = $t['retry'];
        if ($retry === null || isset($retry['service'])) {
            $lines[] = $this->comment($this->review(sprintf(
                'retry: %s; the router\'s default policy applies (5 attempts, 1s doubling up to 5m).',
                $retry === null ? 'Messenger retries nothing for it' : "a custom retry strategy service ({$retry['service']})",
            )));
        } else {
            array_push($lines, ...$this->retry($retry));
        }
        if ($t['failure_transport'] !== null) {
            $lines[] = $this->comment($this->review(sprintf(
                'failure_transport %s: the router dead-letters into "%s" instead; message-router:failed:show|retry|remove replace messenger:failed:*.',
                json_encode($t['failure_transport']),
                $s['dead_letter'],
            )));
        }
        if ($t['serializer'] !== self::DEFAULT_SERIALIZER) {
            $lines[] = $this->comment("serializer: \"{$t['serializer']}\" (not the default): the bundle decodes this transport's messages with it.");
        }
        return [$this->key($s['name']) . ':', ...$this->indent($lines, 2)];
    }

    /** @return list<string> Messenger's multiplier strategy as the router's retry policy */
    private function retry(array $r): array
    {
        $delay = max(0, (int) $r['delay']);
        $maxDelay = max(0, (int) $r['max_delay']);
        $lines = [];
        if ($maxDelay === 0) {
            $maxDelay = max(self::UNBOUNDED_DELAY_MS, $delay);
            $lines[] = $this->comment(sprintf('max_delay: Messenger\'s 0 has no bound; the router needs one: %s (its longest retry queue).', $this->duration($maxDelay)));
        }
        $policy = [
            'max_attempts' => max(0, (int) $r['max_retries']) + 1,
            // Messenger caps every delay at max_delay, the first one included.
            'initial_delay' => $this->duration(min($delay, $maxDelay)),
            'multiplier' => (float) $r['multiplier'],
            'max_delay' => $this->duration($maxDelay),
        ];
        array_unshift($lines, 'retry: ' . $this->flow($policy));
        $lines[] = '# retry jitter: the router spreads each delay by ±10 % (Messenger 5.4 has none); jitter: 0 turns it off.';
        return $lines;
    }

    private function duration(int $ms): string
    {
        foreach (['h' => 3_600_000, 'm' => 60_000, 's' => 1000] as $unit => $size) {
            if ($ms > 0 && $ms % $size === 0) {
                return intdiv($ms, $size) . $unit;
            }
        }
        return $ms === 0 ? '0s' : "{$ms}ms";
    }

    private function review(string $text): string
    {
        ++$this->reviews;
        return self::REVIEW . $text;
    }

    private function schemeLabel(string $scheme): string
    {
        return $scheme === '' ? 'a DSN without a scheme' : "$scheme://";
    }

    /** An option value for a comment; secrets are not shown. */
    private function shown(string $key, mixed $value): string
    {
        if (preg_match('/pass|secret|token|auth|cert|key$/i', $key)) {
            return '(value not shown)';
        }
        return (string) json_encode($value, \JSON_UNESCAPED_SLASHES | \JSON_UNESCAPED_UNICODE);
    }

    /** One comment line: the text on one line, without control characters. */
    private function comment(string $text): string
    {
        return '# ' . preg_replace('/[\x00-\x1f\x7f]+/', ' ', $text);
    }

    /** @return list<string> */
    private function indent(array $lines, int $by): array
    {
        return array_map(static fn (string $l): string => str_repeat(' ', $by) . $l, $lines);
    }

    /** A flow mapping (or sequence, for a list) of scalars and nested arrays. */
    private function flow(array $value): string
    {
        if (array_is_list($value)) {
            return '[' . implode(', ', array_map(fn ($v) => \is_array($v) ? $this->flow($v) : $this->scalar($v), $value)) . ']';
        }
        $items = [];
        foreach ($value as $k => $v) {
            $items[] = $this->key((string) $k) . ': ' . (\is_array($v) ? $this->flow($v) : $this->scalar($v));
        }
        return '{ ' . implode(', ', $items) . ' }';
    }

    /**
     * A scalar value. Strings are double-quoted (JSON's escapes are YAML's) with `$`
     * doubled, so the router's `${VAR}` expansion gives back the text as it was.
     */
    private function scalar(string|int|float|bool $value): string
    {
        return match (true) {
            \is_bool($value) => $value ? 'true' : 'false',
            \is_int($value) => (string) $value,
            \is_float($value) => floor($value) === $value && abs($value) < 1e15 ? (string) (int) $value : rtrim(sprintf('%.10F', $value), '0'),
            default => str_replace('$', '$$', (string) json_encode($value, \JSON_UNESCAPED_SLASHES | \JSON_UNESCAPED_UNICODE)),
        };
    }

    /** A mapping key: bare when plain YAML reads it back as the same string, else quoted. */
    private function key(string $key): string
    {
        $plain = preg_match('/^[A-Za-z_][A-Za-z0-9_.-]*$/', $key)
            && !\in_array(strtolower($key), ['true', 'false', 'null', 'yes', 'no', 'on', 'off', 'y', 'n'], true);
        return $plain ? $key : (string) json_encode($key, \JSON_UNESCAPED_SLASHES | \JSON_UNESCAPED_UNICODE);
    }
}
