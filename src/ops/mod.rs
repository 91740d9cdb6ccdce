//! One operation per verb. Each takes validated options and a [`Printer`](crate::printer::Printer)
//! and returns a typed result; the CLI layer only parses flags and renders results.

pub mod demo;
pub mod extract;
pub mod inspect;
pub mod merge;
pub mod pack;
pub mod unpack;
pub mod verify;
