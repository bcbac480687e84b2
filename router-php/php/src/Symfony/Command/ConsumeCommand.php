<?php

namespace MessageRouter\Symfony\Command;

use MessageRouter\Router;
use MessageRouter\Symfony\HandlerLocator;
use Symfony\Component\Console\Command\Command;
use Symfony\Component\Console\Input\InputArgument;
use Symfony\Component\Console\Input\InputInterface;
use Symfony\Component\Console\Input\InputOption;
use Symfony\Component\Console\Output\OutputInterface;

/**
 * One process for the subscriptions of the router config: the in-process worker
 * (needs the message_router extension), typed like `messenger:consume` (README
 * "Migrating from Symfony Messenger" has the two side by side).
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
            ->setDescription('Consume the subscriptions of the router config in this process')
            ->addArgument('receivers', InputArgument::IS_ARRAY | InputArgument::OPTIONAL, 'Only these subscriptions (named like the Messenger transports they replace); default: all')
            ->addOption('limit', 'l', InputOption::VALUE_REQUIRED, 'Stop after this many messages')
            ->addOption('failure-limit', 'f', InputOption::VALUE_REQUIRED, 'Stop after this many messages failed (each is still retried or dead-lettered)')
            ->addOption('time-limit', 't', InputOption::VALUE_REQUIRED, 'Stop after this many seconds')
            ->addOption('memory-limit', 'm', InputOption::VALUE_REQUIRED, 'Stop when memory use exceeds this (e.g. 128M)')
            ->addOption('queues', null, InputOption::VALUE_REQUIRED | InputOption::VALUE_IS_ARRAY, 'Only the subscriptions reading these AMQP queues')
            ->addOption('sleep', null, InputOption::VALUE_REQUIRED, 'Accepted for messenger:consume compatibility; no effect: the brokers push messages, nothing polls')
            ->addOption('config', 'c', InputOption::VALUE_REQUIRED, 'The router config file (default: message_router.config)');
    }

    protected function execute(InputInterface $input, OutputInterface $output): int
    {
        if (!extension_loaded('message_router')) {
            $output->writeln('<error>The message_router extension is not loaded: build it with scripts/build-extension and add the ini line it prints.</error>');
            return Command::FAILURE;
        }
        $options = [];
        foreach (['limit' => 'limit', 'time-limit' => 'time_limit', 'failure-limit' => null] as $opt => $key) {
            if (null !== $v = $input->getOption($opt)) {
                if (!ctype_digit((string) $v) || (int) $v <= 0) {
                    $output->writeln("<error>--$opt must be a positive integer, got \"$v\"</error>");
                    return Command::INVALID;
                }
                if ($key !== null) {
                    $options[$key] = (int) $v;
                }
            }
        }
        if (null !== $v = $input->getOption('memory-limit')) {
            $options['memory_limit'] = (string) $v;
        }
        if (null !== $v = $input->getOption('sleep')) {
            if (!is_numeric($v) || (float) $v < 0) {
                $output->writeln("<error>--sleep must be a number of seconds, got \"$v\"</error>");
                return Command::INVALID;
            }
        }
        if ([] !== $receivers = $input->getArgument('receivers')) {
            $options['subscriptions'] = $receivers;
        }
        if ([] !== $queues = $input->getOption('queues')) {
            $options['queues'] = $queues;
        }
        // -vv and -vvv: the router's own log (stderr) at info and debug, unless the
        // environment already says.
        if ($output->isVeryVerbose() && getenv('MESSAGE_ROUTER_LOG') === false && getenv('RUST_LOG') === false) {
            putenv('MESSAGE_ROUTER_LOG=' . ($output->isDebug() ? 'debug' : 'info'));
        }

        try {
            $router = new Router($input->getOption('config') ?? $this->config);
        } catch (\Throwable $e) {
            $output->writeln('<error>' . $e->getMessage() . '</error>');
            return Command::FAILURE;
        }
        $failureLimit = $input->getOption('failure-limit');
        $failures = 0;
        $names = $router->names();
        $routes = [];
        foreach ($this->handlers->all() as $route => $handler) {
            if ($route === $this->handlers->messengerHandler() && !in_array($route, $names, true)) {
                continue; // the Messenger bus, and this config does not use it
            }
            $routes[] = $route;
            if ($failureLimit !== null || $output->isVeryVerbose()) {
                $handler = $this->watched($handler, $output, $router, (int) $failureLimit, $failures);
            }
            $router->route($route, $handler);
        }
        $output->writeln(sprintf('Consuming with handlers for: %s', implode(', ', $routes)), OutputInterface::VERBOSITY_VERBOSE);
        try {
            $result = $router->run($options);
        } catch (\Throwable $e) {
            $output->writeln('<error>' . $e->getMessage() . '</error>');
            return Command::FAILURE;
        }
        $reason = $result['reason'] === 'stop' && $failureLimit !== null && $failures >= (int) $failureLimit
            ? 'failure limit'
            : $result['reason'];
        $output->writeln(sprintf('Stopped (%s) after %d messages.', $reason, $result['handled']));
        return Command::SUCCESS;
    }

    /**
     * `$handler`, counting its failures toward --failure-limit and, at -vv, saying
     * what happened to each message (as messenger:consume's log does).
     */
    private function watched(callable|\MessageRouter\Handler $handler, OutputInterface $output, Router $router, int $failureLimit, int &$failures): \Closure
    {
        $call = $handler instanceof \MessageRouter\Handler ? $handler->handle(...) : $handler;
        return static function (\MessageRouter\Message $m) use ($call, $output, $router, $failureLimit, &$failures): void {
            $what = sprintf('message %s (route %s, attempt %d)', $m->id(), $m->route(), $m->attempt());
            try {
                $call($m);
            } catch (\Throwable $e) {
                $output->writeln(sprintf('<comment>%s failed: %s: %s</comment>', $what, get_class($e), $e->getMessage()), OutputInterface::VERBOSITY_VERY_VERBOSE);
                if ($failureLimit > 0 && ++$failures >= $failureLimit) {
                    $output->writeln(sprintf('Failure limit of %d reached: stopping after the messages in hand.', $failureLimit), OutputInterface::VERBOSITY_VERBOSE);
                    $router->stop();
                }
                throw $e;
            }
            $output->writeln(sprintf('%s handled', $what), OutputInterface::VERBOSITY_VERY_VERBOSE);
        };
    }
}
