//! gateway: the bundle. Every stage (token-meter, content-screen,
//! rate-limit, prompt-cache, model-router) in one wasm module with one
//! context per request; its configuration is each stage's configuration
//! under its name. All logic is in `aigw_shared::bundle` and the stages.

aigw_shared::plugin!(aigw_shared::bundle::Bundle);
