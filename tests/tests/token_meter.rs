//! token-meter through the real Envoy with the real `.wasm`, in front of the mock LLM.
//!
//! Every test starts its own Envoy from `envoy/gateway.yaml`. Each request
//! carries its own consumer id, so its access-log line and its metric series
//! are its own.

// Test code: a failed expectation is a panic with a message.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::type_complexity
)]

use aigw_tests::client::{self, Response};
use aigw_tests::harness::Envoy;
use aigw_tests::mock::MockLlm;
use serde_json::{json, Value};
use std::io::Read;

struct Gateway {
    // Envoy first: it is dropped first, and prints its log if the test failed.
    envoy: Envoy,
    mock: MockLlm,
}

fn gateway() -> Gateway {
    let mock = MockLlm::start().expect("mock LLM starts");
    let envoy = Envoy::start("envoy/gateway.yaml", mock.addr()).unwrap_or_else(|e| panic!("{e}"));
    Gateway { envoy, mock }
}

/// gateway.yaml without content-screen, for what the screen changes on
/// purpose: it refuses answers it cannot read (compressed ones) and bodies
/// past its limit, which the meter alone passes through.
fn meter_only() -> Gateway {
    let yaml =
        std::fs::read_to_string(aigw_tests::harness::root().join("envoy/gateway.yaml")).unwrap();
    let start = yaml
        .find("          - name: aigw.content_screen\n")
        .unwrap();
    let end = start + yaml[start + 1..].find("          - name: ").unwrap() + 1;
    let yaml = format!("{}{}", &yaml[..start], &yaml[end..]);
    let mock = MockLlm::start().expect("mock LLM starts");
    let envoy = Envoy::start_text(&yaml, mock.addr()).unwrap_or_else(|e| panic!("{e}"));
    Gateway { envoy, mock }
}

impl Gateway {
    fn post(&self, path: &str, consumer: &str, extra: &[(&str, &str)], body: &str) -> Response {
        let mut headers = vec![
            ("x-aigw-consumer", consumer),
            ("content-type", "application/json"),
        ];
        headers.extend_from_slice(extra);
        client::post(self.envoy.addr(), path, &headers, body).expect("request through envoy")
    }

    fn line(&self, consumer: &str) -> Value {
        self.envoy
            .log_line(consumer)
            .unwrap_or_else(|| panic!("no access-log line for consumer {consumer}"))
    }
}

/// 4 prompt tokens for the mock (it counts words).
const PROMPT: &str = "one two three four";

fn chat(stream: Option<Value>) -> String {
    let mut body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": PROMPT}]});
    if let Some(s) = stream {
        body["stream"] = json!(true);
        if !s.is_null() {
            body["stream_options"] = s;
        }
    }
    body.to_string()
}

fn assert_usage(line: &Value, name: &str, want: (u64, u64, Option<u64>, Option<u64>)) {
    let (input, output, cached, reasoning) = want;
    assert_eq!(line["input_tokens"], input, "{name}: {line}");
    assert_eq!(line["output_tokens"], output, "{name}: {line}");
    assert_eq!(line["total_tokens"], input + output, "{name}: {line}");
    assert_eq!(line["cached_input_tokens"], json!(cached), "{name}: {line}");
    assert_eq!(line["reasoning_tokens"], json!(reasoning), "{name}: {line}");
    assert_eq!(line["usage_source"], "provider", "{name}: {line}");
}

