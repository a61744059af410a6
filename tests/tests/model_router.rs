//! model-router through the real Envoy with the real `.wasm`, in front of
//! several mock LLMs on their own ports (`envoy/model-router.yaml`: small
//! with a primary and a secondary, large, an Azure-style one).
//!
//! Each backend is its own server, so which one a request reached shows that
//! Envoy took the route the router's target header selected. A failing
//! backend is a tiny server here that answers every request with one status.

// Test code: a failed expectation is a panic with a message.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::type_complexity
)]

use aigw_tests::client::{self, Response};
use aigw_tests::harness::{root, Envoy};
use aigw_tests::mock::MockLlm;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A backend that answers every request with one status (503, 429, ...).
struct Failing {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    status: Arc<AtomicU16>,
    stop: Arc<AtomicBool>,
}

impl Failing {
    fn start(status: u16) -> Failing {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let status = Arc::new(AtomicU16::new(status));
        let stop = Arc::new(AtomicBool::new(false));
        let (h, s, st) = (hits.clone(), status.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (h, s) = (h.clone(), s.clone());
                std::thread::spawn(move || serve_failing(conn, &h, &s));
            }
        });
        Failing {
            addr,
            hits,
            status,
            stop,
        }
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for Failing {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

fn serve_failing(conn: TcpStream, hits: &AtomicUsize, status: &AtomicU16) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut out = conn;
    loop {
        let mut length = 0usize;
        let mut line = String::new();
        let mut first = true;
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if line == "\r\n" {
                break;
            }
            if !first {
                if let Some((k, v)) = line.split_once(':') {
                    if k.eq_ignore_ascii_case("content-length") {
                        length = v.trim().parse().unwrap_or(0);
                    }
                }
            }
            first = false;
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        hits.fetch_add(1, Ordering::SeqCst);
        let code = status.load(Ordering::SeqCst);
        let text = format!(
            r#"{{"error":{{"message":"failing backend says {code}","type":"server_error"}}}}"#
        );
        let reply = format!(
            "HTTP/1.1 {code} Failing\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{text}",
            text.len()
        );
        if out.write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
}

struct Backends {
    // Envoy first: it is dropped first, and prints its log if the test failed.
    envoy: Envoy,
    small: MockLlm,
    secondary: MockLlm,
    large: MockLlm,
    azure: MockLlm,
}

fn yaml() -> String {
    std::fs::read_to_string(root().join("envoy/model-router.yaml")).unwrap()
}

/// Starts the example; `primary` replaces the small cluster's primary (a failing one).
fn start(primary: Option<SocketAddr>) -> Backends {
    let small = MockLlm::start().unwrap();
    let secondary = MockLlm::start().unwrap();
    let large = MockLlm::start().unwrap();
    let azure = MockLlm::start().unwrap();
    let clusters = [
        ("small", primary.unwrap_or(small.addr())),
        ("small_secondary", secondary.addr()),
        ("large", large.addr()),
        ("azure", azure.addr()),
    ];
    let upstream = format!("http://{}", large.addr());
    let envoy = Envoy::start_with_clusters(&yaml(), &upstream, None, &clusters)
        .unwrap_or_else(|e| panic!("{e}"));
    Backends {
        envoy,
        small,
        secondary,
        large,
        azure,
    }
}

fn chat(model: &str, text: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": text}]})
}

impl Backends {
    fn post(&self, consumer: &str, extra: &[(&str, &str)], body: &Value) -> Response {
        let mut headers = vec![
            ("x-aigw-consumer", consumer),
            ("content-type", "application/json"),
        ];
        headers.extend_from_slice(extra);
        client::post(
            self.envoy.addr(),
            "/v1/chat/completions",
            &headers,
            &body.to_string(),
        )
        .expect("request through envoy")
    }

    fn line(&self, consumer: &str) -> Value {
        self.envoy
            .log_line(consumer)
            .unwrap_or_else(|| panic!("no access-log line for {consumer}"))
    }

    fn counts(&self) -> [usize; 4] {
        [&self.small, &self.secondary, &self.large, &self.azure].map(|m| m.requests().len())
    }
}

fn sent(mock: &MockLlm) -> (aigw_tests::mock::RecordedRequest, Value) {
    let r = mock.last_request().expect("the backend got the request");
    let body = serde_json::from_slice(&r.body).expect("the body sent upstream is JSON");
    (r, body)
}

#[test]
fn aliases_reach_their_backend_with_the_model_rewritten_and_the_key_replaced() {
    let b = start(None);
    // The client also tries to pick a cluster itself: not obeyed.
    let r = b.post(
        "alias-fast",
        &[
            ("authorization", "Bearer client-key"),
            ("x-aigw-target", "azure"),
        ],
        &chat("fast", "hello there"),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(b.counts(), [1, 0, 0, 0]);
    let (req, body) = sent(&b.small);
    assert_eq!(body["model"], "gpt-4o-mini");
    assert_eq!(body["messages"][0]["content"], "hello there");
    assert_eq!(
        req.header("authorization"),
        Some("Bearer sk-upstream-small")
    );
    assert_eq!(
        req.header("x-aigw-target"),
        None,
        "removed once it chose the route"
    );
    assert_eq!(
        req.header("content-length")
            .map(|l| l.parse::<usize>().unwrap()),
        Some(req.body.len())
    );
    // The answer names the model the client asked for (map_response_model).
    assert_eq!(r.json()["model"], "fast");
    assert!(!r.text().contains("sk-upstream"));

    let line = b.line("alias-fast");
    assert_eq!(line["model_requested"], "fast", "{line}");
    assert_eq!(line["model"], "gpt-4o-mini", "{line}");
    assert_eq!(line["route"], "small", "{line}");
    assert_eq!(line["provider"], "openai-compatible", "{line}");
    assert_eq!(line["route_tier"], Value::Null, "{line}");
    assert_eq!(line["route_reason"], "alias:fast", "{line}");
    assert!(line["input_tokens"].as_u64().is_some(), "{line}");

    // A target without its own key keeps the client's.
    let r = b.post(
        "alias-smart",
        &[("authorization", "Bearer client-key")],
        &chat("smart", "hi"),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let (req, body) = sent(&b.large);
    assert_eq!(body["model"], "gpt-4o");
    assert_eq!(req.header("authorization"), Some("Bearer client-key"));

    // Any other model passes as asked, to the default target.
    let r = b.post("alias-other", &[], &chat("o3-mini", "hi"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(sent(&b.large).1["model"], "o3-mini");
    assert_eq!(b.line("alias-other")["route"], "passthrough");

    let routed = b.envoy.metric_eventually(
        "aigw_route_requests_total",
        &[("model", "gpt-4o-mini")],
        1.0,
    );
    assert_eq!(routed, Some(1.0), "routed requests by upstream model");

    // Neither key is written anywhere a log reader sees.
    let log = std::fs::read_to_string(&b.envoy.access_log).unwrap();
    for key in ["sk-upstream-small", "azure-upstream-key", "client-key"] {
        assert!(!log.contains(key), "{key} in the access log");
        assert!(!b.envoy.log_text().contains(key), "{key} in Envoy's log");
    }
}

#[test]
fn an_openai_request_reaches_the_azure_deployment_path_with_its_key() {
    let b = start(None);
    let r = b.post(
        "azure",
        &[("authorization", "Bearer client-key")],
        &chat("azure-gpt-4o", "hi"),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(b.counts(), [0, 0, 0, 1]);
    let (req, body) = sent(&b.azure);
    assert_eq!(
        req.path,
        "/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21"
    );
    assert_eq!(req.header("api-key"), Some("azure-upstream-key"));
    assert_eq!(
        req.header("authorization"),
        None,
        "the client's key is removed"
    );
    assert_eq!(req.header("host"), Some("aigw-demo.openai.azure.com"));
    assert_eq!(body["messages"][0]["content"], "hi");
    let line = b.line("azure");
    assert_eq!(line["provider"], "azure", "{line}");
    assert_eq!(line["route"], "azure", "{line}");
    assert_eq!(line["model_requested"], "azure-gpt-4o", "{line}");
}

#[test]
fn header_and_consumer_rules_pick_the_large_backend() {
    let b = start(None);
    let cases: &[(&str, &[(&str, &str)], [usize; 4])] = &[
        ("plain", &[], [1, 0, 0, 0]),
        ("vip-acme", &[], [1, 0, 1, 0]),
        ("premium", &[("x-aigw-tier", "premium")], [1, 0, 2, 0]),
        ("standard", &[("x-aigw-tier", "standard")], [2, 0, 2, 0]),
    ];
    for (consumer, headers, counts) in cases {
        let r = b.post(consumer, headers, &chat("fast", "hi"));
        assert_eq!(r.status, 200, "{consumer}: {}", r.text());
        assert_eq!(b.counts(), *counts, "{consumer}");
    }
    assert_eq!(sent(&b.large).1["model"], "gpt-4o");
    assert_eq!(b.line("vip-acme")["route"], "large");
    assert_eq!(b.line("vip-acme")["route_reason"], "rule:vip");
    assert_eq!(b.line("premium")["route_reason"], "rule:premium");
}

#[test]
fn auto_sends_short_questions_small_and_long_analyses_large() {
    let b = start(None);
    let r = b.post(
        "auto-short",
        &[],
        &chat("auto", "What is the capital of France?"),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(b.counts(), [1, 0, 0, 0]);
    assert_eq!(sent(&b.small).1["model"], "gpt-4o-mini");

    let analysis = format!(
        "Analyze our migration plan step by step. First compare the trade-offs of \
         sharding against read replicas, then evaluate the failure modes, and explain \
         why you recommend one. Context follows. {}",
        "The service handles bursts of writes from many regions with strict latency goals. "
            .repeat(40)
    );
    let body = json!({"model": "auto", "messages": [
        {"role": "system", "content": "You are a careful architect."},
        {"role": "user", "content": "We run Postgres."},
        {"role": "assistant", "content": "Tell me more."},
        {"role": "user", "content": analysis}
    ]});
    let r = b.post("auto-long", &[], &body);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(b.counts(), [1, 0, 1, 0]);
    assert_eq!(sent(&b.large).1["model"], "gpt-4o");

    let short = b.line("auto-short");
    assert_eq!(short["route_tier"], "small", "{short}");
    assert_eq!(short["route_score"], 0, "{short}");
    assert_eq!(short["model_requested"], "auto", "{short}");
    assert_eq!(short["model"], "gpt-4o-mini", "{short}");
    let long = b.line("auto-long");
    assert_eq!(long["route_tier"], "large", "{long}");
    assert!(long["route_score"].as_u64().unwrap() > 30, "{long}");
}

#[test]
fn a_weighted_split_keeps_its_weights_over_a_thousand_requests() {
    let b = start(None);
    let body = chat("gpt-4o-canary", "hi").to_string();
    for _ in 0..1000 {
        let r = client::post(
            b.envoy.addr(),
            "/v1/chat/completions",
            &[("content-type", "application/json")],
            &body,
        )
        .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let [small, _, large, _] = b.counts();
    assert_eq!(small + large, 1000);
    // 80/20: 200 expected on small, with a binomial spread of about 12.6.
    // The band is five spreads each way: a fair split falls outside it about
    // once in two million runs (the old three-spread band failed about once
    // in six hundred, and did in CI), while a split that ignored the weights
    // (500 each) or a target (0) falls outside it every time.
    assert!((137..=263).contains(&small), "small got {small} of 1000");
}

#[test]
fn max_tokens_are_capped_for_the_model() {
    let b = start(None);
    let mut body = chat("smart", "hi");
    body["max_tokens"] = json!(100_000);
    let r = b.post("cap", &[], &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let (req, sent_body) = sent(&b.large);
    assert_eq!(sent_body["max_tokens"], 4096);
    assert_eq!(
        req.header("content-length")
            .map(|l| l.parse::<usize>().unwrap()),
        Some(req.body.len())
    );
}

#[test]
fn a_missing_model_is_a_400_that_says_so() {
    let b = start(None);
    let r = b.post(
        "no-model",
        &[],
        &json!({"messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "missing_model");
    assert_eq!(b.counts(), [0, 0, 0, 0]);
    assert_eq!(b.line("no-model")["status"], 400);
}

#[test]
fn a_503_or_429_from_the_primary_is_retried_on_the_secondary_streamed_too() {
    for status in [503, 429] {
        let failing = Failing::start(status);
        let b = start(Some(failing.addr));
        let r = b.post("retry", &[], &chat("fast", "hi"));
        assert_eq!(r.status, 200, "{status}: {}", r.text());
        assert_eq!(failing.hits(), 1, "{status}: the primary was tried first");
        assert_eq!(b.secondary.requests().len(), 1, "{status}");
        assert_eq!(sent(&b.secondary).1["model"], "gpt-4o-mini");

        let mut body = chat("fast", "hi");
        body["stream"] = json!(true);
        let r = b.post("retry-stream", &[("x-mock-chunks", "3")], &body);
        assert_eq!(r.status, 200, "{status}: {}", r.text());
        assert_eq!(failing.hits(), 2, "{status}");
        let text = r.text();
        assert!(
            text.contains("w2 ") && text.ends_with("data: [DONE]\n\n"),
            "{text}"
        );
        assert!(!text.contains("failing backend"), "{text}");
        // Every streamed event names the model the client asked for.
        assert!(text.contains(r#""model":"fast""#), "{text}");
        assert!(!text.contains("gpt-4o-mini"), "{text}");
        let line = b.line("retry-stream");
        assert_eq!(line["status"], 200, "{line}");
        assert_eq!(line["output_tokens"], 3, "{line}");
    }
}

#[test]
fn a_primary_that_keeps_failing_is_ejected() {
    let failing = Failing::start(503);
    let b = start(Some(failing.addr));
    for i in 0..8 {
        let r = b.post("eject", &[], &chat("fast", "hi"));
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
    }
    // Three 5xx in a row eject it; after that it sees no traffic at all.
    assert_eq!(failing.hits(), 3);
    assert_eq!(b.secondary.requests().len(), 8);
    let stats = b
        .envoy
        .admin("/stats?filter=cluster.small.outlier_detection");
    assert!(
        stats.contains("cluster.small.outlier_detection.ejections_enforced_consecutive_5xx: 1"),
        "{stats}"
    );
    failing.status.store(200, Ordering::SeqCst);
}

#[test]
fn envoy_refuses_a_bad_router_configuration() {
    let text = yaml().replace(
        "\"target_header\": \"x-aigw-target\",",
        "\"target_header\": \"x-aigw-target\", \"rulez\": [],",
    );
    assert!(text.contains("rulez"));
    let mock = MockLlm::start().unwrap();
    let err = match Envoy::start_text(&text, mock.addr()) {
        Ok(_) => panic!("envoy accepted a configuration with a typo"),
        Err(e) => e,
    };
    assert!(
        err.contains("model-router: invalid configuration: rulez: unknown field `rulez`"),
        "{err}"
    );
}

#[test]
fn the_gateway_demo_policy_aliases_auto_and_passes_the_rest() {
    let mock = MockLlm::start().unwrap();
    let envoy = Envoy::start("envoy/gateway.yaml", mock.addr()).unwrap_or_else(|e| panic!("{e}"));
    let long = format!(
        "Analyze step by step and compare the trade-offs, then explain why. {}",
        "More context about the system. ".repeat(300)
    );
    // (consumer, model asked, text, model served, route, tier)
    let cases: &[(&str, &str, &str, &str, &str, Option<&str>)] = &[
        ("demo-fast", "fast", "hi", "gpt-4o-mini", "small", None),
        ("demo-smart", "smart", "hi", "gpt-4o", "large", None),
        (
            "demo-auto-short",
            "auto",
            "What time is it in Paris?",
            "gpt-4o-mini",
            "small",
            Some("small"),
        ),
        (
            "demo-auto-long",
            "auto",
            &long,
            "gpt-4o",
            "large",
            Some("large"),
        ),
        (
            "demo-other",
            "claude-sonnet-4-5",
            "hi",
            "claude-sonnet-4-5",
            "passthrough",
            None,
        ),
    ];
    for (consumer, asked, text, served, route, tier) in cases {
        let headers = [
            ("x-aigw-consumer", *consumer),
            ("content-type", "application/json"),
        ];
        let r = client::post(
            envoy.addr(),
            "/v1/chat/completions",
            &headers,
            &chat(asked, text).to_string(),
        )
        .unwrap();
        assert_eq!(r.status, 200, "{consumer}: {}", r.text());
        let sent: Value = serde_json::from_slice(&mock.last_request().unwrap().body).unwrap();
        assert_eq!(sent["model"], *served, "{consumer}");
        let line = envoy.log_line(consumer).unwrap();
        assert_eq!(line["model_requested"], *asked, "{line}");
        assert_eq!(line["model"], *served, "{line}");
        assert_eq!(line["route"], *route, "{line}");
        assert_eq!(line["route_tier"], json!(tier), "{line}");
    }
}

#[test]
fn when_every_backend_fails_the_client_gets_an_openai_shaped_503() {
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let small = MockLlm::start().unwrap();
    let clusters = [
        ("small", small.addr()),
        ("small_secondary", small.addr()),
        ("large", dead),
        ("azure", small.addr()),
    ];
    let envoy = Envoy::start_with_clusters(
        &yaml(),
        &format!("http://{}", small.addr()),
        None,
        &clusters,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let headers = [
        ("x-aigw-consumer", "all-down"),
        ("content-type", "application/json"),
    ];
    let r = client::post(
        envoy.addr(),
        "/v1/chat/completions",
        &headers,
        &chat("smart", "hi").to_string(),
    )
    .unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
    let err = &r.json()["error"];
    assert_eq!(err["type"], "gateway_error", "{}", r.text());
    assert!(
        err["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{}",
        r.text()
    );
    let line = envoy.log_line("all-down").unwrap();
    assert_eq!(line["status"], 503, "{line}");
    assert_eq!(line["route"], "large", "{line}");
    assert!(small.requests().is_empty());
}

#[test]
fn a_body_that_is_not_json_goes_on_by_headers_alone() {
    let b = start(None);
    let headers = [
        ("x-aigw-consumer", "not-json"),
        ("content-type", "application/json"),
    ];
    let r = client::post(
        b.envoy.addr(),
        "/v1/chat/completions",
        &headers,
        "{\"model\": fast",
    )
    .unwrap();
    // The router sent it, unchanged, to the default target; the backend judged it.
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("malformed JSON"), "{}", r.text());
    assert_eq!(b.counts(), [0, 0, 1, 0]);
    assert_eq!(b.large.last_request().unwrap().body, b"{\"model\": fast");
    let line = b.line("not-json");
    assert_eq!(line["route"], "passthrough", "{line}");
    assert_eq!(line["route_reason"], "default", "{line}");
}
