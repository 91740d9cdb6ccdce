//! Merging experts: built-in strategies over the union of the experts' supports.
//! Semantics: docs/merging.md.

pub mod engine;
pub mod lora;
pub mod params;
pub mod plugin;
pub mod recipe;

pub use engine::{Input, Output, merge_tensor};
pub use params::{MergeParams, Preset, Strategy};
pub use recipe::{Plan, Recipe};
