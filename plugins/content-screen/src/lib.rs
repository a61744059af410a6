//! content-screen: not built yet. It loads, accepts only an empty configuration, and
//! passes every request through untouched; its own issue fills it in.

aigw_shared::passthrough_plugin!("content-screen");
