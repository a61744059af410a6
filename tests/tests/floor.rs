//! The benchmark fixture `floor.wasm` loads in Envoy in each of its steps
//! and passes requests through untouched (every module the build produces
//! is loaded by a test), and refuses a step it does not know.

// Test code: a failed expectation is a panic with a message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use aigw_tests::client;
use aigw_tests::harness::{root, with_floor, with_floors, Envoy};
use aigw_tests::mock::MockLlm;

#[test]
fn every_step_passes_requests_through() {
    let gateway = std::fs::read_to_string(root().join("envoy/gateway.yaml")).unwrap();
    let mock = MockLlm::start().unwrap();
    let body = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"one two"}]}"#;
    let direct = client::post(mock.addr(), "/v1/chat/completions", &[], body).unwrap();
    for step in ["idle", "headers", "body", "log", "io"] {
        let envoy = Envoy::start_text(&with_floor(&gateway, step).unwrap(), mock.addr()).unwrap();
        let resp = client::post(envoy.addr(), "/v1/chat/completions", &[], body).unwrap();
        assert_eq!(resp.status, 200, "{step}");
        assert_eq!(resp.body, direct.body, "{step}");
        assert_eq!(mock.last_request().unwrap().body, body.as_bytes(), "{step}");
        if step == "io" {
            // The io step edits headers both ways and rewrites stream chunks.
            assert_eq!(resp.header("x-aigw-floor-8"), Some("0123456789"));
            let stream = body.replace("\"messages\"", "\"stream\":true,\"messages\"");
            let resp = client::post(envoy.addr(), "/v1/chat/completions", &[], &stream).unwrap();
            assert_eq!(resp.status, 200);
            assert!(String::from_utf8_lossy(&resp.body).ends_with("data: [DONE]\n\n\n"));
        }
    }
    // Each of io's parts loads and passes requests through; io-minus-edits
    // makes no header edit.
    for step in [
        "io-minus-edits",
        "io-minus-shared",
        "io-minus-answer",
        "io-minus-fact",
    ] {
        let envoy = Envoy::start_text(&with_floor(&gateway, step).unwrap(), mock.addr()).unwrap();
        let resp = client::post(envoy.addr(), "/v1/chat/completions", &[], body).unwrap();
        assert_eq!(resp.status, 200, "{step}");
        assert_eq!(resp.body, direct.body, "{step}");
        let edited = resp.header("x-aigw-floor-8").is_some();
        assert_eq!(edited, step != "io-minus-edits", "{step}");
    }
    // The calls steps pass requests through; calls-edit leaves its header
    // (the last of its fifty values), calls-metric counts fifty a request.
    for step in ["calls-get", "calls-set", "calls-edit", "calls-metric"] {
        let envoy = Envoy::start_text(&with_floor(&gateway, step).unwrap(), mock.addr()).unwrap();
        let resp = client::post(envoy.addr(), "/v1/chat/completions", &[], body).unwrap();
        assert_eq!(resp.status, 200, "{step}");
        assert_eq!(resp.body, direct.body, "{step}");
        let edited = resp.header("x-aigw-floor-calls");
        assert_eq!(edited, (step == "calls-edit").then_some("1"), "{step}");
        let counted = envoy.metric("aigw_floor_calls_total", &[]);
        assert_eq!(counted, (step == "calls-metric").then_some(50.0), "{step}");
    }
    // Five floor filters chained pass requests through.
    let envoy = Envoy::start_text(&with_floors(&gateway, "body", 5).unwrap(), mock.addr()).unwrap();
    let resp = client::post(envoy.addr(), "/v1/chat/completions", &[], body).unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body, direct.body);
    // The reply step answers itself: the upstream sees nothing.
    let envoy = Envoy::start_text(&with_floor(&gateway, "reply").unwrap(), mock.addr()).unwrap();
    let before = mock.requests().len();
    for _ in 0..2 {
        let resp = client::post(envoy.addr(), "/v1/chat/completions", &[], body).unwrap();
        assert_eq!(resp.status, 200);
        assert_eq!(resp.header("content-type"), Some("application/json"));
        assert!(String::from_utf8_lossy(&resp.body).contains("chatcmpl-floor"));
    }
    assert_eq!(mock.requests().len(), before);
    let bad = with_floor(&gateway, "everything").unwrap();
    let err = Envoy::start_text(&bad, mock.addr()).err().unwrap();
    assert!(err.contains("floor: invalid configuration"), "{err}");
    let bad = with_floor(&gateway, "io-minus-logic").unwrap();
    let err = Envoy::start_text(&bad, mock.addr()).err().unwrap();
    assert!(err.contains("calls-(get|set|edit|metric)"), "{err}");
}
