<?php
// Prints the MessageRouter API as JSON, by reflection: of the loaded extension
// (`api.php ext`) or of the stubs file (`php -n api.php stubs FILE`, no extension).
// StubsTest compares the two.
if (($argv[1] ?? '') === 'stubs') {
    require $argv[2];
} elseif (!extension_loaded('message_router')) {
    fwrite(STDERR, "the message_router extension is not loaded\n");
    exit(2);
}
$names = ['MessageRouter\Handler', 'MessageRouter\Message', 'MessageRouter\RetryLater', 'MessageRouter\Reject', 'MessageRouter\Router'];
$type = fn (?ReflectionType $t) => $t === null ? null : (string) $t;
$api = [];
foreach ($names as $name) {
    if (!class_exists($name) && !interface_exists($name)) {
        $api[$name] = 'missing';
        continue;
    }
    $c = new ReflectionClass($name);
    $methods = [];
    foreach ($c->getMethods(ReflectionMethod::IS_PUBLIC) as $m) {
        // Inherited from \Exception: PHP's own, not ours.
        if ($m->getDeclaringClass()->getName() !== $name) {
            continue;
        }
        $methods[$m->getName()] = [
            'static' => $m->isStatic(),
            'return' => $type($m->getReturnType()),
            'params' => array_map(fn (ReflectionParameter $p) => [
                'name' => $p->getName(),
                'type' => $type($p->getType()),
                'optional' => $p->isOptional(),
            ], $m->getParameters()),
        ];
    }
    ksort($methods);
    $api[$name] = [
        'interface' => $c->isInterface(),
        'parent' => $c->getParentClass() ? $c->getParentClass()->getName() : null,
        'interfaces' => array_values(array_filter($c->getInterfaceNames(), fn ($i) => str_starts_with($i, 'MessageRouter\\'))),
        'methods' => $methods,
    ];
}
echo json_encode($api, JSON_PRETTY_PRINT | JSON_UNESCAPED_SLASHES), "\n";
