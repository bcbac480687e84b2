<?php
// A handler that does work: reads the body, then spins on the CPU for $BUSY_US
// microseconds (default 1000) before answering 204. For `--handler busy` (bench/run):
// how the router's overhead compares with handlers that cost something.
file_get_contents('php://input');
$until = hrtime(true) + 1000 * (int)(getenv('BUSY_US') ?: 1000);
$x = 0;
while (hrtime(true) < $until) {
    $x = crc32((string)$x);
}
http_response_code(204);
