//! The PHP extension front of Message Router (ext-php-rs): one PHP process registers
//! handlers, and router-core, on background threads, consumes every subscription of
//! the config and multiplexes the deliveries into that process. PHP code runs only on
//! the PHP thread (README "Use from PHP / Symfony").
//!
//! # Layout
//! - [`worker`]: the Rust half, free of PHP types: the runtime (one per process id),
//!   the target every handler is reached through, the job channel to the PHP thread,
//!   worker limits.
//! - [`classes`]: the PHP API in the `MessageRouter` namespace: `Router`, `Message`,
//!   `Handler`, `RetryLater`, `Reject`; the run loop that calls handlers and maps what
//!   they do onto outcomes.
//! - [`convert`]: PHP values to Rust data (a config array, run options).
//! - [`signals`]: SIGTERM/SIGINT during `run()`.
//! - `stubs/message_router.php` (beside this crate): the PHP API for IDEs and static
//!   analysis, also the polyfill of the composer package when the extension is not
//!   loaded (daemon mode); php-tests/StubsTest.php keeps it in sync with the extension.
//! - `build.rs`: link flags (`-z nodelete`).

use ext_php_rs::prelude::*;

pub mod classes;
pub mod convert;
pub mod signals;
pub mod worker;

/// Module shutdown: stop the runtime (what is still in flight goes back to the broker
/// unsettled when its connection closes).
extern "C" fn module_shutdown(_kind: i32, _module: i32) -> i32 {
    let _ = std::panic::catch_unwind(|| worker::shutdown(std::time::Duration::from_secs(5)));
    0
}

#[php_module]
pub fn get_module(module: ModuleBuilder) -> ModuleBuilder {
    module
        .name("message_router")
        .version(env!("CARGO_PKG_VERSION"))
        .interface::<classes::PhpInterfaceHandler>()
        .class::<classes::Message>()
        .class::<classes::RetryLater>()
        .class::<classes::Reject>()
        .class::<classes::Router>()
        .shutdown_function(module_shutdown)
}
