<?php

namespace MessageRouter\Symfony\Command;

use MessageRouter\Admin\AdminClient;
use MessageRouter\Admin\AdminException;
use Symfony\Component\Console\Command\Command;
use Symfony\Component\Console\Input\InputArgument;
use Symfony\Component\Console\Input\InputInterface;
use Symfony\Component\Console\Input\InputOption;
use Symfony\Component\Console\Output\OutputInterface;
use Symfony\Component\Console\Style\SymfonyStyle;

/**
 * `message-router:failed:show`: the router's dead letters through its admin API, as
 * messenger:failed:show shows failed messages: a table, counts (--stats), or one whole.
 */
final class FailedShowCommand extends AbstractFailedCommand
{
    public const NAME = 'message-router:failed:show';

    public function __construct(AdminClient $admin)
    {
        parent::__construct($admin, self::NAME);
    }

    protected function configure(): void
    {
        $this
            ->setDescription('Show dead letters of the router (through its admin API)')
            ->addArgument('id', InputArgument::OPTIONAL, 'The dead letter to show whole')
            ->addFilterOptions('dead letters')
            ->addOption('stats', null, InputOption::VALUE_NONE, 'Counts by reason and by route')
            ->addOption('max', null, InputOption::VALUE_REQUIRED, 'At most this many per subscription', '50')
            ->setHelp(<<<'HELP'
The <info>%command.name%</info> command shows the dead letters of the router's subscriptions:

  <info>php %command.full_name%</info>                         every subscription, 50 of each
  <info>php %command.full_name% --subscription=orders --route=orders --reason='HTTP 422' --max=10</info>
  <info>php %command.full_name% --stats</info>                 counts by reason and by route
  <info>php %command.full_name% ID [--subscription=orders]</info>  one whole: headers, origin, body

Ids: the message id on RabbitMQ, <stream>/<entry id> on Redis, <topic>/<partition>/<offset> on Kafka.
HELP);
    }

    protected function execute(InputInterface $input, OutputInterface $output): int
    {
        $io = new SymfonyStyle($input, $output);
        try {
            $max = $this->max($input) ?? 50;
        } catch (\InvalidArgumentException $e) {
            return $this->usageError($io, $e->getMessage());
        }
        $id = (string) $input->getArgument('id');
        try {
            $names = $this->subscriptions($input);
            if ($names === []) {
                $io->note('The router has no subscriptions.');
                return Command::SUCCESS;
            }
            if ($id !== '') {
                return $this->showOne($io, $names, $id, $this->explicitSubscription($input));
            }
            if ($input->getOption('stats')) {
                return $this->showStats($io, $names, $this->filter($input), $this->explicitSubscription($input));
            }
            return $this->showList($io, $names, $this->filter($input), $max, $this->explicitSubscription($input));
        } catch (AdminException $e) {
            return $this->apiError($io, $e);
        }
    }

    private function showList(SymfonyStyle $io, array $names, array $filter, int $max, bool $explicit): int
    {
        $total = 0;
        foreach ($names as $name) {
            $answer = $this->admin->deadLetters($name, $filter, $max);
            $letters = $answer['dead_letters'] ?? [];
            if ($letters === [] && !$explicit) {
                continue;
            }
            $io->section(sprintf('Subscription %s', self::clean($name)));
            if ($letters === []) {
                $io->text($filter === [] ? 'No dead letters.' : 'No dead letters match.');
                continue;
            }
            $total += count($letters);
            $rows = array_map(static fn (array $d): array => [
                self::clean((string) ($d['id'] ?? '')),
                self::clean((string) ($d['dead_lettered_at'] ?? '')),
                self::clean((string) ($d['reason'] ?? ''), 60),
                self::clean((string) ($d['route'] ?? '')),
                self::clean((string) ($d['body'] ?? ''), 40),
            ], $letters);
            $io->table(['Id', 'Dead-lettered at', 'Reason', 'Route', 'Body'], $rows);
            if ($answer['more'] ?? false) {
                $io->note(sprintf('Showing the first %d: more match (--max, --route or --reason to see others).', count($letters)));
            }
        }
        if ($total === 0 && !$explicit) {
            $io->success(sprintf('No dead letters%s in %s.', $filter === [] ? '' : ' match', self::subscriptionsText($names)));
        } elseif ($total > 0) {
            $io->text(sprintf('Run <comment>%s ID</comment> to see one whole, <comment>message-router:failed:retry</comment> or <comment>message-router:failed:remove</comment> to act on them.', self::NAME));
        }
        return Command::SUCCESS;
    }

