//! One operation per verb. Each takes validated options and a [`Printer`](crate::printer::Printer)
//! and returns a typed result; the CLI layer only parses flags and renders results.

pub mod data_import;
pub mod demo;
pub mod extract;
pub mod init;
pub mod inspect;
pub mod install;
pub mod list;
pub mod merge;
pub mod overlap;
pub mod pack;
pub mod publish;
pub mod search;
pub mod unpack;
pub use crate::format::verify;
pub mod yank;

/// `xpm apply` is the merge crate's [`apply`](crate::merge::apply::apply).
pub use crate::merge::apply;
