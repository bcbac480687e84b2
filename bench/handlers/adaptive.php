<?php
// A handler whose service time changes mid-run, for `bench/run adaptive`: message
// m-I (the bench's ids, sent by the router as ce-id) sleeps FAST_MS milliseconds
// while I < SLOW_FROM and SLOW_MS from there on, as a handler waiting on a database
// that slows down would (sleeping, not spinning: the cores stay for the router and
// the broker). Answers 204.
file_get_contents('php://input');
$i = (int)substr($_SERVER['HTTP_CE_ID'] ?? 'm-0', 2);
$slow = $i >= (int)(getenv('SLOW_FROM') ?: PHP_INT_MAX);
usleep(1000 * (int)($slow ? getenv('SLOW_MS') : getenv('FAST_MS')));
http_response_code(204);