#[test]
fn every_api_is_metered_exactly_streaming_or_not() {
    struct Case {
        name: &'static str,
        path: &'static str,
        body: String,
        knobs: Vec<(&'static str, &'static str)>,
        stream: bool,
        provider: &'static str,
        model: &'static str,
        want: (u64, u64, Option<u64>, Option<u64>),
    }
    let anthropic = |stream: bool| {
        json!({"model": "claude-sonnet-4-5", "max_tokens": 64, "stream": stream,
               "system": "one two", "messages": [{"role": "user", "content": "three four"}]})
        .to_string()
    };
    let three = ("x-mock-chunks", "3");
    let cases = vec![
        Case {
            name: "chat json",
            path: "/v1/chat/completions",
            body: chat(None),
            knobs: vec![
                three,
                ("x-mock-cached-tokens", "2"),
                ("x-mock-reasoning-tokens", "1"),
            ],
            stream: false,
            provider: "openai",
            model: "gpt-4o",
            want: (4, 4, Some(2), Some(1)),
        },
        Case {
            name: "chat stream, client asked for usage",
            path: "/v1/chat/completions",
            body: chat(Some(json!({"include_usage": true}))),
            knobs: vec![three],
            stream: true,
            provider: "openai",
            model: "gpt-4o",
            want: (4, 3, Some(0), Some(0)),
        },
        Case {
            name: "chat stream, usage injected",
            path: "/v1/chat/completions",
            body: chat(Some(Value::Null)),
            knobs: vec![three],
            stream: true,
            provider: "openai",
            model: "gpt-4o",
            want: (4, 3, Some(0), Some(0)),
        },
        Case {
            name: "chat stream in 1-byte chunks",
            path: "/v1/chat/completions",
            body: chat(Some(Value::Null)),
            knobs: vec![
                three,
                ("x-mock-split-bytes", "1"),
                ("x-mock-split-delay-ms", "0"),
            ],
            stream: true,
            provider: "openai",
            model: "gpt-4o",
            want: (4, 3, Some(0), Some(0)),
        },
        Case {
            name: "chat stream, CRLF, comments, multi-line data",
            path: "/v1/chat/completions",
            body: chat(Some(json!({"include_usage": true}))),
            knobs: vec![
                three,
                ("x-mock-newline", "crlf"),
                ("x-mock-sse-extras", "1"),
            ],
            stream: true,
            provider: "openai",
            model: "gpt-4o",
            want: (4, 3, Some(0), Some(0)),
        },
        Case {
            name: "chat stream, CR line endings",
            path: "/v1/chat/completions",
            body: chat(Some(Value::Null)),
            knobs: vec![three, ("x-mock-newline", "cr")],
            stream: true,
            provider: "openai",
            model: "gpt-4o",
            want: (4, 3, Some(0), Some(0)),
        },
        Case {
            name: "vllm running totals on every chunk",
            path: "/v1/chat/completions",
            body: chat(Some(
                json!({"include_usage": true, "continuous_usage_stats": true}),
            )),
            knobs: vec![three],
            stream: true,
            provider: "openai",
            model: "gpt-4o",
            want: (4, 3, Some(0), Some(0)),
        },
        Case {
            name: "completions json",
            path: "/v1/completions",
            body: json!({"model": "gpt-3.5-turbo-instruct", "prompt": PROMPT}).to_string(),
            knobs: vec![three],
            stream: false,
            provider: "openai",
            model: "gpt-3.5-turbo-instruct",
            want: (4, 3, Some(0), Some(0)),
        },
        Case {
            name: "completions stream",
            path: "/v1/completions",
            body: json!({"model": "gpt-3.5-turbo-instruct", "prompt": PROMPT, "stream": true})
                .to_string(),
            knobs: vec![three],
            stream: true,
            provider: "openai",
            model: "gpt-3.5-turbo-instruct",
            want: (4, 3, Some(0), Some(0)),
        },
        Case {
            name: "responses json",
            path: "/v1/responses",
            body: json!({"model": "gpt-4o", "input": PROMPT}).to_string(),
            knobs: vec![
                three,
                ("x-mock-cached-tokens", "2"),
                ("x-mock-reasoning-tokens", "1"),
            ],
            stream: false,
            provider: "openai",
            model: "gpt-4o",
            want: (4, 4, Some(2), Some(1)),
        },
        Case {
            name: "responses stream",
            path: "/v1/responses",
            body: json!({"model": "gpt-4o", "input": PROMPT, "stream": true}).to_string(),
            knobs: vec![
                three,
                ("x-mock-cached-tokens", "2"),
                ("x-mock-reasoning-tokens", "1"),
            ],
            stream: true,
            provider: "openai",
            model: "gpt-4o",
            want: (4, 4, Some(2), Some(1)),
        },
        Case {
            name: "embeddings",
            path: "/v1/embeddings",
            body: json!({"model": "text-embedding-3-small", "input": ["one two", "three four"]})
                .to_string(),
            knobs: vec![],
            stream: false,
            provider: "openai",
            model: "text-embedding-3-small",
            want: (4, 0, None, None),
        },
        Case {
            name: "azure chat json",
            path: "/openai/deployments/prod-4o/chat/completions?api-version=2024-10-21",
            body: json!({"messages": [{"role": "user", "content": PROMPT}]}).to_string(),
            knobs: vec![three],
            stream: false,
            provider: "azure",
            model: "prod-4o",
            want: (4, 3, Some(0), Some(0)),
        },
        Case {
            name: "azure chat stream, usage injected",
            path: "/openai/deployments/prod-4o/chat/completions?api-version=2024-10-21",
            body: json!({"stream": true, "messages": [{"role": "user", "content": PROMPT}]})
                .to_string(),
            knobs: vec![three],
            stream: true,
            provider: "azure",
            model: "prod-4o",
            want: (4, 3, Some(0), Some(0)),
        },
        Case {
            name: "anthropic json",
            path: "/v1/messages",
            body: anthropic(false),
            knobs: vec![
                three,
                ("x-mock-cached-tokens", "2"),
                ("x-mock-cache-creation-tokens", "1"),
            ],
            stream: false,
            provider: "anthropic",
            model: "claude-sonnet-4-5",
            want: (4, 3, Some(2), None),
        },
        Case {
            name: "anthropic stream",
            path: "/v1/messages",
            body: anthropic(true),
            knobs: vec![
                three,
                ("x-mock-cached-tokens", "2"),
                ("x-mock-cache-creation-tokens", "1"),
            ],
            stream: true,
            provider: "anthropic",
            model: "claude-sonnet-4-5",
            want: (4, 3, Some(2), None),
        },
    ];
    let gw = gateway();
    let mut request_ids = std::collections::HashSet::new();
    for (i, c) in cases.iter().enumerate() {
        let consumer = format!("api-{i}");
        let resp = gw.post(c.path, &consumer, &c.knobs, &c.body);
        assert_eq!(resp.status, 200, "{}: {}", c.name, resp.text());
        let line = gw.line(&consumer);
        assert_usage(&line, c.name, c.want);
        if c.provider != "anthropic" {
            // Only Anthropic reports cache writes.
            assert!(
                line["cache_write_input_tokens"].is_null(),
                "{}: {line}",
                c.name
            );
        }
        assert_eq!(line["stream"], c.stream, "{}", c.name);
        assert_eq!(line["provider"], c.provider, "{}", c.name);
        assert_eq!(line["model"], c.model, "{}", c.name);
        assert_eq!(line["status"], 200, "{}", c.name);
        // Envoy's x-request-id: a UUID, one per request.
        let id = line["request_id"].as_str().unwrap_or_default();
        assert!(
            id.len() == 36 && id.bytes().filter(|&b| b == b'-').count() == 4,
            "{}: {line}",
            c.name
        );
        assert!(request_ids.insert(id.to_string()), "{}: {id} twice", c.name);
        // The first byte comes before the end (to the millisecond: the two
        // are read from different clocks, each truncated), and both within
        // the test's time.
        let (ttft, duration) = (line["ttft_ms"].as_u64(), line["duration_ms"].as_u64());
        assert!(
            ttft.zip(duration)
                .is_some_and(|(t, d)| t <= d + 1 && d < 10_000),
            "{}: {line}",
            c.name
        );
        if c.provider == "anthropic" {
            // claude-sonnet-4-5 (envoy/gateway.yaml), per 1M: $3 input, $0.30
            // cache reads, $3.75 cache writes, $15 output. 1 plain input
            // token, 2 read, 1 written, 3 output.
            let want = (3.0 + 2.0 * 0.3 + 3.75 + 3.0 * 15.0) / 1e6;
            assert_eq!(line["cache_write_input_tokens"], 1, "{}: {line}", c.name);
            let cost = line["cost_usd"].as_f64().unwrap();
            assert!((cost - want).abs() < 1e-12, "{}: {cost} != {want}", c.name);
        }
        // The client gets the answer the upstream gives a client that
        // calls it directly (the mock is deterministic).
        let direct = client::post(gw.mock.addr(), c.path, &c.knobs, &c.body).unwrap();
        assert_eq!(resp.text(), direct.text(), "{}", c.name);
    }
    let lines = gw.envoy.access_log_lines();
    assert_eq!(lines.len(), cases.len(), "one line per request: {lines:?}");
}

