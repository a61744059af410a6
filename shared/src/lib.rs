//! aigw-shared: the pure core of the aigw filters.
//!
//! Every decision the filters make lives here as plain Rust over owned data,
//! testable with `cargo test` and no host. The plugin crates are shells that
//! read from Envoy, call a [`stage::Stage`], and apply its answer. Only
//! [`host`] (behind the `host` feature) names proxy-wasm.

pub mod access_log;
pub mod api;
pub mod boundary;
pub mod config;
pub mod decode;
pub mod facts;
#[cfg(feature = "host")]
pub mod host;
pub mod json_scan;
pub mod meter;
pub mod metrics;
pub mod price;
pub mod request;
pub mod sse;
pub mod stage;
pub mod usage;
