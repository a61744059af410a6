//! prompt-cache: answers repeated prompts from a tenant-scoped cache.
//!
//! This crate is the shell; all logic is in `aigw_shared::cache`.

aigw_shared::plugin!(aigw_shared::cache::Cache);
