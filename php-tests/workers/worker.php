<?php
// A worker under test: a MessageRouter\Router built from the JSON config file $argv[1],
// handlers/BehaveHandler.php (logging to $argv[2]) for every handler of the config,
// run() with the JSON options $argv[3]; prints the run's result as JSON. With
// WORKER_CONFIG_FROM_FILE set the router reads the file itself (JSON is YAML), so
// SIGHUP can read it again.

require_once __DIR__ . '/../handlers/BehaveHandler.php';

[$_, $configFile, $log] = $argv;
$options = json_decode($argv[3] ?? '{}', true) ?: [];
$config = json_decode(file_get_contents($configFile), true);

$router = new MessageRouter\Router(getenv('WORKER_CONFIG_FROM_FILE') ? $configFile : $config);
$handler = new MessageRouter\Tests\BehaveHandler($log);
foreach (array_keys($config['handlers']) as $name) {
    $router->route($name, $handler);
}
echo json_encode($router->run($options)), "\n";