#[test]
fn injected_usage_is_invisible_to_the_client() {
    let gw = gateway();
    let body = chat(Some(Value::Null));
    for (name, knobs) in [
        ("whole", vec![("x-mock-chunks", "4")]),
        (
            "1-byte pieces",
            vec![
                ("x-mock-chunks", "4"),
                ("x-mock-split-bytes", "1"),
                ("x-mock-split-delay-ms", "0"),
            ],
        ),
    ] {
        let consumer = format!("invisible-{}", name.len());
        let through = gw.post("/v1/chat/completions", &consumer, &knobs, &body);
        let upstream_saw: Value =
            serde_json::from_slice(&gw.mock.last_request().unwrap().body).unwrap();
        assert_eq!(
            upstream_saw["stream_options"]["include_usage"], true,
            "{name}"
        );
        // What the upstream sends a client that did not ask for usage.
        let direct = client::post(gw.mock.addr(), "/v1/chat/completions", &knobs, &body).unwrap();
        assert!(!direct.text().contains("usage"), "{name}");
        assert_eq!(through.text(), direct.text(), "{name}");
        assert_usage(&gw.line(&consumer), name, (4, 4, Some(0), Some(0)));
    }
}

#[test]
fn cut_streams_are_logged_and_estimated() {
    let gw = gateway();
    // The client hangs up after the fourth piece of a slow stream.
    let knobs = [("x-mock-chunks", "200"), ("x-mock-chunk-delay-ms", "20")];
    let mut headers = vec![("x-aigw-consumer", "hangs-up")];
    headers.extend_from_slice(&knobs);
    let seen = client::post_and_hang_up(
        gw.envoy.addr(),
        "/v1/chat/completions",
        &headers,
        &chat(Some(Value::Null)),
        "w3 ",
    )
    .unwrap();
    assert!(String::from_utf8_lossy(&seen).contains("w3 "));
    let line = gw.line("hangs-up");
    assert_eq!(line["usage_source"], "estimated", "{line}");
    // 18 bytes of prompt by the 4-bytes-a-token rule; at least the 4 pieces seen (3 bytes each).
    assert_eq!(line["input_tokens"], 5, "{line}");
    let out = line["output_tokens"].as_u64().unwrap();
    assert!((3..200).contains(&out), "{line}");

    // The upstream dies after three events.
    let resp = gw.post(
        "/v1/chat/completions",
        "upstream-dies",
        &[("x-mock-abort-after", "3"), ("x-mock-chunks", "10")],
        &chat(Some(Value::Null)),
    );
    assert_eq!(resp.status, 200);
    let line = gw.line("upstream-dies");
    assert_eq!(line["usage_source"], "estimated", "{line}");
    assert_eq!(line["input_tokens"], 5, "{line}");

    // The provider omits usage from a complete stream.
    gw.post(
        "/v1/chat/completions",
        "no-usage",
        &[("x-mock-omit-usage", "1"), ("x-mock-chunks", "4")],
        &chat(Some(Value::Null)),
    );
    let line = gw.line("no-usage");
    assert_eq!(line["usage_source"], "estimated", "{line}");
    // "w0 w1 w2 w3 " is 12 bytes: 3 tokens by the rule of thumb.
    assert_eq!(line["output_tokens"], 3, "{line}");
}

