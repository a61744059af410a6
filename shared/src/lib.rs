//! aigw-shared: the pure core of the aigw filters.
//!
//! Every decision the filters make lives here as plain Rust over owned data,
//! testable with `cargo test` and no host. The plugin crates are shells that
//! read from Envoy, call a [`stage::Stage`], and apply its answer. Only
//! [`host`] (behind the `host` feature) names proxy-wasm.

// The frame every filter runs in.
pub mod boundary; // the host as traits (time, filter state, metrics, shared data), with fakes
pub mod config; // parse, then compile; errors name the field
pub mod exchange; // runs a stage through a request over the fakes, for unit tests
pub mod facts; // per-request facts the filters share, one key each
#[cfg(feature = "host")]
pub mod host; // the proxy-wasm adapter: the only code that names the SDK
pub mod identity; // who is calling: API-key digests, a header, the client address
pub mod metrics; // metric names, labels, and the series bound
pub mod presence; // which other filters publish facts here, learnt, so absent ones cost no host call
pub mod stage; // the interface every filter's logic implements

// What LLM APIs send.
pub mod wire; // api, request, sse, json_scan, decode, usage

// One folder per stage.
pub mod cache; // prompt-cache: key, policy, bounded local store, Redis tier, stream replay
pub mod meter; // token-meter: usage, prices, metrics, the access-log line
pub mod ratelimit; // rate-limit: rules, local counters, the rate limit service, 429s
pub mod router; // model-router: rules, aliases, complexity tiers, splits; the rewrites
pub mod screen; // content-screen: PII, secrets, injection, deny list, budgets; prompts and answers

// All of them in one VM.
pub mod bundle; // the chain of stages, facts in memory, one body read
