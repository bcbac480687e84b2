<?php

namespace MessageRouter\Symfony;

use MessageRouter\Attribute\AsRouteHandler;
use MessageRouter\Symfony\DependencyInjection\HandlerPass;
use MessageRouter\Symfony\DependencyInjection\MessengerImportPass;
use MessageRouter\Symfony\DependencyInjection\MessageRouterExtension;
use Symfony\Component\DependencyInjection\ChildDefinition;
use Symfony\Component\DependencyInjection\ContainerBuilder;
use Symfony\Component\DependencyInjection\Extension\ExtensionInterface;
use Symfony\Component\HttpKernel\Bundle\Bundle;

/**
 * Registers handler classes marked #[AsRouteHandler('route')], the console worker
 * `message-router:consume` (in process, needs the extension), the controller that
 * serves daemon deliveries over HTTP, and `message-router:failed:show|retry|remove`
 * (dead letters, through the daemon's admin API). Configuration:
 *
 *     message_router:
 *         config: '%kernel.project_dir%/config/router.yaml'   # the daemon's file
 *         signing_secret: '%env(ROUTER_SIGNING_SECRET)%'      # optional; during a rotation a
 *                                                             # list: [new, old] (README)
 *         unavailable_retry_after: 5                          # Retry-After of the 503s: no
 *                                                             # handler here, no secret matches
 *         admin_url: 'http://127.0.0.1:9090'                  # the daemon's admin.listen
 *         admin_token: '%env(ROUTER_ADMIN_TOKEN)%'            # optional: its admin.token
 */
final class MessageRouterBundle extends Bundle
{
    public function build(ContainerBuilder $container): void
    {
        $container->registerAttributeForAutoconfiguration(
            AsRouteHandler::class,
            static function (ChildDefinition $definition, AsRouteHandler $attribute): void {
                $definition->addTag(HandlerPass::TAG, ['route' => $attribute->route]);
            }
        );
        $container->addCompilerPass(new HandlerPass());
        $container->addCompilerPass(new MessengerImportPass());
    }

    public function getContainerExtension(): ?ExtensionInterface
    {
        return new MessageRouterExtension();
    }
}
