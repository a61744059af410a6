//! aigw-shared: the pure core of the aigw filters.

pub mod sse;