#[test]
fn errors_pass_through_and_are_never_usage() {
    // content-screen answers a body it cannot read itself (it refuses to
    // pass it unscreened); here the upstream's own errors are the subject.
    let gw = meter_only();
    let cases: &[(&str, &str, &[(&str, &str)], &str, u16)] = &[
        (
            "rate-limited",
            "/v1/chat/completions",
            &[("x-mock-status", "429")],
            "",
            429,
        ),
        (
            "server-error-stream",
            "/v1/chat/completions",
            &[("x-mock-status", "500")],
            "stream",
            500,
        ),
        (
            "anthropic-overloaded",
            "/v1/messages",
            &[("x-mock-status", "529")],
            "",
            529,
        ),
        (
            "malformed-json",
            "/v1/chat/completions",
            &[],
            "{not json",
            400,
        ),
    ];
    for (consumer, path, knobs, kind, status) in cases {
        let body = match *kind {
            "stream" => chat(Some(Value::Null)),
            "" => chat(None),
            raw => raw.to_string(),
        };
        let resp = gw.post(path, consumer, knobs, &body);
        assert_eq!(resp.status, *status, "{consumer}");
        // The provider's error reaches the client as the provider wrote it.
        let mut direct_headers = vec![("content-type", "application/json")];
        direct_headers.extend_from_slice(knobs);
        let direct = client::post(gw.mock.addr(), path, &direct_headers, &body).unwrap();
        assert_eq!(resp.text(), direct.text(), "{consumer}");
        assert!(
            resp.json()["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{consumer}: {}",
            resp.text()
        );
        let line = gw.line(consumer);
        assert_eq!(line["status"], *status, "{consumer}");
        assert_eq!(line["usage_source"], "none", "{consumer}: {line}");
        for field in ["input_tokens", "output_tokens", "total_tokens", "cost_usd"] {
            assert!(line[field].is_null(), "{consumer}: {field} in {line}");
        }
    }
}

#[test]
fn compressed_responses_are_metered() {
    let gw = meter_only();
    // A client that accepts gzip: the upstream is asked for identity.
    let resp = gw.post(
        "/v1/chat/completions",
        "accepts-gzip",
        &[("accept-encoding", "gzip")],
        &chat(None),
    );
    assert_eq!(
        gw.mock.last_request().unwrap().header("accept-encoding"),
        Some("identity")
    );
    assert_eq!(resp.header("content-encoding"), None);
    assert_usage(
        &gw.line("accepts-gzip"),
        "identity",
        (4, 5, Some(0), Some(0)),
    );

    // An upstream that compresses anyway, JSON and stream: read through a side decoder.
    for (consumer, body) in [
        ("forced-gzip", chat(None)),
        (
            "forced-gzip-stream",
            chat(Some(json!({"include_usage": true}))),
        ),
    ] {
        let resp = gw.post(
            "/v1/chat/completions",
            consumer,
            &[("x-mock-gzip", "force")],
            &body,
        );
        assert_eq!(resp.header("content-encoding"), Some("gzip"), "{consumer}");
        let mut plain = String::new();
        flate2::read::GzDecoder::new(&resp.body[..])
            .read_to_string(&mut plain)
            .unwrap();
        assert!(
            plain.contains("w4 "),
            "{consumer}: the client gets the compressed body intact"
        );
        assert_usage(&gw.line(consumer), consumer, (4, 5, Some(0), Some(0)));
    }
}

#[test]
fn compressed_answers_are_read_within_bounds() {
    // content-screen refuses answers it cannot read; the meter reads them.
    let gw = meter_only();
    let stream = chat(Some(json!({"include_usage": true})));
    let cases: &[(&str, &[(&str, &str)], &str, &str, u64)] = &[
        // 512 MiB of spaces before the usage, ~500 KiB on the wire: the meter
        // stops at its budget, the client still gets every byte.
        (
            "bomb",
            &[("x-mock-gzip-bomb-mib", "512")],
            "json",
            "estimated",
            7,
        ),
        (
            "two-members-stream",
            &[("x-mock-gzip-members", "2")],
            "stream",
            "provider",
            5,
        ),
        (
            "two-members-json",
            &[("x-mock-gzip-members", "2")],
            "json",
            "provider",
            5,
        ),
        (
            "corrupt-after-usage",
            &[("x-mock-gzip-corrupt", "1")],
            "json",
            "provider",
            5,
        ),
        (
            "corrupt-after-usage-stream",
            &[("x-mock-gzip-corrupt", "1")],
            "stream",
            "provider",
            5,
        ),
    ];
    for (consumer, knobs, kind, source, output) in cases {
        let body = if *kind == "stream" {
            stream.clone()
        } else {
            chat(None)
        };
        let direct = client::post(gw.mock.addr(), "/v1/chat/completions", knobs, &body).unwrap();
        let resp = gw.post("/v1/chat/completions", consumer, knobs, &body);
        assert_eq!(resp.status, 200, "{consumer}");
        assert_eq!(resp.header("content-encoding"), Some("gzip"), "{consumer}");
        assert!(
            resp.body == direct.body,
            "{consumer}: the client gets the upstream's bytes ({} of {})",
            resp.body.len(),
            direct.body.len()
        );
        let line = gw.line(consumer);
        assert_eq!(line["usage_source"], *source, "{consumer}: {line}");
        if *source == "provider" {
            assert_usage(&line, consumer, (4, *output, Some(0), Some(0)));
        } else {
            // The prompt's estimate (18 bytes), and the text before the
            // padding: "w0 " .. "w4 ", "assistant", "stop" (28 bytes).
            assert_eq!(line["input_tokens"], 5, "{consumer}: {line}");
            assert_eq!(line["output_tokens"], 7, "{consumer}: {line}");
        }
    }
    // The VM survived the bomb: the next answer is metered exactly.
    let resp = gw.post("/v1/chat/completions", "after-bomb", &[], &chat(None));
    assert_eq!(resp.status, 200);
    assert_usage(
        &gw.line("after-bomb"),
        "after bomb",
        (4, 5, Some(0), Some(0)),
    );
    let log = gw.envoy.log_text();
    assert!(
        !log.contains("panicked") && !log.contains("Function: "),
        "{log}"
    );
}

#[test]
fn metrics_by_model_and_consumer() {
    let gw = gateway();
    for _ in 0..2 {
        // no-cache: both reach the upstream (a cache hit counts no tokens).
        gw.post(
            "/v1/chat/completions",
            "metrics-a",
            &[("x-mock-chunks", "3"), ("cache-control", "no-cache")],
            &chat(None),
        );
    }
    gw.post(
        "/v1/chat/completions",
        "metrics-a",
        // The prompt cache in gateway.yaml would answer this from the entry
        // the first request left (stream or not, one entry); ask upstream.
        &[
            ("x-mock-chunks", "3"),
            ("x-mock-ttft-ms", "30"),
            ("cache-control", "no-cache"),
        ],
        &chat(Some(Value::Null)),
    );
    gw.post("/v1/messages", "metrics-b", &[("x-mock-chunks", "2"), ("x-mock-cache-creation-tokens", "1")], &json!({"model": "claude-sonnet-4-5", "max_tokens": 9, "messages": [{"role": "user", "content": PROMPT}]}).to_string());
    gw.line("metrics-b");
    let m = |name: &str, labels: &[(&str, &str)]| gw.envoy.metric(name, labels);
    let a = [("model", "gpt-4o"), ("consumer", "metrics-a")];
    let tokens = |labels: &[(&str, &str)], t: &str| {
        let mut l = labels.to_vec();
        l.push(("token_type", t));
        m("aigw_tokens_total", &l)
    };
    let mut first = a.to_vec();
    first.push(("token_type", "input"));
    assert_eq!(
        gw.envoy
            .metric_eventually("aigw_tokens_total", &first, 12.0),
        Some(12.0)
    );
    assert_eq!(tokens(&a, "output"), Some(9.0));
    assert_eq!(tokens(&a, "cached_input"), Some(0.0));
    let b = [("model", "claude-sonnet-4-5"), ("consumer", "metrics-b")];
    assert_eq!(tokens(&b, "input"), Some(4.0));
    assert_eq!(tokens(&b, "output"), Some(2.0));
    assert_eq!(tokens(&b, "cache_write_input"), Some(1.0));
    assert_eq!(
        tokens(&a, "cache_write_input"),
        None,
        "OpenAI reports no cache writes"
    );
    let mut provider = a.to_vec();
    provider.push(("usage_source", "provider"));
    assert_eq!(m("aigw_requests_total", &provider), Some(3.0));
    // gpt-4o at $2.5 / $10 per 1M: 3 x (4 in, 3 out) = 30 + 90 micro-USD.
    assert_eq!(m("aigw_cost_microdollars_total", &a), Some(120.0));

    // Histograms are merged on Envoy's 1 s stats flush; wait for it.
    let mut ttft = None;
    for _ in 0..50 {
        ttft = m(
            "gen_ai_server_time_to_first_token_ms_count",
            &[("model", "gpt-4o")],
        );
        if ttft == Some(1.0) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(ttft, Some(1.0), "one streamed request");
    let slow_first = m(
        "gen_ai_server_time_to_first_token_ms_bucket",
        &[("model", "gpt-4o"), ("le", "25")],
    );
    assert_eq!(
        slow_first,
        Some(0.0),
        "the 30 ms first token is not under 25 ms"
    );
    assert_eq!(
        m(
            "gen_ai_server_request_duration_ms_count",
            &[("model", "gpt-4o")]
        ),
        Some(3.0)
    );
    assert_eq!(
        m(
            "gen_ai_client_token_usage_count",
            &[
                ("model", "gpt-4o"),
                ("consumer", "metrics-a"),
                ("token_type", "input")
            ]
        ),
        Some(3.0)
    );
    // Only the streamed request has a time per output token (3 tokens: two gaps).
    assert_eq!(
        m(
            "gen_ai_server_time_per_output_token_ms_count",
            &[("model", "gpt-4o")]
        ),
        Some(1.0)
    );
    // The JSON requests have no first token time of their own; Anthropic's
    // model has its own series.
    assert_eq!(
        m(
            "gen_ai_server_request_duration_ms_count",
            &[("model", "claude-sonnet-4-5")]
        ),
        Some(1.0)
    );
    let mut b_provider = b.to_vec();
    b_provider.push(("usage_source", "provider"));
    assert_eq!(m("aigw_requests_total", &b_provider), Some(1.0));
    // claude-sonnet-4-5 at $3 / $3.75 cache writes / $15 per 1M: 3 plain
    // in, 1 written, 2 out = 42.75 micro-USD; the 0.75 is carried.
    assert_eq!(m("aigw_cost_microdollars_total", &b), Some(42.0));
}

#[test]
fn cost_adds_up_over_many_cheap_requests() {
    // 1000 requests from one consumer: past the demo rate limit (60 a
    // minute), which is not what this test measures.
    let mock = MockLlm::start().expect("mock LLM starts");
    let yaml =
        aigw_tests::harness::gateway_yaml().replace("\"requests\": 60", "\"requests\": 100000");
    assert!(yaml.contains("\"requests\": 100000"));
    let envoy = Envoy::start_text(&yaml, mock.addr()).unwrap_or_else(|e| panic!("{e}"));
    let gw = Gateway { envoy, mock };
    let addr = gw.envoy.addr();
    // gpt-4o-mini at $0.15 / $0.60 per 1M tokens (envoy/gateway.yaml): one
    // input token is 0.15 micro-dollars. Counted in 1e-4 micro-dollars.
    let (input_price, output_price) = (1_500u64, 6_000u64);
    let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
        .to_string();
    let (threads, per_thread) = (8u64, 125u64);
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let body = body.clone();
            std::thread::spawn(move || {
                let mut conn = client::Conn::open(addr).unwrap();
                let mut units = 0;
                for i in 0..per_thread {
                    let (input, output) = (1 + (t + i) % 7, 1 + i % 3);
                    let (p, c) = (input.to_string(), output.to_string());
                    let headers = [
                        ("x-aigw-consumer", "penny"),
                        ("content-type", "application/json"),
                        // The same prompt each time: the upstream answers, not the cache.
                        ("cache-control", "no-cache"),
                        ("x-mock-prompt-tokens", p.as_str()),
                        ("x-mock-chunks", c.as_str()),
                    ];
                    let resp = conn.post("/v1/chat/completions", &headers, &body).unwrap();
                    assert_eq!(resp.status, 200, "{}", resp.text());
                    units += input * input_price + output * output_price;
                }
                units
            })
        })
        .collect();
    let units: u64 = workers.into_iter().map(|w| w.join().unwrap()).sum();
    let exact = units as f64 / 10_000.0;
    let labels = [("model", "gpt-4o-mini"), ("consumer", "penny")];
    let n = (threads * per_thread) as f64;
    let requests = gw
        .envoy
        .metric_eventually("aigw_requests_total", &labels, n);
    assert_eq!(requests, Some(n));
    let counted = gw
        .envoy
        .metric("aigw_cost_microdollars_total", &labels)
        .unwrap();
    // Whole micro-dollars, the remainder carried: short of the exact sum by
    // less than one.
    assert!(
        counted <= exact && exact - counted < 1.0 && (exact - counted) / exact < 1e-3,
        "counted {counted} micro-dollars, exactly {exact}"
    );
}

