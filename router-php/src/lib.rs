//! The PHP extension front of Message Router (ext-php-rs): in-process handlers on one
//! multiplexed Rust runtime. Built in its own issue; until then this crate only keeps
//! its place in the workspace and links `router-core`, so the core's public API is
//! checked for the second front from the first day.
//!
//! # Layout (planned, see shared/DESIGN.md "In-process contract")
//! - `src/`: the extension crate (router built from YAML or a PHP array, handler
//!   registration, `run()` with worker limits, PHP ↔ core outcome mapping).
//! - `php/`: the composer package's bridge classes (Symfony bundle, attributes,
//!   console command, HTTP entry point).
//! - `stubs/`: IDE stubs of the PHP API.

pub use router_core::{Outcome, Target};
