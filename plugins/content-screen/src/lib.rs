//! content-screen: blocks or redacts PII, secrets, prompt injection and
//! denied terms in prompts and answers (streams included), and enforces
//! context budgets.
//!
//! This crate is the shell: the shared host adapter compiles the
//! configuration once per VM and runs a [`ScreenStage`](aigw_shared::screen::ScreenStage)
//! for each request. All screening logic is in `aigw_shared::screen`.

aigw_shared::plugin!(aigw_shared::screen::Screen);
