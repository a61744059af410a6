use super::*;
use crate::boundary::{FakeClock, FakeFilterState, FakeMetrics};
use crate::stage::LogValues;
use proptest::prelude::*;
use std::io::Write;

fn meter(config: &str) -> Rc<Meter> {
    Rc::new(Meter::from_json(config.as_bytes()).unwrap())
}

/// What one request through the stage left behind.
struct Run {
    state: FakeFilterState,
    metrics: FakeMetrics,
    upstream_body: Vec<u8>,
    request_edits: HeaderEdits,
    response_edits: HeaderEdits,
    client_body: Vec<u8>,
}

impl Run {
    fn line(&self) -> serde_json::Value {
        serde_json::from_str(self.state.text(facts::ACCESS_LOG).unwrap()).unwrap()
    }
}

struct Exchange<'a> {
    path: &'a str,
    request_headers: Vec<(&'a str, &'a str)>,
    body: &'a str,
    status: &'a str,
    response_headers: Vec<(&'a str, &'a str)>,
    chunks: Vec<Vec<u8>>,
    /// The upstream ended the response (false: cut mid-way).
    complete: bool,
}

impl Default for Exchange<'_> {
    fn default() -> Self {
        Exchange {
            path: "/v1/chat/completions",
            request_headers: vec![],
            body: r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hello there world"}]}"#,
            status: "200",
            response_headers: vec![("content-type", "application/json")],
            chunks: vec![],
            complete: true,
        }
    }
}

/// Header changes as the host applies them (sets and removals, in order).
#[derive(Debug, Default)]
struct HeaderEdits {
    set: Vec<(String, String)>,
    remove: Vec<String>,
}

impl HeaderEdits {
    fn add(&mut self, edits: Vec<crate::stage::Edit>) {
        for e in edits {
            match e {
                crate::stage::Edit::Set(k, v) => self.set.push((k, v)),
                crate::stage::Edit::Remove(k) => self.remove.push(k),
            }
        }
    }
}

