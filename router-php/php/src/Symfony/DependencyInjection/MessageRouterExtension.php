<?php

namespace MessageRouter\Symfony\DependencyInjection;

use MessageRouter\Symfony\Command\ConsumeCommand;
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
                ->scalarNode('signing_secret')
                    ->info('The daemon\'s signing.secret: HTTP deliveries must carry its signature')
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
        $container->setParameter('message_router.signing_secret', $config['signing_secret']);
        // Arguments filled by HandlerPass.
        $container->register(HandlerLocator::class, HandlerLocator::class)
            ->setArguments([null, []])
            ->setPublic(true);
        $container->register(ConsumeCommand::class, ConsumeCommand::class)
            ->setArguments([new Reference(HandlerLocator::class), '%message_router.config%'])
            ->addTag('console.command', ['command' => ConsumeCommand::NAME]);
        $container->register(DeliveryController::class, DeliveryController::class)
            ->setArguments([new Reference(HandlerLocator::class), '%message_router.signing_secret%'])
            ->addTag('controller.service_arguments')
            ->setPublic(true);
    }
}
