<?php

namespace MessageRouter\Symfony\Command;

use MessageRouter\Admin\AdminClient;
use Symfony\Component\Console\Input\InputInterface;
use Symfony\Component\Console\Output\OutputInterface;

/**
 * `message-router:failed:remove`: delete dead letters for good through the router's
 * admin API. Asks first unless --force. A Kafka topic cannot: the API says so.
 */
final class FailedRemoveCommand extends AbstractFailedCommand
{
    public const NAME = 'message-router:failed:remove';

    public function __construct(AdminClient $admin)
    {
        parent::__construct($admin, self::NAME);
    }

    protected function configure(): void
    {
        $this->setDescription('Delete dead letters of the router (through its admin API)');
        $this->configureRework('remove');
        $this->setHelp(<<<'HELP'
The <info>%command.name%</info> command deletes dead letters for good:

  <info>php %command.full_name% ID [ID...] --subscription=orders</info>
  <info>php %command.full_name% --subscription=orders --route=refunds</info>
  <info>php %command.full_name% --all --force</info>

It counts them first and asks; <info>--force</info> does not ask (without a terminal it is required).
A Kafka dead-letter topic is a log: its records leave only by its retention, and the
router refuses (the error says so).
HELP);
    }

    protected function execute(InputInterface $input, OutputInterface $output): int
    {
        return $this->rework($input, $output, 'purge');
    }
}
