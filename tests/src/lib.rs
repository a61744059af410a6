//! The test harness of aigw: a mock LLM upstream, a real Envoy started from the
//! project's own YAML with the real `.wasm` files, and a small HTTP client that
//! can do what a test needs (read a stream's exact bytes, hang up mid-stream).

pub mod client;
pub mod harness;
pub mod mock;
pub mod moderation; // a mock moderation service for content-screen
pub mod render;