#[test]
fn concurrent_requests_are_each_counted_once() {
    let gw = gateway();
    let addr = gw.envoy.addr();
    let threads: Vec<_> = (0..16)
        .map(|i| {
            std::thread::spawn(move || {
                let body = if i % 2 == 0 {
                    chat(None)
                } else {
                    chat(Some(Value::Null))
                };
                let headers = [
                    ("x-aigw-consumer", "crowd"),
                    // The same prompt each time: the upstream answers, not the cache.
                    ("cache-control", "no-cache"),
                    ("x-mock-chunks", "3"),
                    ("x-mock-split-bytes", "7"),
                    ("x-mock-split-delay-ms", "0"),
                ];
                client::post(addr, "/v1/chat/completions", &headers, &body)
                    .unwrap()
                    .status
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), 200);
    }
    let labels = [
        ("model", "gpt-4o"),
        ("consumer", "crowd"),
        ("token_type", "input"),
    ];
    assert_eq!(
        gw.envoy
            .metric_eventually("aigw_tokens_total", &labels, 64.0),
        Some(64.0)
    );
    let lines = gw.envoy.log_lines("crowd", 16);
    assert_eq!(lines.len(), 16);
    assert!(lines
        .iter()
        .all(|l| l["usage_source"] == "provider" && l["output_tokens"] == 3));
}

#[test]
fn requests_that_are_not_llm_calls_get_a_line_of_nulls() {
    let gw = gateway();
    let resp = client::send(
        gw.envoy.addr(),
        "GET",
        "/healthz",
        &[("x-aigw-consumer", "prober")],
        b"",
    )
    .unwrap();
    assert_eq!(resp.status, 200);
    let line = gw.line("prober");
    assert_eq!(line["status"], 200);
    assert_eq!(line["usage_source"], "none");
    for field in [
        "provider",
        "model",
        "model_requested",
        "input_tokens",
        "stream",
        "cost_usd",
    ] {
        assert!(line[field].is_null(), "{field}: {line}");
    }
}

/// HTTP lets a header value carry bytes that are not UTF-8 (obs-text). The
/// SDK's header read panics on one, which took the VM down with the request
/// (a 503). Now it is read lossily, metered, and passed on byte for byte,
/// both ways, however many headers the filters add beside it.
#[test]
fn header_values_that_are_not_utf8_pass_byte_for_byte() {
    use aigw_tests::mock::OBS_TEXT;
    use std::io::Write;
    let gw = gateway();
    let body = chat(None);
    for consumer in ["obs-text-1", "obs-text-2"] {
        let mut req = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: aigw.test\r\nconnection: close\r\n\
             content-type: application/json\r\nx-aigw-consumer: {consumer}\r\n\
             x-mock-obs-text: 1\r\ncontent-length: {}\r\nx-client-note: ",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(b"caf\xe9\xff\r\n\r\n");
        req.extend_from_slice(body.as_bytes());
        let mut s = std::net::TcpStream::connect(gw.envoy.addr()).unwrap();
        s.write_all(&req).unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).unwrap();
        // The client's parser wants a UTF-8 head; the bytes are checked below.
        let resp = Response::parse(String::from_utf8_lossy(&raw).as_bytes()).unwrap();
        assert_eq!(resp.status, 200, "{}", resp.text());
        let mut want = format!("\r\n{}: ", OBS_TEXT.0).into_bytes();
        want.extend_from_slice(OBS_TEXT.1);
        want.extend_from_slice(b"\r\n");
        assert!(
            raw.windows(want.len()).any(|w| w == want.as_slice()),
            "the answer's header lost its bytes: {}",
            String::from_utf8_lossy(&raw[..raw.len().min(800)])
        );
        assert!(resp.header("x-ratelimit-remaining-requests").is_some());
        // The mock records a value that is not UTF-8 one char per byte.
        let sent = gw.mock.last_request().unwrap();
        assert_eq!(sent.header("x-client-note"), Some("caf\u{e9}\u{ff}"));
        let line = gw.line(consumer);
        assert_eq!(line["usage_source"], "provider", "{line}");
        assert_eq!(line["input_tokens"], 4, "{line}");
    }
}

