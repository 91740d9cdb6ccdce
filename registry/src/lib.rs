//! The xpm registry server: the HTTP side of docs/registry-protocol.md.
//!
//! [`api::router`] serves a [`storage::Storage`]; [`storage::DiskStorage`] keeps everything on
//! local disk in the same layout as a `file://` registry, [`storage::S3Storage`] in an
//! S3-compatible bucket (the layout of an `s3://` registry). The `xpm-registry` binary wires
//! them to a TCP listener (`xpm-registry serve --root DIR --addr HOST:PORT`, or
//! `--storage s3://BUCKET/PREFIX` in place of `--root`).

pub mod api;
pub mod auth;
pub mod owners;
pub mod serve;
pub mod storage;

pub use api::{ServerConfig, router};
pub use serve::{Limits, serve};
pub use storage::{DiskStorage, S3Storage, Storage};
