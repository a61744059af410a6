//! rate-limit: requests and tokens per consumer, local to one Envoy or
//! global through the rate limit service.
//!
//! This crate is the shell: the shared host adapter compiles the
//! configuration once per VM and runs a
//! [`RateLimitStage`](aigw_shared::ratelimit::RateLimitStage) for each
//! request. All the logic is in `aigw_shared::ratelimit`.

aigw_shared::plugin!(aigw_shared::ratelimit::RateLimit);
