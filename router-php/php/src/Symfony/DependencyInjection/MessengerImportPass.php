<?php

namespace MessageRouter\Symfony\DependencyInjection;

use MessageRouter\Symfony\Command\ImportMessengerCommand;
use Symfony\Component\DependencyInjection\Argument\ServiceClosureArgument;
use Symfony\Component\DependencyInjection\ChildDefinition;
use Symfony\Component\DependencyInjection\Compiler\CompilerPassInterface;
use Symfony\Component\DependencyInjection\ContainerBuilder;
use Symfony\Component\DependencyInjection\Definition;
use Symfony\Component\DependencyInjection\Reference;

/**
 * Hands the app's Symfony Messenger setup, as FrameworkExtension registered it, to
 * `message-router:import-messenger`: every transport (name, DSN, options, serializer,
 * retry strategy, failure transport) and the routing map. Read from the service
 * definitions rather than from framework.messenger, which no pass can see.
 *
 * DSNs and options are copied as they stand in the definitions: `%env()%` values are
 * placeholders here and the compiled container resolves them when the command runs,
 * so it imports the DSN the app would connect to.
 *
 * The shape (ImportMessengerCommand reads it; [] when the app has no transports):
 *
 *     transports: name => [dsn, env (variables the DSN reads), options, serializer,
 *                          retry: [max_retries, delay, multiplier, max_delay] | [service] | null,
 *                          failure_transport (where its failures go) | null,
 *                          is_failure_transport, service (receivers not built from a DSN)]
 *     routing:    message class => transport names (or sender service ids)
 *     failure_transport: the global one | null
 */
final class MessengerImportPass implements CompilerPassInterface
{
    private const TRANSPORT_PREFIX = 'messenger.transport.';
    private const RETRY_PREFIX = 'messenger.retry.multiplier_retry_strategy.';
    private const DEFAULT_SERIALIZER = 'messenger.default_serializer';

    public function process(ContainerBuilder $container): void
    {
        if (!$container->hasDefinition(ImportMessengerCommand::class)) {
            return;
        }
        $container->getDefinition(ImportMessengerCommand::class)->replaceArgument(0, $this->collect($container));
    }

    private function collect(ContainerBuilder $container): array
    {
        $receivers = $container->findTaggedServiceIds('messenger.receiver');
        if ($receivers === []) {
            return [];
        }
        $retries = $this->locatorMap($container, 'messenger.retry_strategy_locator');
        $failureTargets = $this->failureTargets($container);
        $transports = [];
        foreach ($receivers as $id => $tags) {
            $name = $this->transportName($id, $tags);
            $definition = $container->findDefinition($id);
            $fromDsn = str_starts_with($id, self::TRANSPORT_PREFIX) && \count($definition->getArguments()) >= 3;
            $dsn = $fromDsn ? $definition->getArgument(0) : null;
            $options = $fromDsn ? (array) $definition->getArgument(1) : [];
            unset($options['transport_name']); // added by FrameworkExtension, not the app's
            $serializer = $fromDsn ? $definition->getArgument(2) : null;
            $transports[$name] = [
                'dsn' => $dsn,
                'env' => \is_string($dsn) ? $this->envNames($container, $dsn) : [],
                'options' => $options,
                'serializer' => $serializer instanceof Reference ? (string) $serializer : self::DEFAULT_SERIALIZER,
                'retry' => $this->retry($container, $retries[$name] ?? null),
                'failure_transport' => $failureTargets[$name] ?? null,
                'is_failure_transport' => (bool) ($tags[0]['is_failure_transport'] ?? false),
                'service' => $fromDsn ? null : $id,
            ];
        }
        ksort($transports);
        $default = $container->hasAlias('messenger.failure_transports.default')
            ? $this->nameOf((string) $container->getAlias('messenger.failure_transports.default'))
            : null;
        return [
            'transports' => $transports,
            'routing' => $this->routing($container),
            'failure_transport' => $default,
        ];
    }

    private function transportName(string $id, array $tags): string
    {
        $alias = $tags[0]['alias'] ?? null;
        return \is_string($alias) && $alias !== '' ? $alias : $this->nameOf($id);
    }

    private function nameOf(string $serviceId): string
    {
        return str_starts_with($serviceId, self::TRANSPORT_PREFIX) ? substr($serviceId, \strlen(self::TRANSPORT_PREFIX)) : $serviceId;
    }

    /**
     * The variable names of the `%env()%` placeholders in a DSN, for the comment that
     * says where the URL came from (the value itself is resolved at runtime).
     *
     * @return list<string>
     */
    private function envNames(ContainerBuilder $container, string $dsn): array
    {
        $used = [];
        $container->resolveEnvPlaceholders($dsn, '%s', $used);
        $names = [];
        foreach (array_keys($used) as $env) {
            // `default::X`, `resolve:X`: the variable is after the last processor.
            $names[] = substr((string) $env, (int) strrpos(':' . $env, ':'));
        }
        return $names;
    }

    /**
     * A ServiceLocator definition's map (FrameworkExtension's retry strategy locator,
     * or one ServiceLocatorTagPass::register made): key => service id.
     *
     * @return array<string, string>
     */
    private function locatorMap(ContainerBuilder $container, string $locatorId): array
    {
        if (!$container->has($locatorId)) {
            return [];
        }
        $map = [];
        foreach ((array) $container->findDefinition($locatorId)->getArgument(0) as $key => $value) {
            if ($value instanceof ServiceClosureArgument) {
                $value = $value->getValues()[0] ?? null;
            }
            if ($value instanceof Reference) {
                $map[(string) $key] = (string) $value;
            }
        }
        return $map;
    }

    /** @return array<string, string> transport name => the failure transport its failures go to */
    private function failureTargets(ContainerBuilder $container): array
    {
        $listener = 'messenger.failure.send_failed_message_to_failure_transport_listener';
        if (!$container->hasDefinition($listener)) {
            return []; // FrameworkExtension removes it when there is no failure transport
        }
        $locator = $container->getDefinition($listener)->getArgument(0);
        if (!$locator instanceof Reference) {
            return [];
        }
        return array_map($this->nameOf(...), $this->locatorMap($container, (string) $locator));
    }

    private function retry(ContainerBuilder $container, ?string $serviceId): ?array
    {
        if ($serviceId === null) {
            return null;
        }
        if (!str_starts_with($serviceId, self::RETRY_PREFIX) || !$container->hasDefinition($serviceId)) {
            return ['service' => $serviceId];
        }
        $definition = $container->getDefinition($serviceId);
        $values = [];
        foreach (['max_retries', 'delay', 'multiplier', 'max_delay'] as $i => $key) {
            $values[$key] = $this->argument($definition, $i);
        }
        return $values;
    }

    /** Argument $i of a definition, also before ChildDefinitions are resolved (`index_N` keys). */
    private function argument(Definition $definition, int $i): mixed
    {
        $arguments = $definition->getArguments();
        if ($definition instanceof ChildDefinition && \array_key_exists("index_$i", $arguments)) {
            return $arguments["index_$i"];
        }
        return $arguments[$i] ?? null;
    }

    /** @return array<string, list<string>> */
    private function routing(ContainerBuilder $container): array
    {
        if (!$container->hasDefinition('messenger.senders_locator')) {
            return [];
        }
        $routing = [];
        foreach ((array) $container->getDefinition('messenger.senders_locator')->getArgument(0) as $message => $senders) {
            $routing[(string) $message] = array_values(array_map(
                fn ($sender): string => $this->nameOf((string) $sender),
                (array) $senders,
            ));
        }
        return $routing;
    }
}
