//! model-router: picks the model and backend of each request and rewrites
//! model, path, authority and key so that Envoy's own router sends it there.
//!
//! This crate is the shell; all routing logic is in `aigw_shared::router`.

aigw_shared::plugin!(aigw_shared::router::Router);
