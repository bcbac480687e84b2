<?php
// No-op handler of the benches (bench/src/), served by `php -S 127.0.0.1:PORT noop.php`:
// read the body (as a real handler would), answer 204, nothing else.
file_get_contents('php://input');
http_response_code(204);