fn run_with(meter: &Rc<Meter>, ex: Exchange<'_>, mut state: FakeFilterState) -> Run {
    let clock = FakeClock::at(1_000);
    let mut metrics = FakeMetrics::default();
    let mut shared = crate::boundary::FakeSharedData::default();
    let mut callouts = crate::boundary::FakeCallouts::default();
    let mut stage = MeterStage::new(Rc::clone(meter));
    let mut env = Env {
        clock: &clock,
        state: &mut state,
        metrics: &mut metrics,
        shared: &mut shared,
        callouts: &mut callouts,
    };
    let mut req: Vec<(String, String)> = vec![
        (":method".into(), "POST".into()),
        (":path".into(), ex.path.into()),
    ];
    req.extend(
        ex.request_headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    // As Envoy has it for a request with a body.
    if !ex.body.is_empty() && !req.iter().any(|(k, _)| k == "content-length") {
        req.push(("content-length".into(), ex.body.len().to_string()));
    }
    let mut request_edits = HeaderEdits::default();
    let mut headers = Headers::new(req);
    let step = stage.request_headers(&mut env, &mut headers, false);
    request_edits.add(headers.take_edits());
    let mut upstream_body = ex.body.as_bytes().to_vec();
    if let Step::ReadBody { hold_headers } = step {
        let mut body = RequestBody::new(ex.body.as_bytes().to_vec());
        stage.request_body(&mut env, &mut body, &mut headers);
        if body.is_changed() {
            upstream_body = body.bytes().to_vec();
            // As the host adapter does while the headers are held.
            if hold_headers {
                headers.set("content-length", upstream_body.len().to_string());
            }
        }
        request_edits.add(headers.take_edits());
    }
    clock.advance(100);
    let mut resp: Vec<(String, String)> = vec![(":status".into(), ex.status.into())];
    resp.extend(
        ex.response_headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    let mut response_edits = HeaderEdits::default();
    let mut rh = Headers::new(resp);
    stage.response_headers(&mut env, &mut rh, false);
    response_edits.add(rh.take_edits());
    let mut client_body = Vec::new();
    let n = ex.chunks.len();
    for (i, chunk) in ex.chunks.iter().enumerate() {
        clock.advance(10);
        let last = ex.complete && i + 1 == n;
        let mut c = Chunk::new(chunk.clone());
        stage.response_body(&mut env, &mut c, last);
        client_body.extend_from_slice(c.bytes());
    }
    if ex.complete && n == 0 {
        stage.response_body(&mut env, &mut Chunk::default(), true);
    }
    let status = ex.status.parse().ok();
    stage.log(
        &mut env,
        &LogValues {
            request_id: Some("req-1".into()),
            status,
            duration_ms: None,
            route_name: Some("llm".into()),
        },
    );
    // As the filter's timer tick does: counters reach the host on a flush.
    meter.registry.borrow_mut().flush(&mut metrics);
    Run {
        state,
        metrics,
        upstream_body,
        request_edits,
        response_edits,
        client_body,
    }
}

fn run(meter: &Rc<Meter>, ex: Exchange<'_>) -> Run {
    run_with(meter, ex, FakeFilterState::default())
}

fn sse(events: &[&str]) -> Vec<u8> {
    events
        .iter()
        .map(|e| format!("data: {e}\n\n"))
        .collect::<String>()
        .into_bytes()
}

const CHAT_JSON: &str = r#"{"id":"c","object":"chat.completion","model":"gpt-4o-2024-08-06","choices":[{"index":0,"message":{"role":"assistant","content":"w0 w1 "},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5,"prompt_tokens_details":{"cached_tokens":1},"completion_tokens_details":{"reasoning_tokens":0}}}"#;

/// An OpenAI stream as the provider sends it when include_usage is on.
fn chat_stream_with_usage() -> Vec<u8> {
    sse(&[
        r#"{"id":"c","object":"chat.completion.chunk","model":"gpt-4o","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}],"usage":null}"#,
        r#"{"id":"c","object":"chat.completion.chunk","model":"gpt-4o","choices":[{"index":0,"delta":{"content":"w0 "},"finish_reason":null}],"usage":null}"#,
        r#"{"id":"c","object":"chat.completion.chunk","model":"gpt-4o","choices":[{"index":0,"delta":{"content":"w1 "},"finish_reason":null}],"usage":null}"#,
        r#"{"id":"c","object":"chat.completion.chunk","model":"gpt-4o","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":null}"#,
        r#"{"id":"c","object":"chat.completion.chunk","model":"gpt-4o","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}"#,
        "[DONE]",
    ])
}

/// The same stream as the client would have had without include_usage.
fn chat_stream_plain() -> Vec<u8> {
    sse(&[
        r#"{"id":"c","object":"chat.completion.chunk","model":"gpt-4o","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#,
        r#"{"id":"c","object":"chat.completion.chunk","model":"gpt-4o","choices":[{"index":0,"delta":{"content":"w0 "},"finish_reason":null}]}"#,
        r#"{"id":"c","object":"chat.completion.chunk","model":"gpt-4o","choices":[{"index":0,"delta":{"content":"w1 "},"finish_reason":null}]}"#,
        r#"{"id":"c","object":"chat.completion.chunk","model":"gpt-4o","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#,
        "[DONE]",
    ])
}

const STREAM_BODY: &str = r#"{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hello there world"}]}"#;

fn sse_headers() -> Vec<(&'static str, &'static str)> {
    vec![("content-type", "text/event-stream")]
}

/// A streaming chat request without stream_options, answered by `chunks`.
fn streamed(chunks: Vec<Vec<u8>>) -> Exchange<'static> {
    Exchange {
        body: STREAM_BODY,
        response_headers: sse_headers(),
        chunks,
        ..Exchange::default()
    }
}

fn tokens(
    line: &serde_json::Value,
) -> (
    serde_json::Value,
    serde_json::Value,
    serde_json::Value,
    serde_json::Value,
) {
    (
        line["input_tokens"].clone(),
        line["output_tokens"].clone(),
        line["cached_input_tokens"].clone(),
        line["usage_source"].clone(),
    )
}

/// (input, output, no cached count, source) as `tokens` returns it.
fn counted(
    io: &[u64; 2],
    source: &str,
) -> (
    serde_json::Value,
    serde_json::Value,
    serde_json::Value,
    serde_json::Value,
) {
    (
        io[0].into(),
        io[1].into(),
        serde_json::Value::Null,
        source.into(),
    )
}

#[test]
fn meters_a_json_response() {
    let m = meter(r#"{"prices":{"gpt-4o":{"input":2.5,"cached_input":1.25,"output":10}}}"#);
    let r = run(
        &m,
        Exchange {
            request_headers: vec![
                ("x-aigw-consumer", "alice"),
                ("accept-encoding", "gzip, br"),
            ],
            chunks: vec![CHAT_JSON.as_bytes().to_vec()],
            ..Exchange::default()
        },
    );
    let line = r.line();
    assert_eq!(line["consumer"], "alice");
    assert_eq!(line["provider"], "openai");
    assert_eq!(line["operation"], "chat");
    assert_eq!(line["model_requested"], "gpt-4o");
    assert_eq!(line["model"], "gpt-4o-2024-08-06");
    assert_eq!(line["route"], "llm");
    assert_eq!(line["request_id"], "req-1");
    assert_eq!(line["status"], 200);
    assert_eq!(line["stream"], false);
    assert_eq!(line["input_tokens"], 3);
    assert_eq!(line["output_tokens"], 2);
    assert_eq!(line["total_tokens"], 5);
    assert_eq!(line["cached_input_tokens"], 1);
    assert_eq!(line["reasoning_tokens"], 0);
    assert_eq!(line["usage_source"], "provider");
    let cost = line["cost_usd"].as_f64().unwrap();
    assert!(
        (cost - (2.0 * 2.5 + 1.25 + 2.0 * 10.0) / 1e6).abs() < 1e-12,
        "{cost}"
    );
    assert_eq!(line["ttft_ms"], 110);
    assert_eq!(line["duration_ms"], 110);
    for field in ["cache", "ratelimit", "screen"] {
        assert!(line[field].is_null(), "{field}");
    }
    // Identity encoding asked of the upstream; the body goes through untouched.
    assert_eq!(
        r.request_edits.set,
        vec![("accept-encoding".to_string(), "identity".to_string())]
    );
    assert_eq!(r.client_body, CHAT_JSON.as_bytes());
    assert_eq!(
        r.metrics
            .counter("aigw_tokens_total;model=gpt-4o-2024-08-06;consumer=alice;token_type=input"),
        3
    );
    assert_eq!(
        r.metrics
            .counter("aigw_tokens_total;model=gpt-4o-2024-08-06;consumer=alice;token_type=output"),
        2
    );
    assert_eq!(
        r.metrics.counter(
            "aigw_requests_total;model=gpt-4o-2024-08-06;consumer=alice;usage_source=provider"
        ),
        1
    );
    assert_eq!(facts::usage(&r.state).unwrap().input_tokens, Some(3));
    assert_eq!(
        facts::request(&r.state).unwrap().model.as_deref(),
        Some("gpt-4o")
    );
}

#[test]
fn a_stream_that_asked_for_usage_passes_unchanged() {
    let body =
        r#"{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#;
    let r = run(
        &meter(""),
        Exchange {
            body,
            response_headers: sse_headers(),
            chunks: vec![chat_stream_with_usage()],
            ..Exchange::default()
        },
    );
    assert_eq!(r.upstream_body, body.as_bytes());
    assert_eq!(r.client_body, chat_stream_with_usage());
    assert_eq!(tokens(&r.line()), counted(&[3, 2], "provider"));
    assert_eq!(r.line()["stream"], true);
}

#[test]
fn injected_usage_is_metered_and_removed_from_the_client_stream() {
    let r = run(&meter(""), streamed(vec![chat_stream_with_usage()]));
    let sent: serde_json::Value = serde_json::from_slice(&r.upstream_body).unwrap();
    assert_eq!(sent["stream_options"]["include_usage"], true);
    assert_eq!(
        r.request_edits.set,
        vec![(
            "content-length".to_string(),
            r.upstream_body.len().to_string()
        )]
    );
    // A chunked stream has no length to drop; one sent with a length loses it.
    assert!(r.response_edits.remove.is_empty(), "{:?}", r.response_edits);
    assert_eq!(
        String::from_utf8_lossy(&r.client_body),
        String::from_utf8_lossy(&chat_stream_plain())
    );
    let mut with_length = streamed(vec![chat_stream_with_usage()]);
    with_length.response_headers.push(("content-length", "999"));
    let r = run(&meter(""), with_length);
    assert_eq!(r.response_edits.remove, vec!["content-length".to_string()]);
    assert_eq!(r.client_body, chat_stream_plain());
    assert_eq!(tokens(&r.line()), counted(&[3, 2], "provider"));
}

#[test]
fn without_holding_headers_the_length_is_dropped_up_front() {
    let r = run(
        &meter(r#"{"hold_request_headers":false}"#),
        streamed(vec![chat_stream_with_usage()]),
    );
    assert_eq!(r.request_edits.remove, vec!["content-length".to_string()]);
    assert!(r.request_edits.set.is_empty(), "{:?}", r.request_edits);
    assert_ne!(r.upstream_body, STREAM_BODY.as_bytes());
    assert_eq!(r.client_body, chat_stream_plain());
}

#[test]
fn injection_can_be_turned_off() {
    let r = run(
        &meter(r#"{"inject_stream_usage":false}"#),
        streamed(vec![chat_stream_plain()]),
    );
    assert_eq!(r.upstream_body, STREAM_BODY.as_bytes());
    assert_eq!(r.client_body, chat_stream_plain());
    // No usage came: estimated from the prompt (17 bytes) and the 6 bytes of output text.
    assert_eq!(tokens(&r.line()), counted(&[5, 2], "estimated"));
}

proptest! {
    #[test]
    fn any_chunking_gives_the_same_client_bytes_and_usage(cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..40)) {
        let stream = chat_stream_with_usage();
        let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(stream.len())).collect();
        cuts.sort_unstable();
        cuts.dedup();
        let mut chunks = Vec::new();
        let mut prev = 0;
        for c in cuts.into_iter().chain([stream.len()]) {
            chunks.push(stream[prev..c].to_vec());
            prev = c;
        }
        let r = run(&meter(""), Exchange { body: STREAM_BODY, response_headers: sse_headers(), chunks, ..Exchange::default() });
        prop_assert_eq!(&r.client_body, &chat_stream_plain());
        prop_assert_eq!(tokens(&r.line()),
        counted(&[3, 2], "provider"));
    }
}

#[test]
fn one_byte_chunks() {
    let stream = chat_stream_with_usage();
    let r = run(
        &meter(""),
        streamed(stream.chunks(1).map(<[u8]>::to_vec).collect()),
    );
    assert_eq!(r.client_body, chat_stream_plain());
    assert_eq!(tokens(&r.line()), counted(&[3, 2], "provider"));
}

#[test]
fn reads_every_api() {
    struct Case {
        name: &'static str,
        path: &'static str,
        body: &'static str,
        sse: bool,
        response: Vec<u8>,
        want: (u64, u64, Option<u64>, Option<u64>),
        model: &'static str,
    }
    let anthropic_stream = b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"model\":\"claude-sonnet-4-5\",\"usage\":{\"input_tokens\":5,\"cache_creation_input_tokens\":2,\"cache_read_input_tokens\":3,\"output_tokens\":1}}}\n\nevent: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"w0 \"}}\n\nevent: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":7}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n".to_vec();
    let responses_stream = b"event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"model\":\"gpt-4o\",\"usage\":null}}\n\nevent: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"w0 \"}\n\nevent: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"model\":\"gpt-4o\",\"usage\":{\"input_tokens\":4,\"input_tokens_details\":{\"cached_tokens\":2},\"output_tokens\":6,\"output_tokens_details\":{\"reasoning_tokens\":3},\"total_tokens\":10}}}\n\n".to_vec();
    let vllm_stream = sse(&[
        r#"{"model":"llama","choices":[{"index":0,"delta":{"content":"a"},"finish_reason":null}],"usage":{"prompt_tokens":4,"completion_tokens":1,"total_tokens":5}}"#,
        r#"{"model":"llama","choices":[{"index":0,"delta":{"content":"b"},"finish_reason":null}],"usage":{"prompt_tokens":4,"completion_tokens":2,"total_tokens":6}}"#,
        r#"{"model":"llama","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":{"prompt_tokens":4,"completion_tokens":3,"total_tokens":7}}"#,
        "[DONE]",
    ]);
    let cases = vec![
        Case {
            name: "anthropic json",
            path: "/v1/messages",
            body: r#"{"model":"claude-sonnet-4-5","max_tokens":10,"messages":[{"role":"user","content":"hi"}]}"#,
            sse: false,
            response: br#"{"id":"m","type":"message","model":"claude-sonnet-4-5","content":[{"type":"text","text":"w0"}],"usage":{"input_tokens":5,"cache_creation_input_tokens":2,"cache_read_input_tokens":3,"output_tokens":4}}"#.to_vec(),
            want: (10, 4, Some(3), None),
            model: "claude-sonnet-4-5",
        },
        Case {
            name: "anthropic stream",
            path: "/v1/messages",
            body: r#"{"model":"claude-sonnet-4-5","stream":true,"messages":[]}"#,
            sse: true,
            response: anthropic_stream,
            want: (10, 7, Some(3), None),
            model: "claude-sonnet-4-5",
        },
        Case {
            name: "responses stream",
            path: "/v1/responses",
            body: r#"{"model":"gpt-4o","stream":true,"input":"hi"}"#,
            sse: true,
            response: responses_stream,
            want: (4, 6, Some(2), Some(3)),
            model: "gpt-4o",
        },
        Case {
            name: "vllm running totals",
            path: "/v1/chat/completions",
            body: r#"{"model":"llama","stream":true,"stream_options":{"include_usage":true,"continuous_usage_stats":true},"messages":[]}"#,
            sse: true,
            response: vllm_stream,
            want: (4, 3, None, None),
            model: "llama",
        },
        Case {
            name: "embeddings",
            path: "/v1/embeddings",
            body: r#"{"model":"text-embedding-3-small","input":["a b","c"]}"#,
            sse: false,
            response: br#"{"object":"list","data":[{"embedding":[0.1,0.2]}],"model":"text-embedding-3-small","usage":{"prompt_tokens":3,"total_tokens":3}}"#.to_vec(),
            want: (3, 0, None, None),
            model: "text-embedding-3-small",
        },
        Case {
            name: "azure chat",
            path: "/openai/deployments/prod-4o/chat/completions?api-version=2024-10-21",
            body: r#"{"messages":[{"role":"user","content":"hi"}]}"#,
            sse: false,
            response: CHAT_JSON.as_bytes().to_vec(),
            want: (3, 2, Some(1), Some(0)),
            model: "gpt-4o-2024-08-06",
        },
    ];
    for c in cases {
        let headers = if c.sse {
            sse_headers()
        } else {
            vec![("content-type", "application/json")]
        };
        let r = run(
            &meter(""),
            Exchange {
                path: c.path,
                body: c.body,
                response_headers: headers,
                chunks: vec![c.response.clone()],
                ..Exchange::default()
            },
        );
        let line = r.line();
        let (i, o, cached, reasoning) = c.want;
        assert_eq!(line["input_tokens"], i, "{}", c.name);
        assert_eq!(line["output_tokens"], o, "{}", c.name);
        assert_eq!(
            line["cached_input_tokens"],
            serde_json::json!(cached),
            "{}",
            c.name
        );
        assert_eq!(
            line["reasoning_tokens"],
            serde_json::json!(reasoning),
            "{}",
            c.name
        );
        assert_eq!(line["usage_source"], "provider", "{}", c.name);
        assert_eq!(line["model"], c.model, "{}", c.name);
        assert_eq!(r.client_body, c.response, "{}", c.name);
    }
}

#[test]
fn azure_names_its_deployment_and_provider() {
    let r = run(
        &meter(""),
        Exchange {
            path: "/openai/deployments/prod-4o/chat/completions?api-version=2024-10-21",
            body: r#"{"messages":[]}"#,
            chunks: vec![br#"{"usage":{"prompt_tokens":1,"completion_tokens":1}}"#.to_vec()],
            ..Exchange::default()
        },
    );
    let line = r.line();
    assert_eq!(line["provider"], "azure");
    assert_eq!(line["model_requested"], "prod-4o");
    assert_eq!(line["model"], "prod-4o");
}

#[test]
fn errors_are_never_usage() {
    for status in ["400", "429", "500", "503"] {
        let r = run(
            &meter(""),
            Exchange {
                status,
                // A body that looks like usage must still not count.
                chunks: vec![br#"{"error":{"message":"x"},"usage":{"prompt_tokens":9,"completion_tokens":9}}"#.to_vec()],
                ..Exchange::default()
            },
        );
        let line = r.line();
        assert_eq!(line["status"], status.parse::<u16>().unwrap());
        assert_eq!(
            tokens(&line),
            (
                serde_json::Value::Null,
                serde_json::Value::Null,
                serde_json::Value::Null,
                "none".into()
            ),
            "{status}"
        );
        assert!(line["cost_usd"].is_null());
    }
}

#[test]
fn a_cut_stream_is_estimated_from_what_was_seen() {
    let stream = chat_stream_with_usage();
    // Cut before the usage chunk: the text seen is "w0 w1 " (6 bytes, 2 tokens).
    let cut = memchr::memmem::find(&stream, b"\"stop\"}").unwrap();
    let r = run(
        &meter(""),
        Exchange {
            body: STREAM_BODY,
            response_headers: sse_headers(),
            chunks: vec![stream[..cut].to_vec()],
            complete: false,
            ..Exchange::default()
        },
    );
    let line = r.line();
    assert_eq!(
        tokens(&line),
        (
            5.into(),
            2.into(),
            serde_json::Value::Null,
            "estimated".into()
        )
    );
    assert_eq!(
        r.metrics
            .counter("aigw_requests_total;model=gpt-4o;consumer=unknown;usage_source=estimated"),
        1
    );
}

#[test]
fn nothing_seen_is_none_not_zero() {
    let r = run(
        &meter(""),
        Exchange {
            path: "/v1/models",
            body: "",
            ..Exchange::default()
        },
    );
    let line = r.line();
    assert_eq!(
        tokens(&line),
        (
            serde_json::Value::Null,
            serde_json::Value::Null,
            serde_json::Value::Null,
            "none".into()
        )
    );
    assert!(line["provider"].is_null());
    assert!(r.metrics.counters.is_empty(), "{:?}", r.metrics.counters);
}

#[test]
fn reads_gzip_responses_without_changing_them() {
    let gz = gzip(CHAT_JSON.as_bytes());
    let r = run(
        &meter(""),
        Exchange {
            response_headers: vec![
                ("content-type", "application/json"),
                ("content-encoding", "gzip"),
            ],
            chunks: gz.chunks(5).map(<[u8]>::to_vec).collect(),
            ..Exchange::default()
        },
    );
    assert_eq!(r.client_body, gz);
    assert_eq!(
        tokens(&r.line()),
        (3.into(), 2.into(), 1.into(), "provider".into())
    );
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(data).unwrap();
    gz.finish().unwrap()
}

fn gzipped(content_type: &'static str, body: Vec<u8>, chunk: usize) -> Exchange<'static> {
    Exchange {
        response_headers: vec![("content-type", content_type), ("content-encoding", "gzip")],
        chunks: body.chunks(chunk).map(<[u8]>::to_vec).collect(),
        ..Exchange::default()
    }
}

#[test]
fn compressed_bodies_are_read_within_bounds() {
    // A JSON answer whose usage follows 64 MiB of whitespace, gzipped to ~64 KiB.
    let (head, usage) = CHAT_JSON.split_at(CHAT_JSON.find(",\"usage\"").unwrap());
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(head.as_bytes()).unwrap();
    let spaces = vec![b' '; 1 << 20];
    for _ in 0..64 {
        enc.write_all(&spaces).unwrap();
    }
    enc.write_all(usage.as_bytes()).unwrap();
    let bomb = enc.finish().unwrap();

    // An SSE stream in two gzip members, the usage in the second.
    let stream = chat_stream_with_usage();
    let at = memchr::memmem::find(&stream, b"data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o\",\"choices\":[],").unwrap();
    let two_members = [gzip(&stream[..at]), gzip(&stream[at..])].concat();

    // A JSON answer whose compressed bytes go bad after the usage.
    let mut corrupt = gzip(CHAT_JSON.as_bytes());
    corrupt.truncate(corrupt.len() - 4);
    corrupt.extend_from_slice(b"not a gzip member");

    // The request's estimate: 17 bytes of prompt (plus the role) by the 4-bytes rule.
    let estimated: (serde_json::Value, serde_json::Value) = (5.into(), "estimated".into());
    let cases: Vec<(
        &str,
        Exchange<'static>,
        (serde_json::Value, serde_json::Value),
    )> = vec![
        (
            "bomb, one chunk",
            gzipped("application/json", bomb.clone(), usize::MAX),
            estimated.clone(),
        ),
        (
            "bomb, 1 KiB chunks",
            gzipped("application/json", bomb.clone(), 1024),
            estimated,
        ),
        (
            "two members",
            gzipped("text/event-stream", two_members.clone(), 7),
            (3.into(), "provider".into()),
        ),
        (
            "corrupt after the usage",
            gzipped("application/json", corrupt.clone(), 5),
            (3.into(), "provider".into()),
        ),
    ];
    for (name, ex, (input, source)) in cases {
        let sent = ex.chunks.concat();
        let r = run(&meter(""), ex);
        assert_eq!(
            r.client_body, sent,
            "{name}: the client gets the bytes untouched"
        );
        let line = r.line();
        assert_eq!(line["usage_source"], source, "{name}: {line}");
        assert_eq!(line["input_tokens"], input, "{name}: {line}");
    }
}

#[test]
fn facts_from_other_filters_win() {
    let state = FakeFilterState::default()
        .with(facts::CONSUMER, "team-a")
        .with(
            facts::ROUTE,
            r#"{"target":"fast-tier","reason":"auto:small","provider":"vllm","tier":"small","score":12}"#,
        )
        .with(facts::MODEL_RESPONSE, "gpt-4o-mini-2024-07-18")
        .with(facts::CACHE, "miss")
        .with(facts::RATELIMIT, "allow")
        .with(facts::SCREEN, "pass");
    let r = run_with(
        &meter(""),
        Exchange {
            request_headers: vec![("x-aigw-consumer", "spoofed")],
            chunks: vec![CHAT_JSON.as_bytes().to_vec()],
            ..Exchange::default()
        },
        state,
    );
    let line = r.line();
    assert_eq!(line["consumer"], "team-a");
    assert_eq!(line["provider"], "vllm");
    assert_eq!(line["route"], "fast-tier");
    assert_eq!(line["route_reason"], "auto:small");
    assert_eq!(line["route_tier"], "small");
    assert_eq!(line["route_score"], 12);
    // The router mapped the answer's model back to the alias: the log shows what served.
    assert_eq!(line["model"], "gpt-4o-mini-2024-07-18");
    assert_eq!(line["cache"], "miss");
    assert_eq!(line["ratelimit"], "allow");
    assert_eq!(line["screen"], "pass");
}

#[test]
fn strips_null_usage_members() {
    let cases: &[(&str, &str)] = &[
        (r#"data: {"a":1,"usage":null}"#, r#"data: {"a":1}"#),
        (r#"data: {"usage":null,"a":1}"#, r#"data: {"a":1}"#),
        (r#"data: {"a":1 , "usage" : null }"#, r#"data: {"a":1  }"#),
        (
            r#"data: {"a":"\"usage\":null"}"#,
            r#"data: {"a":"\"usage\":null"}"#,
        ),
        (
            r#"data: {"usage":{"x":null}}"#,
            r#"data: {"usage":{"x":null}}"#,
        ),
        // A nested `"usage":null` (a tool's argument object, a provider's
        // extension) is the provider's, not the meter's: only the top-level
        // member goes.
        (
            r#"data: {"x":{"usage":null},"usage":null}"#,
            r#"data: {"x":{"usage":null}}"#,
        ),
        (
            r#"data: {"choices":[{"delta":{"usage":null}}],"a":1,"usage":null}"#,
            r#"data: {"choices":[{"delta":{"usage":null}}],"a":1}"#,
        ),
        (
            r#"data: {"a":"usage","usage":null}"#,
            r#"data: {"a":"usage"}"#,
        ),
        (
            r#"data: {"x":{"usage":null},"a":1}"#,
            r#"data: {"x":{"usage":null},"a":1}"#,
        ),
        (
            r#"data: {"k\"":"{\"usage\":null","usage":null}"#,
            r#"data: {"k\"":"{\"usage\":null"}"#,
        ),
    ];
    for (raw, want) in cases {
        assert_eq!(
            String::from_utf8(without_null_usage(raw.as_bytes())).unwrap(),
            *want,
            "{raw}"
        );
        // The look at the end finds what the walk finds, or leaves it to it.
        let data = raw.strip_prefix("data: ").unwrap().as_bytes();
        let cut = |(a, b): (usize, usize)| [&data[..a], &data[b..]].concat();
        let span = null_usage_span(data);
        assert_eq!(span.map(cut), walked_null_usage(data).map(cut), "{raw}");
        assert_eq!(
            span.map_or(data.to_vec(), cut),
            want.strip_prefix("data: ").unwrap().as_bytes(),
            "{raw}"
        );
        if let Some(fast) = trailing_null_usage(data) {
            assert_eq!(Some(fast), walked_null_usage(data), "{raw}");
        }
    }
    let raw = b"data: {\"a\":1,\"usage\":null}\n\n";
    assert_eq!(data_offset(raw, &raw[6..raw.len() - 2]), Some(6));
    assert_eq!(data_offset(raw, b"{\"a\":1}"), None);
}

#[test]
fn rejects_bad_configuration_with_field_and_reason() {
    let cases: &[(&str, &str, &str)] = &[
        (
            r#"{"consumer_heder":"x"}"#,
            "consumer_heder",
            "unknown field `consumer_heder`",
        ),
        (
            r#"{"consumer_header":"X-Team"}"#,
            "consumer_header",
            "lower-case",
        ),
        (r#"{"max_event_bytes":10}"#, "max_event_bytes", "outside"),
        (
            r#"{"max_inflated_bytes":100}"#,
            "max_inflated_bytes",
            "outside",
        ),
        (
            r#"{"max_request_body_bytes":1}"#,
            "max_request_body_bytes",
            "outside",
        ),
        (
            r#"{"prices":{"m":{"input":1}}}"#,
            "prices.m",
            "missing field `output`",
        ),
        (
            r#"{"prices":{"m":{"input":1,"output":-2}}}"#,
            "prices.m.output",
            "not a price",
        ),
        (
            r#"{"inject_stream_usage":"yes"}"#,
            "inject_stream_usage",
            "invalid type",
        ),
        (
            r#"{"max_metric_series":0}"#,
            "max_metric_series",
            "at least 1",
        ),
        (r#"{"provider":""}"#, "provider", "1 to 64"),
    ];
    for (config, field, reason) in cases {
        let err = Meter::from_json(config.as_bytes()).unwrap_err();
        assert_eq!(err.field, *field, "{config}: {err}");
        assert!(err.reason.contains(reason), "{config}: {err}");
    }
    assert!(Meter::from_json(b"").is_ok());
    assert!(Meter::from_json(b"{}").is_ok());
}

/// Arbitrary bytes, cut anywhere, with a stream of events that look almost right.
fn garbage() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..40),
        Just(b"data: ".to_vec()),
        Just(b"\n\n".to_vec()),
        Just(b"\r".to_vec()),
        Just(b"event: message_delta\n".to_vec()),
        Just(br#"{"usage":{"prompt_tokens":18446744073709551615,"completion_tokens":-1}}"#.to_vec()),
        Just(br#"{"choices":[],"usage":null,"model":7}"#.to_vec()),
        Just(br#"{"type":"response.completed","response":{"usage":{"input_tokens":"x"}}}"#.to_vec()),
        Just(b"[DONE]".to_vec()),
        Just(br#""usage":null,"#.to_vec()),
        Just(b"\n\ndata: ".to_vec()),
        Just(br#"{"type":"message_delta","usage":{"input_tokens":18446744073709551615,"cache_read_input_tokens":18446744073709551615,"output_tokens":18446744073709551615}}"#.to_vec()),
    ];
    proptest::collection::vec(piece, 0..30).prop_map(|p| p.concat())
}

proptest! {
    #[test]
    fn garbage_never_panics_and_passes_through(
        body in garbage(),
        request in garbage(),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..10),
        sse in any::<bool>(),
        complete in any::<bool>(),
        path in prop_oneof![Just("/v1/chat/completions"), Just("/v1/messages"), Just("/v1/responses")],
    ) {
        let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(body.len() + 1)).collect();
        cuts.sort_unstable();
        let mut chunks = Vec::new();
        let mut prev = 0;
        for c in cuts.into_iter().chain([body.len()]) {
            chunks.push(body[prev..c].to_vec());
            prev = c;
        }
        let request = String::from_utf8_lossy(&request).into_owned();
        let content_type = if sse { "text/event-stream" } else { "application/json" };
        let r = run(&meter(""), Exchange {
            path,
            body: &request,
            response_headers: vec![("content-type", content_type)],
            chunks,
            complete,
            ..Exchange::default()
        });
        // Nothing was injected into a body that is not JSON, so nothing is rewritten.
        if serde_json::from_str::<serde_json::Value>(&request).is_err() {
            prop_assert_eq!(&r.client_body, &body);
        }
        let line = r.line();
        prop_assert!(["provider", "estimated", "none"].contains(&line["usage_source"].as_str().unwrap()));
    }
}

#[test]
fn a_model_another_filter_read_elsewhere_is_the_model_requested() {
    // model-router read it from a header: the body names none.
    let state = FakeFilterState::default().with(
        facts::ROUTE,
        r#"{"target":"small","reason":"alias:fast","model_requested":"fast"}"#,
    );
    let r = run_with(
        &meter(""),
        Exchange {
            body: r#"{"messages":[{"role":"user","content":"hi"}]}"#,
            chunks: vec![CHAT_JSON.as_bytes().to_vec()],
            ..Exchange::default()
        },
        state,
    );
    assert_eq!(r.line()["model_requested"], "fast");
}

#[test]
fn usage_is_published_when_the_answer_ends_before_any_log_phase() {
    let meter = meter("");
    let clock = FakeClock::at(1_000);
    let mut state = FakeFilterState::default();
    let mut metrics = FakeMetrics::default();
    let mut shared = crate::boundary::FakeSharedData::default();
    let mut callouts = crate::boundary::FakeCallouts::default();
    let mut env = Env {
        clock: &clock,
        state: &mut state,
        metrics: &mut metrics,
        shared: &mut shared,
        callouts: &mut callouts,
    };
    let mut stage = MeterStage::new(Rc::clone(&meter));
    let mut headers = Headers::new(vec![
        (":method".into(), "POST".into()),
        (":path".into(), "/v1/chat/completions".into()),
    ]);
    stage.request_headers(&mut env, &mut headers, false);
    let mut body = RequestBody::new(br#"{"model":"gpt-4o","messages":[]}"#.to_vec());
    stage.request_body(&mut env, &mut body, &mut headers);
    let mut rh = Headers::new(vec![
        (":status".into(), "200".into()),
        ("content-type".into(), "application/json".into()),
    ]);
    stage.response_headers(&mut env, &mut rh, false);
    let mut chunk = Chunk::new(CHAT_JSON.as_bytes().to_vec());
    stage.response_body(&mut env, &mut chunk, true);
    let usage = facts::usage(env.state).expect("published at the end of the answer");
    assert_eq!(usage.input_tokens, Some(3));
    // The log phase uses the same record and does not write the fact again.
    stage.log(&mut env, &LogValues::default());
    assert!(state.refused.is_empty(), "{:?}", state.refused);
}

/// The serde reading `read_event` replaced: the oracle it must agree with.
#[derive(Deserialize)]
struct EventWire<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(default)]
    usage: Option<WireUsage>,
    #[serde(borrow, default)]
    message: Option<Inner<'a>>,
    #[serde(borrow, default)]
    response: Option<Inner<'a>>,
    #[serde(borrow, default)]
    choices: Option<Vec<ChoiceWire<'a>>>,
    #[serde(default)]
    delta: Option<TextLen>,
}

#[derive(Deserialize)]
struct ChoiceWire<'a> {
    #[serde(default)]
    delta: Option<TextLen>,
    #[serde(default)]
    text: Option<TextLen>,
    #[serde(borrow, default)]
    finish_reason: Option<Cow<'a, str>>,
}

use crate::wire::request::TextLen;

/// What the meter takes from an event, as comparable text.
fn summary(
    (kind, model, usage): (Option<&str>, Option<&str>, Option<&WireUsage>),
    inner: [&Option<Inner<'_>>; 2],
    choices: Option<(usize, bool)>,
    text: u64,
) -> String {
    let models = inner.map(|i| i.as_ref().and_then(|i| i.model.as_deref()));
    let usages = inner.map(|i| i.as_ref().and_then(|i| i.usage.as_ref()));
    format!("{kind:?} {model:?} {usage:?} {models:?} {usages:?} {choices:?} {text}")
}

fn walked(data: &[u8]) -> Option<String> {
    let ev = read_event(data)?;
    Some(summary(
        (ev.kind.as_deref(), ev.model.as_deref(), ev.usage.as_ref()),
        [&ev.message, &ev.response],
        ev.choices,
        ev.text_bytes,
    ))
}

fn by_serde(data: &[u8]) -> Option<String> {
    let ev = serde_json::from_slice::<EventWire<'_>>(data).ok()?;
    let choices = ev
        .choices
        .as_ref()
        .map(|c| (c.len(), c.iter().any(|c| c.finish_reason.is_some())));
    let len = |t: &Option<TextLen>| t.as_ref().map_or(0, |d| d.0);
    let text = len(&ev.delta)
        + ev.choices
            .iter()
            .flatten()
            .map(|c| len(&c.delta) + len(&c.text))
            .sum::<u64>();
    Some(summary(
        (ev.kind.as_deref(), ev.model.as_deref(), ev.usage.as_ref()),
        [&ev.message, &ev.response],
        choices,
        text,
    ))
}

#[test]
fn events_are_read_as_serde_read_them() {
    for data in [
        r#"{"id":"c","object":"chat.completion.chunk","created":1,"model":"gpt-4o","choices":[{"index":0,"delta":{"role":"assistant","content":"w0 "},"finish_reason":null}],"usage":null}"#,
        r#"{"choices":[],"usage":{"prompt_tokens":200,"completion_tokens":5,"total_tokens":205,"prompt_tokens_details":{"cached_tokens":3}}}"#,
        r#"{"choices":[{"index":0,"text":"a\nb\u00e9","finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":2}}"#,
        r#"{"type":"message_start","message":{"id":"m","model":"claude-sonnet-4-5","usage":{"input_tokens":10,"output_tokens":1}}}"#,
        r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi there"}}"#,
        r#"{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":7}}"#,
        r#"{"type":"response.completed","response":{"model":"gpt-4o","output":[{"content":[{"text":"long"}]}],"usage":{"input_tokens":3,"output_tokens":4,"output_tokens_details":{"reasoning_tokens":1}}}}"#,
        r#"{"choices":[{"delta":{"tool_calls":[{"function":{"arguments":"{\"a\":1}"}}]}}]}"#,
        r#"{"\u006dodel":"m\u00e9","choices":null,"delta":null}"#,
        r#"{"model":7}"#,
        r#"{"\ud800x":1,"model":"m"}"#,
        r#"{"usage":{"prompt_tokens":"x"}}"#,
        r#"{"choices":{}}"#,
        r#"{"choices":[{"finish_reason":1}]}"#,
        r#"{"model":"m","choices":[]} trailing"#,
        r#"{"model":"m""#,
        "{}",
    ] {
        assert_eq!(walked(data.as_bytes()), by_serde(data.as_bytes()), "{data}");
    }
}

/// Events built from the members the meter reads and some it does not,
/// each value of the right type, of a wrong one or broken.
fn event() -> impl Strategy<Value = Vec<u8>> {
    let text = prop_oneof![
        Just(r#""w0 ""#.to_string()),
        Just(r#""a\n\u00e9\ud83d\ude00""#.to_string()),
        Just(r#"{"content":"x","role":"assistant","refusal":null}"#.to_string()),
        Just(r#"[{"text":"ab"},"c",3]"#.to_string()),
        Just("null".to_string()),
        Just("12".to_string()),
    ];
    let choice = (
        text.clone(),
        text.clone(),
        prop_oneof![Just("null"), Just(r#""stop""#), Just("1")],
    )
        .prop_map(|(d, t, f)| {
            format!(r#"{{"index":0,"delta":{d},"text":{t},"finish_reason":{f}}}"#)
        });
    let usage = prop_oneof![
        Just("null"),
        Just(r#"{"prompt_tokens":2,"completion_tokens":3}"#),
        Just(r#"{"input_tokens":2,"cache_read_input_tokens":1}"#),
        Just(r#"{"prompt_tokens":-1}"#),
        Just("[]"),
    ];
    let member = prop_oneof![
        Just(r#""id":"chatcmpl-1""#.to_string()),
        prop_oneof![
            Just(r#""gpt-4o""#),
            Just("null"),
            Just("5"),
            Just(r#""m\u00e9""#)
        ]
        .prop_map(|m| format!(r#""model":{m}"#)),
        prop_oneof![
            Just(r#""message_delta""#),
            Just(r#""response.completed""#),
            Just("null")
        ]
        .prop_map(|k| format!(r#""type":{k}"#)),
        usage.clone().prop_map(|u| format!(r#""usage":{u}"#)),
        usage
            .clone()
            .prop_map(|u| format!(r#""message":{{"model":"claude","usage":{u}}}"#)),
        usage.prop_map(|u| format!(r#""response":{{"usage":{u},"output":[]}}"#)),
        prop::collection::vec(choice, 0..3).prop_map(|c| format!(r#""choices":[{}]"#, c.join(","))),
        Just(r#""choices":null"#.to_string()),
        text.prop_map(|t| format!(r#""delta":{t}"#)),
        Just(r#""system_fingerprint":"fp_1","created":17e2"#.to_string()),
    ];
    crate::wire::walk::objects_sometimes_broken(member, 6)
}

proptest! {
    #[test]
    fn any_event_is_read_as_serde_reads_it(data in event()) {
        prop_assert_eq!(walked(&data), by_serde(&data), "{}", String::from_utf8_lossy(&data));
    }
}
