//! The test harness of aigw: a mock LLM upstream, a real Envoy started from the
//! project's own YAML with the real `.wasm` files, and a small HTTP client that
//! can do what a test needs (read a stream chunk by chunk, hang up mid-stream).

pub mod mock;
