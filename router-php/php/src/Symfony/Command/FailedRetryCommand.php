<?php

namespace MessageRouter\Symfony\Command;

use MessageRouter\Admin\AdminClient;
use Symfony\Component\Console\Input\InputInterface;
use Symfony\Component\Console\Output\OutputInterface;

/**
 * `message-router:failed:retry`: put dead letters back on their source (the queue,
 * stream or topic they came from) through the router's admin API; they are handled
 * again from attempt 1. Asks first unless --force.
 */
final class FailedRetryCommand extends AbstractFailedCommand
{
    public const NAME = 'message-router:failed:retry';

    public function __construct(AdminClient $admin)
    {
        parent::__construct($admin, self::NAME);
    }

    protected function configure(): void
    {
        $this->setDescription('Replay dead letters of the router to their source (through its admin API)');
        $this->configureRework('replay');
        $this->setHelp(<<<'HELP'
The <info>%command.name%</info> command puts dead letters back on the queue, stream or topic
they came from, where the router handles them again from attempt 1:

  <info>php %command.full_name% ID [ID...] --subscription=orders</info>
  <info>php %command.full_name% --subscription=orders --reason='HTTP 5\d\d' --max=100</info>
  <info>php %command.full_name% --all --force</info>

It counts them first and asks; <info>--force</info> does not ask (without a terminal it is required).
On Kafka a replayed record stays in the dead-letter topic too (a log cannot delete it).
HELP);
    }

    protected function execute(InputInterface $input, OutputInterface $output): int
    {
        return $this->rework($input, $output, 'replay');
    }
}
