//! What LLM APIs send, and how to read it without holding it.
//!
//! Every stage reads the same wire formats: which API a request speaks
//! (`api`), the facts of its body (`request`), streamed answers (`sse`), the
//! top-level members of JSON answers (`json_scan`), compressed answers
//! (`decode`), the usage the providers report (`usage`), and a few members
//! of one small document read in place (`walk`). They live
//! together because they are the parts every filter shares.

pub mod api;
pub mod decode;
pub mod json_scan;
pub mod request;
pub mod sse;
pub mod usage;
pub mod walk;
