//! xpm-merge: merging experts and applying them to a base model.
//!
//! Built-in strategies over the union of the experts' supports ([`engine`], [`params`],
//! [`lora`] for merges in LoRA space), recipes ([`recipe`]), the C-ABI plugin host
//! ([`plugin`]), experts as merge inputs ([`input`]) and base + Δ as a model directory
//! ([`apply`]). Semantics: docs/merging.md. Depends on `xpm-core` only.

pub mod apply;
pub mod engine;
pub mod input;
pub mod lora;
pub mod params;
pub mod plugin;
pub mod recipe;

pub use engine::{Input, Output, merge_tensor};
pub use params::{MergeParams, Preset, Strategy};
pub use recipe::{Plan, Recipe};
