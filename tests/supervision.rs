use e2e::*;