    private function showStats(SymfonyStyle $io, array $names, array $filter, bool $explicit): int
    {
        $total = 0;
        foreach ($names as $name) {
            $stats = $this->admin->stats($name, $filter);
            $count = (int) ($stats['count'] ?? 0);
            if ($count === 0 && !$explicit) {
                continue;
            }
            $total += $count;
            $io->section(sprintf('Subscription %s: %d dead letter(s)%s', self::clean($name), $count, $filter === [] ? '' : ' matching'));
            if ($count === 0) {
                continue;
            }
            $io->text(sprintf('Oldest %s, newest %s', self::clean((string) ($stats['oldest'] ?? '?')), self::clean((string) ($stats['newest'] ?? '?'))));
            $ranked = static fn (array $list): array => array_map(
                static fn (array $e): array => [self::clean((string) $e['name'], 100), (int) $e['count']],
                $list
            );
            $io->table(['Reason', 'Count'], $ranked($stats['by_reason'] ?? []));
            $io->table(['Route', 'Count'], $ranked($stats['by_route'] ?? []));
            if ($stats['sampled'] ?? false) {
                $io->note('Counted from a sample: the first dead letters only.');
            }
        }
        if (count($names) > 1 || $total === 0) {
            $io->success(sprintf('%d dead letter(s)%s in %s.', $total, $filter === [] ? '' : ' matching', self::subscriptionsText($names)));
        }
        return Command::SUCCESS;
    }

    private function showOne(SymfonyStyle $io, array $names, string $id, bool $explicit): int
    {
        $found = [];
        foreach ($names as $name) {
            try {
                $found[$name] = $this->admin->deadLetter($name, $id);
            } catch (AdminException $e) {
                if ($explicit || $e->status() !== 404) {
                    throw $e;
                }
            }
        }
        if ($found === []) {
            $io->getErrorStyle()->error(sprintf('No dead letter "%s" in %s (%s lists them).', $id, self::subscriptionsText($names), self::NAME));
            return Command::FAILURE;
        }
        foreach ($found as $name => $d) {
            $this->showLetter($io, $name, $d);
        }
        return Command::SUCCESS;
    }

    private function showLetter(SymfonyStyle $io, string $subscription, array $d): void
    {
        $io->title(sprintf('Dead letter %s of subscription %s', self::clean((string) $d['id']), self::clean($subscription)));
        $field = static fn (string $label, $value): array => [$label => self::clean($value === null ? '' : (string) $value)];
        $io->definitionList(
            $field('Id', $d['id'] ?? null),
            $field('Message id', $d['message_id'] ?? null),
            $field('Reason', $d['reason'] ?? null),
            $field('Route', $d['route'] ?? null),
            $field('Dead-lettered at', $d['dead_lettered_at'] ?? null),
            $field('Origin', $d['origin'] ?? null),
            $field('Dead-letter destination', $d['destination'] ?? null),
            $field('Key', $d['key'] ?? null),
            $field('Content type', $d['content_type'] ?? null),
        );
        foreach (['router_headers' => 'Router headers', 'headers' => 'Other headers'] as $key => $title) {
            $io->section($title);
            $headers = (array) ($d[$key] ?? []);
            if ($headers === []) {
                $io->text('None.');
                continue;
            }
            $rows = [];
            foreach ($headers as $k => $v) {
                $rows[] = [self::clean((string) $k), self::clean(is_scalar($v) ? (string) $v : json_encode($v))];
            }
            $io->table(['Header', 'Value'], $rows);
        }
        $io->section(sprintf('Body (%d bytes)', (int) ($d['body_bytes'] ?? 0)));
        $io->writeln(self::clean((string) ($d['body'] ?? ''), null, true));
        $io->newLine();
    }
}
