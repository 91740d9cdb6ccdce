//! xpm: train, ship, find and merge parameter-efficient experts.
//!
//! The library behind the `xpm` command. Layout by concern:
//!
//! - [`format`]: the expert manifest, mask codecs, the `.xpm` artifact and the unpacked layout;
//! - [`checkpoint`]: safetensors model checkpoints (single or sharded) and the base digest;
//! - [`registry`]: the index protocol and its backends (local directory, HTTP);
//!   [`resolve`]: choosing versions on one base; [`store`]: the content-addressed cache;
//!   [`project`]: `xpm.toml` and `xpm.lock`;
//! - [`ops`]: one operation per command; [`cli`]: flag parsing and rendering only;
//! - [`printer`], [`error`], [`home`], [`digest`], [`fsutil`], [`select`], [`pool`]: shared
//!   plumbing.

pub mod alloc;
pub mod checkpoint;
pub mod cli;
pub mod digest;
pub mod error;
pub mod experiment;
pub mod format;
pub mod fsutil;
pub mod home;
pub mod merge;
pub mod ops;
pub mod pool;
pub mod printer;
pub mod project;
pub mod registry;
pub mod resolve;
pub mod rng;
pub mod schema;
pub mod select;
pub mod store;
pub mod train;
pub mod units;

pub use error::{Error, Result};
