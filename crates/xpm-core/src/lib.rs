//! xpm-core: what the `xpm` client and the registry server share, with no ML stack.
//!
//! - [`format`]: the expert manifest, mask codecs, the `.xpm` artifact and the unpacked layout;
//!   [`checkpoint`]: safetensors model checkpoints (single or sharded) and the base digest;
//! - [`registry`]: the index protocol and its clients (local directory, HTTP);
//!   [`resolve`]: choosing versions on one base; [`store`]: the content-addressed cache;
//!   [`project`]: `xpm.toml` and `xpm.lock`;
//! - plumbing: [`error`], [`digest`], [`fsutil`], [`home`], [`printer`] (all user-facing output
//!   and progress), [`suggest`] ("did you mean"), [`parallel`] (the one ordered parallel map), [`select`] (selection counts),
//!   [`pool`] and [`alloc`] (buffer reuse, allocator settings), [`rng`], [`units`].
//!
//! Layering: this crate depends on no other xpm crate. `xpm-merge` and `xpm-train` build on it,
//! the `xpm` command line on all three, and the registry server on this crate alone.

pub mod alloc;
pub mod checkpoint;
pub mod digest;
pub mod error;
pub mod format;
pub mod fsutil;
pub mod hf;
pub mod home;
pub mod parallel;
pub mod pool;
pub mod printer;
pub mod project;
pub mod registry;
pub mod resolve;
pub mod rng;
pub mod select;
pub mod signing;
pub mod store;
pub mod suggest;
pub mod units;

pub use error::{Error, Result};
