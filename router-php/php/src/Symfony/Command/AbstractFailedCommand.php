<?php

namespace MessageRouter\Symfony\Command;

use MessageRouter\Admin\AdminClient;
use MessageRouter\Admin\AdminException;
use Symfony\Component\Console\Command\Command;
use Symfony\Component\Console\Formatter\OutputFormatter;
use Symfony\Component\Console\Input\InputArgument;
use Symfony\Component\Console\Input\InputInterface;
use Symfony\Component\Console\Input\InputOption;
use Symfony\Component\Console\Output\OutputInterface;
use Symfony\Component\Console\Style\SymfonyStyle;

/**
 * What the `message-router:failed:*` commands share: the daemon's admin API
 * (AdminClient), the subscription and filter options, the errors they print, and the
 * confirm-then-act of retry and remove.
 */
abstract class AbstractFailedCommand extends Command
{
    public function __construct(protected AdminClient $admin, string $name)
    {
        parent::__construct($name);
    }

    protected function addFilterOptions(string $what): static
    {
        return $this
            ->addOption('subscription', 's', InputOption::VALUE_REQUIRED, 'One subscription of the router (default: every one)')
            ->addOption('route', null, InputOption::VALUE_REQUIRED, "Only $what of this route")
            ->addOption('reason', null, InputOption::VALUE_REQUIRED, "Only $what whose reason matches this regular expression (or contains this text)");
    }

    /** The subscriptions to look at: --subscription, else every one the router has. */
    protected function subscriptions(InputInterface $input): array
    {
        $one = $input->getOption('subscription');
        if ($one !== null && $one !== '') {
            return [(string) $one];
        }
        return $this->admin->subscriptionNames();
    }

    protected function explicitSubscription(InputInterface $input): bool
    {
        return ((string) $input->getOption('subscription')) !== '';
    }

    /** --route and --reason as API filters. */
    protected function filter(InputInterface $input): array
    {
        return array_filter([
            'route' => $input->getOption('route'),
            'reason' => $input->getOption('reason'),
        ], static fn ($v) => $v !== null && $v !== '');
    }

    /** --max as a positive integer (null when not given and no default); throws \InvalidArgumentException. */
    protected function max(InputInterface $input): ?int
    {
        $v = $input->getOption('max');
        if ($v === null) {
            return null;
        }
        if (!ctype_digit((string) $v) || (int) $v <= 0) {
            throw new \InvalidArgumentException(sprintf('--max must be a positive integer, got "%s"', $v));
        }
        return (int) $v;
    }

    /** Print an API error (and what to do about it); the exit code 1. */
    protected function apiError(SymfonyStyle $io, AdminException $e, string $context = ''): int
    {
        $lines = [($context !== '' ? "$context: " : '') . $e->getMessage()];
        if ($e->unreachable()) {
            $lines[] = sprintf(
                'Is the router running with its admin listener at %s? The router listens on its `admin.listen`; '
                . 'set message_router.admin_url to it (default %s) in the bundle\'s config (config/packages/message_router.yaml).',
                $this->admin->url(),
                AdminClient::DEFAULT_URL
            );
        } elseif ($e->status() === 401) {
            $lines[] = $this->admin->hasToken()
                ? 'The configured message_router.admin_token is not the router\'s admin.token.'
                : 'The router has an admin.token: set message_router.admin_token to it (e.g. \'%env(ROUTER_ADMIN_TOKEN)%\').';
        } elseif ($e->status() === 403 && str_contains($e->getMessage(), 'loopback')) {
            $lines[] = 'Call from the router\'s host, or set admin.token on the router and message_router.admin_token here.';
        }
        $io->getErrorStyle()->error($lines);
        return Command::FAILURE;
    }

    protected function usageError(SymfonyStyle $io, string $message): int
    {
        $io->getErrorStyle()->error($message);
        return Command::INVALID;
    }

    /**
     * Text from the broker, fit for a console cell: control characters as escapes
     * (`$keepNewlines`: except line breaks), formatting tags escaped, and cut to
     * `$width` characters when given.
     */
    protected static function clean(?string $text, ?int $width = null, bool $keepNewlines = false): string
    {
        $text = (string) $text;
        if ($width !== null) {
            $text = (string) preg_replace('/\s+/u', ' ', $text);
            if (preg_match('/^.{' . $width . '}(?=.)/us', $text, $m)) {
                $text = rtrim((string) preg_replace('/.$/us', '', $m[0])) . '…';
            }
        }
        $pattern = $keepNewlines ? '/[\x00-\x09\x0B-\x1F\x7F]/' : '/[\x00-\x1F\x7F]/';
        $text = (string) preg_replace_callback($pattern, static fn (array $m) => sprintf('\\x%02x', ord($m[0])), $text);
        return OutputFormatter::escape($text);
    }

    // --- retry and remove ---

    protected function configureRework(string $verb): void
    {
        $this
            ->addArgument('id', InputArgument::IS_ARRAY | InputArgument::OPTIONAL, "Ids of the dead letters to $verb (as failed:show lists them)")
            ->addFilterOptions('dead letters')
            ->addOption('max', null, InputOption::VALUE_REQUIRED, "At most this many per subscription")
            ->addOption('all', null, InputOption::VALUE_NONE, "Every dead letter (of --subscription, or of every subscription)")
            ->addOption('force', 'f', InputOption::VALUE_NONE, 'Do not ask for confirmation');
    }