#[test]
fn look_alike_paths_are_not_metered_as_llm_calls() {
    let gw = gateway();
    // OpenAI Assistants: adds a message to a thread, answered 200 by the
    // mock; it ends like Anthropic's /v1/messages but uses no tokens.
    let resp = gw.post(
        "/v1/threads/thread_1/messages",
        "assistants",
        &[],
        r#"{"role":"user","content":"one two three four"}"#,
    );
    assert_eq!(resp.status, 200, "{}", resp.text());
    let line = gw.line("assistants");
    assert_eq!(line["status"], 200, "{line}");
    assert_eq!(line["usage_source"], "none", "{line}");
    for field in [
        "provider",
        "operation",
        "model",
        "input_tokens",
        "output_tokens",
        "total_tokens",
        "cost_usd",
    ] {
        assert!(line[field].is_null(), "{field}: {line}");
    }
}

#[test]
fn an_unreachable_upstream_gets_an_openai_shaped_error() {
    // Nothing listens on 127.0.0.254 (all of 127/8 is loopback, only
    // 127.0.0.1 is used), so no other test can bind this port in between.
    let envoy = Envoy::start("envoy/gateway.yaml", ([127, 0, 0, 254], 9).into()).unwrap();
    let resp = client::post(
        envoy.addr(),
        "/v1/chat/completions",
        &[("x-aigw-consumer", "nobody-home")],
        &chat(None),
    )
    .unwrap();
    assert_eq!(resp.status, 503);
    let err = resp.json();
    assert_eq!(err["error"]["type"], "gateway_error", "{}", resp.text());
    // Envoy's own words for a refused connection, not a made-up message.
    let code = err["error"]["code"].as_str().unwrap_or_default();
    assert!(
        code.starts_with("upstream_reset_before_response_started"),
        "{}",
        resp.text()
    );
    assert!(
        err["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("connection")),
        "{}",
        resp.text()
    );
    let line = envoy.log_line("nobody-home").unwrap();
    assert_eq!(line["status"], 503);
    assert_eq!(line["usage_source"], "none");
}

#[test]
fn all_five_modules_chained_pass_requests_and_meter_them_exactly() {
    // The separate modules, whatever shape the suite runs in.
    let yaml =
        std::fs::read_to_string(aigw_tests::harness::root().join("envoy/gateway.yaml")).unwrap();
    let chained = aigw_tests::harness::all_five(&yaml).unwrap();
    let mock = MockLlm::start().unwrap();
    let envoy = Envoy::start_text(&chained, mock.addr()).unwrap();
    // Every module the build produces is loaded, each in its own VM.
    let config = envoy.admin("/config_dump");
    for name in [
        "token-meter",
        "content-screen",
        "rate-limit",
        "prompt-cache",
        "model-router",
    ] {
        assert!(
            config.contains(&format!("{name}.wasm")),
            "{name} is not in the chain"
        );
    }
    for (consumer, body) in [
        ("five-json", chat(None)),
        ("five-stream", chat(Some(Value::Null))),
    ] {
        let headers = [("x-aigw-consumer", consumer), ("x-mock-chunks", "3")];
        let through = client::post(envoy.addr(), "/v1/chat/completions", &headers, &body).unwrap();
        assert_eq!(through.status, 200, "{consumer}: {}", through.text());
        let direct = client::post(mock.addr(), "/v1/chat/completions", &headers, &body).unwrap();
        assert_eq!(
            through.text(),
            direct.text(),
            "{consumer}: the answer passes untouched"
        );
        assert_usage(
            &envoy.log_line(consumer).unwrap(),
            consumer,
            (4, 3, Some(0), Some(0)),
        );
    }
    let log = envoy.log_text();
    assert!(!log.contains("invalid configuration"), "{log}");
}

/// gateway.yaml with HTTP/1.1 trailers passed on: Envoy drops them unless
/// both the upstream codec (the cluster's HttpProtocolOptions) and the
/// downstream one (the connection manager's) have `enable_trailers`.
fn with_trailers(yaml: &str) -> String {
    let hcm = "          stat_prefix: aigw\n";
    let cluster = "    connect_timeout: 5s\n";
    assert!(yaml.contains(hcm) && yaml.contains(cluster));
    yaml.replace(
        hcm,
        &format!("{hcm}          http_protocol_options: {{ enable_trailers: true }}\n"),
    )
    .replace(
        cluster,
        &format!(
            "{cluster}    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          http_protocol_options: {{ enable_trailers: true }}
"
        ),
    )
}

fn trailer_cases() -> Vec<(&'static str, String)> {
    vec![
        ("trailer-json", chat(None)),
        (
            "trailer-stream-asked",
            chat(Some(json!({"include_usage": true}))),
        ),
    ]
}

fn send_for_trailers(envoy: &Envoy, consumer: &str, body: &str) -> Response {
    send_for_trailers_with(envoy, consumer, body, &[])
}

fn send_for_trailers_with(
    envoy: &Envoy,
    consumer: &str,
    body: &str,
    knobs: &[(&str, &str)],
) -> Response {
    let mut headers = vec![
        ("x-aigw-consumer", consumer),
        ("x-mock-trailers", "1"),
        ("x-mock-chunks", "3"),
    ];
    headers.extend_from_slice(knobs);
    client::post(envoy.addr(), "/v1/chat/completions", &headers, body).unwrap()
}

#[test]
fn upstream_trailers_reach_the_client_when_enabled() {
    let yaml = aigw_tests::harness::gateway_yaml();
    let mock = MockLlm::start().unwrap();
    let (name, value) = aigw_tests::mock::TRAILER;
    let want = vec![(name.to_string(), value.to_string())];
    for (enabled, yaml) in [(false, yaml.clone()), (true, with_trailers(&yaml))] {
        let envoy = Envoy::start_text(&yaml, mock.addr()).unwrap();
        // The meter reads these answers but does not rewrite them.
        for (consumer, body) in trailer_cases() {
            let consumer = format!("{consumer}-{enabled}");
            let resp = send_for_trailers(&envoy, &consumer, &body);
            assert_eq!(resp.status, 200, "{consumer}: {}", resp.text());
            if enabled {
                assert_eq!(resp.trailers, want, "{consumer}");
            } else {
                assert!(
                    resp.trailers.is_empty(),
                    "{consumer}: Envoy's default drops them"
                );
            }
            let line = envoy.log_line(&consumer).unwrap();
            assert_eq!(line["usage_source"], "provider", "{consumer}: {line}");
        }
    }
}

/// The meter rewrites the stream (it removes the usage it asked for), so it
/// holds back the bytes of an event until it has seen all of it; a stream
/// that ends with an unterminated event leaves them held. After the last body piece
/// only the trailers come, and Envoy lets a filter add body bytes there only
/// into a buffer it paused on: the shell keeps a piece in Envoy's buffer
/// while the stage holds bytes, so nothing is lost.
#[test]
fn upstream_trailers_reach_the_client_when_the_meter_rewrites() {
    let yaml = aigw_tests::harness::gateway_yaml();
    let mock = MockLlm::start().unwrap();
    let envoy = Envoy::start_text(&with_trailers(&yaml), mock.addr()).unwrap();
    // A stream that did not ask for usage: the meter injects it and removes
    // it again on the way back, rewriting the body.
    let body = chat(Some(Value::Null));
    let (name, value) = aigw_tests::mock::TRAILER;
    for (newline, tail) in [
        ("lf", "0"),
        ("crlf", "0"),
        ("cr", "0"),
        ("lf", "1"),
        ("crlf", "1"),
    ] {
        let consumer = format!("trailer-rewritten-{newline}-{tail}");
        let extra = [("x-mock-newline", newline), ("x-mock-sse-tail", tail)];
        let resp = send_for_trailers_with(&envoy, &consumer, &body, &extra);
        assert_eq!(resp.status, 200, "{newline}: {}", resp.text());
        let knobs = [
            ("x-mock-trailers", "1"),
            ("x-mock-chunks", "3"),
            ("x-mock-newline", newline),
            ("x-mock-sse-tail", tail),
        ];
        let direct = client::post(mock.addr(), "/v1/chat/completions", &knobs, &body).unwrap();
        assert_eq!(resp.text(), direct.text(), "{newline}: every byte arrives");
        assert_eq!(
            resp.trailers,
            [(name.to_string(), value.to_string())],
            "{newline}"
        );
        assert_usage(
            &envoy.log_line(&consumer).unwrap(),
            newline,
            (4, 3, Some(0), Some(0)),
        );
    }
}

#[test]
fn a_bad_configuration_is_refused_with_field_and_reason() {
    let yaml = aigw_tests::harness::gateway_yaml();
    let bad = yaml.replace(
        "\"consumer_header\": \"x-aigw-consumer\"",
        "\"consumer_heder\": \"x-aigw-consumer\"",
    );
    assert_ne!(bad, yaml);
    let mock = MockLlm::start().unwrap();
    let err = match Envoy::start_text(&bad, mock.addr()) {
        Ok(_) => panic!("envoy accepted a configuration with a typo"),
        Err(e) => e,
    };
    // The bundle names the stage in front of the field.
    let want = match aigw_tests::harness::gateway_yaml_path() {
        "envoy/gateway-bundle.yaml" => "gateway: invalid configuration: token_meter.consumer_heder: unknown field `consumer_heder`",
        _ => "token-meter: invalid configuration: consumer_heder: unknown field `consumer_heder`",
    };
    assert!(err.contains(want), "{err}");
}

#[test]
fn works_where_request_headers_cannot_be_held() {
    // As under Istio: no allow_on_headers_stop_iteration, hold_request_headers false.
    let yaml = aigw_tests::harness::gateway_yaml();
    let yaml = yaml
        .replace(
            "allow_on_headers_stop_iteration: true",
            "allow_on_headers_stop_iteration: false",
        )
        .replace(
            "\"consumer_header\": \"x-aigw-consumer\",",
            "\"consumer_header\": \"x-aigw-consumer\", \"hold_request_headers\": false,",
        )
        .replace(
            "\"pii\": \"redact\",",
            "\"pii\": \"redact\", \"hold_request_headers\": false,",
        )
        .replace(
            "\"identity\": {",
            "\"hold_request_headers\": false, \"identity\": {",
        )
        // model-router then routes on the request headers alone.
        .replace(
            "\"hold_request_headers\": true,",
            "\"hold_request_headers\": false,",
        );
    assert!(yaml.contains("\"hold_request_headers\": false"));
    let mock = MockLlm::start().unwrap();
    let envoy = Envoy::start_text(&yaml, mock.addr()).unwrap();
    let body = chat(Some(Value::Null));
    let headers = [("x-aigw-consumer", "no-hold"), ("x-mock-chunks", "3")];
    let through = client::post(envoy.addr(), "/v1/chat/completions", &headers, &body).unwrap();
    let seen = mock.last_request().unwrap();
    assert_eq!(seen.header("content-length"), None);
    assert_eq!(seen.header("transfer-encoding"), Some("chunked"));
    let sent: Value = serde_json::from_slice(&seen.body).unwrap();
    assert_eq!(sent["stream_options"]["include_usage"], true);
    let direct = client::post(mock.addr(), "/v1/chat/completions", &headers, &body).unwrap();
    assert_eq!(through.text(), direct.text());
    assert_usage(
        &envoy.log_line("no-hold").unwrap(),
        "no hold",
        (4, 3, Some(0), Some(0)),
    );
}

#[test]
fn oversized_request_bodies_pass_unread() {
    let gw = meter_only();
    // 10 MB of prompt: past the meter's 8 MiB default, under Envoy's 16 MiB buffer.
    let body = json!({"model": "gpt-4o", "stream": true,
                      "messages": [{"role": "user", "content": "word ".repeat(2_000_000)}]})
    .to_string();
    let resp = gw.post(
        "/v1/chat/completions",
        "big-body",
        &[("x-mock-chunks", "2")],
        &body,
    );
    assert_eq!(resp.status, 200, "{}", resp.text());
    let seen = gw.mock.last_request().unwrap();
    assert_eq!(
        seen.body.len(),
        body.len(),
        "the body reaches the upstream untouched"
    );
    let line = gw.line("big-body");
    assert!(line["model_requested"].is_null(), "{line}");
    // Not injected, so the upstream sent no usage: the output is estimated from
    // "w0 w1 " and the unread prompt stays unknown.
    assert_eq!(line["usage_source"], "estimated", "{line}");
    assert_eq!(line["output_tokens"], 2, "{line}");
    assert!(line["input_tokens"].is_null(), "{line}");
}

/// An Envoy that terminates TLS for `localhost` only (a handshake without
/// that SNI finds no filter chain and fails) and passes plain HTTP on.
const TLS_TERMINATOR: &str = r#"
admin:
  address:
    socket_address: { address: 127.0.0.1, port_value: 1 }  # aigw:admin_port
static_resources:
  listeners:
  - name: tls
    address:
      socket_address: { address: 127.0.0.1, port_value: 1 }  # aigw:port
    # Reads the SNI so that filter_chain_match can require it.
    listener_filters:
    - name: envoy.filters.listener.tls_inspector
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector
    filter_chains:
    - filter_chain_match: { server_names: ["localhost"] }
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          common_tls_context:
            tls_certificates:
            - certificate_chain: { filename: CERT }
              private_key: { filename: KEY }
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: tls
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: { prefix: "/" }
                route: { cluster: upstream }
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: upstream
    type: STATIC
    load_assignment:
      cluster_name: upstream
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: { address: 127.0.0.1, port_value: 1 }  # aigw:upstream
"#;

#[test]
fn an_https_upstream_is_reached_with_tls_sni_and_its_host_name() {
    let scratch = aigw_tests::harness::Scratch::new("tls").unwrap();
    let cert = scratch.path().join("localhost.crt");
    let key = scratch.path().join("localhost.key");
    let made = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
        ])
        .args(["-addext", "subjectAltName=DNS:localhost", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl (installed by scripts/setup.sh)");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );

    let mock = MockLlm::start().unwrap();
    let terminator_yaml = TLS_TERMINATOR
        .replace("CERT", &cert.display().to_string())
        .replace("KEY", &key.display().to_string());
    let terminator = Envoy::start_text(&terminator_yaml, mock.addr()).unwrap();
    let gateway_yaml = aigw_tests::harness::gateway_yaml();
    let upstream = format!("https://localhost:{}", terminator.port);
    let gateway = Envoy::start_with(&gateway_yaml, &upstream, Some(&cert)).unwrap();

    for (consumer, body) in [
        ("tls-json", chat(None)),
        ("tls-stream", chat(Some(Value::Null))),
    ] {
        let headers = [
            ("x-aigw-consumer", consumer),
            ("authorization", "Bearer sk-test"),
        ];
        let resp = client::post(gateway.addr(), "/v1/chat/completions", &headers, &body).unwrap();
        assert_eq!(resp.status, 200, "{consumer}: {}", resp.text());
        let seen = mock.last_request().unwrap();
        assert_eq!(
            seen.header("host"),
            Some("localhost"),
            "{consumer}: the upstream's own host name"
        );
        assert_eq!(
            seen.header("authorization"),
            Some("Bearer sk-test"),
            "{consumer}: the client's auth goes through"
        );
        assert_usage(
            &gateway.log_line(consumer).unwrap(),
            consumer,
            (4, 5, Some(0), Some(0)),
        );
    }
}
