<?php

namespace MessageRouter\Symfony\Command;

use MessageRouter\Router;
use MessageRouter\Symfony\HandlerLocator;
use Symfony\Component\Console\Command\Command;
use Symfony\Component\Console\Input\InputInterface;
use Symfony\Component\Console\Input\InputOption;
use Symfony\Component\Console\Output\OutputInterface;

/**
 * One process for every subscription of the router config: the in-process worker
 * (needs the message_router extension), with the options of messenger:consume.
 */
final class ConsumeCommand extends Command
{
    public const NAME = 'message-router:consume';

    public function __construct(private HandlerLocator $handlers, private string $config)
    {
        parent::__construct(self::NAME);
    }

    protected function configure(): void
    {
        $this
            ->setDescription('Consume every subscription of the router config in this process')
            ->addOption('limit', 'l', InputOption::VALUE_REQUIRED, 'Stop after this many messages')
            ->addOption('time-limit', 't', InputOption::VALUE_REQUIRED, 'Stop after this many seconds')
            ->addOption('memory-limit', 'm', InputOption::VALUE_REQUIRED, 'Stop when memory use exceeds this (e.g. 128M)')
            ->addOption('config', 'c', InputOption::VALUE_REQUIRED, 'The router config file (default: message_router.config)');
    }

    protected function execute(InputInterface $input, OutputInterface $output): int
    {
        if (!extension_loaded('message_router')) {
            $output->writeln('<error>The message_router extension is not loaded: build it with scripts/build-extension and add the ini line it prints.</error>');
            return Command::FAILURE;
        }
        $router = new Router($input->getOption('config') ?? $this->config);
        foreach ($this->handlers->all() as $route => $handler) {
            $router->route($route, $handler);
        }
        $options = [];
        foreach (['limit' => 'limit', 'time-limit' => 'time_limit'] as $opt => $key) {
            if (null !== $v = $input->getOption($opt)) {
                if (!ctype_digit((string) $v) || (int) $v <= 0) {
                    $output->writeln("<error>--$opt must be a positive integer, got \"$v\"</error>");
                    return Command::INVALID;
                }
                $options[$key] = (int) $v;
            }
        }
        if (null !== $v = $input->getOption('memory-limit')) {
            $options['memory_limit'] = (string) $v;
        }
        $output->writeln(sprintf('Consuming with handlers for: %s', implode(', ', $this->handlers->routes())), OutputInterface::VERBOSITY_VERBOSE);
        $result = $router->run($options);
        $output->writeln(sprintf('Stopped (%s) after %d messages.', $result['reason'], $result['handled']));
        return Command::SUCCESS;
    }
}