    /**
     * Count what the selection matches (a dry run), ask (unless --force; refused
     * without a terminal), then replay or purge it, subscription by subscription.
     *
     * @param 'replay'|'purge' $act
     */
    protected function rework(InputInterface $input, OutputInterface $output, string $act): int
    {
        [$verb, $done, $key] = $act === 'replay' ? ['replay', 'replayed', 'replayed'] : ['remove', 'removed', 'purged'];
        $io = new SymfonyStyle($input, $output);
        $ids = array_values(array_filter(array_map('strval', (array) $input->getArgument('id')), static fn (string $id) => $id !== ''));
        $filter = $this->filter($input);
        $all = (bool) $input->getOption('all');
        try {
            $max = $this->max($input);
        } catch (\InvalidArgumentException $e) {
            return $this->usageError($io, $e->getMessage());
        }
        if ($ids === [] && $filter === [] && !$all) {
            return $this->usageError($io, "Say which dead letters to $verb: their ids, --route, --reason, or --all.");
        }
        if ($ids !== [] && $all) {
            return $this->usageError($io, 'Give ids or --all, not both.');
        }
        $selection = ($ids !== [] ? ['ids' => $ids] : []) + $filter + ($all ? ['all' => true] : []) + ($max !== null ? ['limit' => $max] : []);
        $explicit = $this->explicitSubscription($input);

        try {
            $names = $this->subscriptions($input);
        } catch (AdminException $e) {
            return $this->apiError($io, $e);
        }
        // Counted first: nothing changes before the operator has seen how many.
        $matching = [];
        foreach ($names as $name) {
            try {
                $n = (int) ($this->call($act, $name, $selection, true)['matching'] ?? 0);
            } catch (AdminException $e) {
                // Every subscription: one with none of them is no error (the API's 404).
                if ($explicit || $e->status() !== 404 || str_starts_with($e->getMessage(), 'no subscription')) {
                    return $this->apiError($io, $e, $explicit ? '' : $name);
                }
                $n = 0;
            }
            if ($n > 0) {
                $matching[$name] = $n;
            }
        }
        $total = array_sum($matching);
        if ($total === 0) {
            $io->getErrorStyle()->error(sprintf('No dead letter matches in %s; nothing %s.', self::subscriptionsText($names), $done));
            return Command::FAILURE;
        }
        $io->text(sprintf('%d dead letter(s) to %s: %s.', $total, $verb, self::clean(self::perSubscription($matching))));
        if ($ids !== [] && $total < count($ids)) {
            $io->warning(sprintf('Only %d of the %d ids given were found.', $total, count($ids)));
        }
        if (!$input->getOption('force')) {
            if (!$input->isInteractive()) {
                $io->getErrorStyle()->error(sprintf('Not %s without confirmation: run again with --force (no terminal to ask on); nothing %s.', $act === 'replay' ? 'replaying' : 'removing', $done));
                return Command::FAILURE;
            }
            $question = $act === 'replay'
                ? sprintf('Replay these %d dead letter(s) to their source (queue, stream or topic)?', $total)
                : sprintf('Delete these %d dead letter(s) for good?', $total);
            if (!$io->confirm($question, false)) {
                $io->note("Nothing $done.");
                return Command::SUCCESS;
            }
        }

        $result = [];
        $failed = false;
        foreach ($matching as $name => $_) {
            try {
                $result[$name] = (int) ($this->call($act, $name, $selection, false)[$key] ?? 0);
            } catch (AdminException $e) {
                if ($e->status() === 404 && !str_starts_with($e->getMessage(), 'no subscription')) {
                    $result[$name] = 0; // gone since they were counted
                    continue;
                }
                $failed = true;
                $this->apiError($io, $e, $name);
                if ($e->unreachable()) {
                    break;
                }
            }
        }
        $count = array_sum($result);
        $summary = sprintf('%s %d dead letter(s)%s', ucfirst($done), $count, $result ? ' (' . self::perSubscription($result) . ')' : '');
        if ($failed) {
            $io->text(self::clean($summary) . '; see the error above.');
            return Command::FAILURE;
        }
        $io->success($summary . ($act === 'replay' ? ' to their source.' : '.'));
        return Command::SUCCESS;
    }

    private function call(string $act, string $name, array $selection, bool $dryRun): array
    {
        return $act === 'replay'
            ? $this->admin->replay($name, $selection, $dryRun)
            : $this->admin->purge($name, $selection, $dryRun);
    }

    /** `orders: 2, refunds: 1` */
    protected static function perSubscription(array $counts): string
    {
        $parts = [];
        foreach ($counts as $name => $n) {
            $parts[] = "$name: $n";
        }
        return implode(', ', $parts);
    }

    protected static function subscriptionsText(array $names): string
    {
        if ($names === []) {
            return 'no subscription (the router has none)';
        }
        return (count($names) === 1 ? 'subscription ' : 'subscriptions ') . implode(', ', array_map(static fn ($n) => '"' . $n . '"', $names));
    }
}
