<?php

namespace MessageRouter\Symfony\DependencyInjection;

use MessageRouter\Admin\AdminClient;
use MessageRouter\Http\Dispatcher;
use MessageRouter\Symfony\Command\ConsumeCommand;
use MessageRouter\Symfony\Command\FailedRemoveCommand;
use MessageRouter\Symfony\Command\FailedRetryCommand;
use MessageRouter\Symfony\Command\FailedShowCommand;
use MessageRouter\Symfony\Command\ImportMessengerCommand;
use MessageRouter\Symfony\Controller\DeliveryController;
use MessageRouter\Symfony\HandlerLocator;
use Symfony\Component\Config\Definition\Builder\TreeBuilder;
use Symfony\Component\Config\Definition\ConfigurationInterface;
use Symfony\Component\DependencyInjection\ContainerBuilder;
use Symfony\Component\DependencyInjection\Extension\Extension;
use Symfony\Component\DependencyInjection\Reference;

/** `message_router:` in the app's config; registers the bundle's services. */
final class MessageRouterExtension extends Extension implements ConfigurationInterface
{
    public function getAlias(): string
    {
        return 'message_router';
    }

    public function getConfigTreeBuilder(): TreeBuilder
    {
        $tree = new TreeBuilder('message_router');
        $tree->getRootNode()
            ->children()
                ->scalarNode('config')
                    ->info('The router config (the daemon\'s YAML file) the in-process worker runs')
                    ->defaultValue('%kernel.project_dir%/config/router.yaml')
                ->end()
                ->arrayNode('signing_secret')
                    ->info('The daemon\'s signing.secret: HTTP deliveries must carry its signature. During a secret rotation, a list of the new and the old secret: a delivery signed with either is accepted (empty entries are skipped)')
                    ->example(['%env(ROUTER_SIGNING_SECRET)%', '%env(default::ROUTER_SIGNING_SECRET_PREVIOUS)%'])
                    ->beforeNormalization()->ifString()->then(static fn (string $v): array => [$v])->end()
                    // Not scalarPrototype: `%env(default::VAR)%` (an unset previous
                    // secret is null) may be of any type to the container's checks;
                    // Dispatcher refuses entries that are not strings.
                    ->variablePrototype()->end()
                ->end()
                ->integerNode('unavailable_retry_after')
                    ->info('Seconds in the Retry-After of the 503 answered for a route with no handler in this deployment, or a signature no configured secret matches; the daemon retries then, up to the route\'s max_attempts')
                    ->defaultValue(Dispatcher::RETRY_AFTER)
                    ->min(1)
                ->end()
                ->scalarNode('messenger_handler')
                    ->info('The handler of router.yaml that is the app\'s Symfony Messenger bus (subscriptions with `envelope: messenger`): its messages are decoded with the Messenger transport\'s serializer and dispatched to the bus')
                    ->defaultValue('messenger')
                    ->cannotBeEmpty()
                ->end()
                ->scalarNode('admin_url')
                    ->info('The daemon\'s admin listener (its admin.listen), for the message-router:failed:* commands')
                    ->defaultValue(AdminClient::DEFAULT_URL)
                    ->cannotBeEmpty()
                ->end()
                ->scalarNode('admin_token')
                    ->info('The daemon\'s admin.token, when it has one: sent as Authorization: Bearer, never shown')
                    ->example('%env(ROUTER_ADMIN_TOKEN)%')
                    ->defaultNull()
                ->end()
            ->end();
        return $tree;
    }

    public function getConfiguration(array $config, ContainerBuilder $container): ConfigurationInterface
    {
        return $this;
    }

    public function load(array $configs, ContainerBuilder $container): void
    {
        $config = $this->processConfiguration($this, $configs);
        $container->setParameter('message_router.config', $config['config']);
        $container->setParameter('message_router.signing_secrets', $config['signing_secret']);
        $container->setParameter('message_router.unavailable_retry_after', $config['unavailable_retry_after']);
        $container->setParameter('message_router.messenger_handler', $config['messenger_handler']);
        // Arguments filled by HandlerPass.
        $container->register(HandlerLocator::class, HandlerLocator::class)
            ->setArguments([null, [], '%message_router.messenger_handler%'])
            ->setPublic(true);
        $container->register(ConsumeCommand::class, ConsumeCommand::class)
            ->setArguments([new Reference(HandlerLocator::class), '%message_router.config%'])
            ->addTag('console.command', ['command' => ConsumeCommand::NAME]);
        // The token only as this service's argument: no container parameter to list it.
        $container->register(AdminClient::class, AdminClient::class)
            ->setArguments([$config['admin_url'], $config['admin_token']]);
        foreach ([FailedShowCommand::class, FailedRetryCommand::class, FailedRemoveCommand::class] as $command) {
            $container->register($command, $command)
                ->setArguments([new Reference(AdminClient::class)])
                ->addTag('console.command', ['command' => $command::NAME]);
        }
        // Its argument, the app's Messenger setup, is filled by MessengerImportPass.
        $container->register(ImportMessengerCommand::class, ImportMessengerCommand::class)
            ->setArguments([[], '%kernel.project_dir%', '%message_router.messenger_handler%'])
            ->addTag('console.command', ['command' => ImportMessengerCommand::NAME]);
        $container->register(DeliveryController::class, DeliveryController::class)
            ->setArguments([
                new Reference(HandlerLocator::class),
                '%message_router.signing_secrets%',
                '%message_router.unavailable_retry_after%',
            ])
            ->addTag('controller.service_arguments')
            ->setPublic(true);
    }
}
