//! token-meter: counts the tokens of every LLM request, streams included.
//!
//! This crate is the shell: the shared host adapter compiles the
//! configuration once per VM and runs a [`MeterStage`](aigw_shared::meter::MeterStage)
//! for each request. All metering logic is in `aigw_shared::meter`.

aigw_shared::plugin!(aigw_shared::meter::Meter);
