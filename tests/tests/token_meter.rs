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
    for (i, c) in cases.iter().enumerate() {
        let consumer = format!("api-{i}");
        let resp = gw.post(c.path, &consumer, &c.knobs, &c.body);
        assert_eq!(resp.status, 200, "{}: {}", c.name, resp.text());
        let line = gw.line(&consumer);
        assert_usage(&line, c.name, c.want);
        assert_eq!(line["stream"], c.stream, "{}", c.name);
        assert_eq!(line["provider"], c.provider, "{}", c.name);
        assert_eq!(line["model"], c.model, "{}", c.name);
        assert_eq!(line["status"], 200, "{}", c.name);
        assert!(line["request_id"].is_string(), "{}", c.name);
        assert!(line["duration_ms"].is_u64(), "{}", c.name);
        assert!(line["ttft_ms"].is_u64(), "{}", c.name);
        // The client still gets a usable answer in the shape it asked for.
        if c.stream {
            let text = resp.text();
            assert!(
                text.contains("w0 ") && text.contains("w2 "),
                "{}: {text}",
                c.name
            );
        } else {
            assert!(resp.json().is_object(), "{}", c.name);
        }
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
    let gw = gateway();
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
        assert!(
            resp.json().get("error").is_some(),
            "{consumer}: the provider's error reaches the client: {}",
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
    let gw = gateway();
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
fn metrics_by_model_and_consumer() {
    let gw = gateway();
    for _ in 0..2 {
        gw.post(
            "/v1/chat/completions",
            "metrics-a",
            &[("x-mock-chunks", "3")],
            &chat(None),
        );
    }
    gw.post(
        "/v1/chat/completions",
        "metrics-a",
        &[("x-mock-chunks", "3"), ("x-mock-ttft-ms", "30")],
        &chat(Some(Value::Null)),
    );
    gw.post("/v1/messages", "metrics-b", &[("x-mock-chunks", "2")], &json!({"model": "claude-sonnet-4-5", "max_tokens": 9, "messages": [{"role": "user", "content": PROMPT}]}).to_string());
    gw.line("metrics-b");
    let m = |name: &str, labels: &[(&str, &str)]| gw.envoy.metric(name, labels);
    let a = [("model", "gpt-4o"), ("consumer", "metrics-a")];
    let tokens = |labels: &[(&str, &str)], t: &str| {
        let mut l = labels.to_vec();
        l.push(("token_type", t));
        m("aigw_tokens_total", &l)
    };
    assert_eq!(tokens(&a, "input"), Some(12.0));
    assert_eq!(tokens(&a, "output"), Some(9.0));
    assert_eq!(tokens(&a, "cached_input"), Some(0.0));
    let b = [("model", "claude-sonnet-4-5"), ("consumer", "metrics-b")];
    assert_eq!(tokens(&b, "input"), Some(4.0));
    assert_eq!(tokens(&b, "output"), Some(2.0));
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
    assert!(m(
        "gen_ai_server_time_per_output_token_ms_count",
        &[("model", "gpt-4o")]
    )
    .is_some());
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
    assert_eq!(gw.envoy.metric("aigw_tokens_total", &labels), Some(64.0));
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

#[test]
fn an_unreachable_upstream_gets_an_openai_shaped_error() {
    let port = aigw_tests::harness::free_port().unwrap();
    let envoy = Envoy::start("envoy/gateway.yaml", ([127, 0, 0, 1], port).into()).unwrap();
    let resp = client::post(
        envoy.addr(),
        "/v1/chat/completions",
        &[("x-aigw-consumer", "nobody-home")],
        &chat(None),
    )
    .unwrap();
    assert_eq!(resp.status, 503);
    let err = resp.json();
    assert!(err["error"]["message"].is_string(), "{}", resp.text());
    assert_eq!(err["error"]["type"], "gateway_error");
    let line = envoy.log_line("nobody-home").unwrap();
    assert_eq!(line["status"], 503);
    assert_eq!(line["usage_source"], "none");
}

#[test]
fn a_bad_configuration_is_refused_with_field_and_reason() {
    let yaml =
        std::fs::read_to_string(aigw_tests::harness::root().join("envoy/gateway.yaml")).unwrap();
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
    assert!(
        err.contains(
            "token-meter: invalid configuration: consumer_heder: unknown field `consumer_heder`"
        ),
        "{err}"
    );
}

#[test]
fn works_where_request_headers_cannot_be_held() {
    // As under Istio: no allow_on_headers_stop_iteration, hold_request_headers false.
    let yaml =
        std::fs::read_to_string(aigw_tests::harness::root().join("envoy/gateway.yaml")).unwrap();
    let yaml = yaml
        .replace(
            "allow_on_headers_stop_iteration: true",
            "allow_on_headers_stop_iteration: false",
        )
        .replace(
            "\"consumer_header\": \"x-aigw-consumer\",",
            "\"consumer_header\": \"x-aigw-consumer\", \"hold_request_headers\": false,",
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
    let gw = gateway();
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
    let gateway_yaml =
        std::fs::read_to_string(aigw_tests::harness::root().join("envoy/gateway.yaml")).unwrap();
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
