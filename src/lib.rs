//! xpm: train, ship, find and merge parameter-efficient experts.
//!
//! The `xpm` command line, on top of three library crates (docs/architecture.md):
//!
//! - `xpm-core` (re-exported here module by module): the format, digests, the registry index
//!   protocol and clients, the resolver, the store and the project files;
//! - `xpm-merge` ([`merge`]): the merge engine, strategies, recipes, the plugin host, and
//!   applying an expert to its base;
//! - `xpm-train` ([`train`]): training and evaluation with Candle.
//!
//! This crate adds [`ops`] (one operation per command), [`cli`] (flag parsing and rendering
//! only), [`experiment`] (experiments run through the public commands) and [`schema`].

pub mod cli;
pub mod experiment;
pub mod ops;
pub mod schema;
pub mod serve;

pub use xpm_core::{
    Error, Result, alloc, checkpoint, digest, error, format, fsutil, hf, home, parallel, pool,
    printer, project, registry, resolve, rng, select, signing, store, suggest, units,
};
pub use xpm_merge as merge;
pub use xpm_train as train;
