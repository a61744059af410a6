//! The cache stage through whole exchanges over the fakes.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::*;
use crate::boundary::Sent;
use crate::exchange::{no_service, Exchange, Host, Outcome as Out};

const CHAT: &str = "/v1/chat/completions";

fn cache(json: &str) -> Rc<Cache> {
    Rc::new(Cache::from_json(json.as_bytes()).unwrap_or_else(|e| panic!("{e}")))
}

fn body(extra: &str) -> String {
    format!(
        r#"{{"model":"gpt-4o","temperature":0{extra},"messages":[{{"role":"user","content":"one two"}}]}}"#
    )
}

fn answer(finish: &str) -> Vec<u8> {
    format!(
        r#"{{"id":"c1","object":"chat.completion","created":1,"model":"gpt-4o","choices":[{{"index":0,"message":{{"role":"assistant","content":"w0 w1 "}},"logprobs":null,"finish_reason":"{finish}"}}],"usage":{{"prompt_tokens":2,"completion_tokens":2,"total_tokens":4}}}}"#
    )
    .into_bytes()
}

fn ask(consumer: &str, body: &str) -> Exchange {
    Exchange::post(CHAT, body)
        .header("x-aigw-consumer", consumer)
        .answer(200, "application/json", vec![answer("stop")])
}

fn run(host: &mut Host, c: &Rc<Cache>, ex: &Exchange) -> Out {
    let mut stage = CacheStage::new(Rc::clone(c));
    let out = host.run(&mut stage, ex, &mut no_service);
    // As the filter's timer does: counters reach the host on a flush.
    host.tick(&**c);
    out
}

fn said(out: &Out) -> Option<&str> {
    out.client_headers.get("x-aigw-cache")
}

#[test]
fn a_repeated_question_is_answered_here_and_scoped_to_its_consumer() {
    let c = cache("");
    let mut host = Host::at(1_000_000);
    let first = run(&mut host, &c, &ask("alice", &body("")));
    assert!(first.upstream.is_some());
    assert_eq!(said(&first), Some("miss"));
    assert_eq!(first.state.text(facts::CACHE), Some("miss"));

    host.clock.advance(3_000);
    let again = run(
        &mut host,
        &c,
        &ask("alice", &body(r#","user":"u1","stream":false"#)),
    );
    assert!(again.upstream.is_none(), "a hit never goes upstream");
    assert_eq!(again.client_status, 200);
    assert_eq!(said(&again), Some("hit"));
    assert_eq!(again.client_headers.get("age"), Some("3"));
    assert_eq!(again.client_body, answer("stop"));
    assert_eq!(again.state.text(facts::CACHE), Some("hit"));
    assert!(again.state.refused.is_empty());

    let bob = run(&mut host, &c, &ask("bob", &body("")));
    assert_eq!(said(&bob), Some("miss"), "another tenant never shares");
    let hotter = run(&mut host, &c, &ask("alice", &body(r#","top_p":0.5"#)));
    assert_eq!(
        said(&hotter),
        Some("miss"),
        "parameters are part of the key"
    );

    assert_eq!(
        host.metrics.counter("aigw_cache_hits_total;model=gpt-4o"),
        1
    );
    assert_eq!(
        host.metrics.counter("aigw_cache_misses_total;model=gpt-4o"),
        3
    );
    assert_eq!(
        host.metrics.counter("aigw_cache_stores_total;model=gpt-4o"),
        3
    );
    assert_eq!(
        host.metrics
            .counter("aigw_cache_tokens_saved_total;model=gpt-4o"),
        4
    );
}

#[test]
fn a_member_written_twice_keys_as_serde_reads_it() {
    // The in-place reader leaves such a body to serde, which keeps the
    // last of the two: the same entry as the body written once.
    let c = cache("");
    let mut host = Host::at(1_000_000);
    let once = run(&mut host, &c, &ask("alice", &body("")));
    assert_eq!(said(&once), Some("miss"));
    let twice = body("").replacen(
        r#""temperature":0"#,
        r#""temperature":1,"temperature":0"#,
        1,
    );
    let again = run(&mut host, &c, &ask("alice", &twice));
    assert_eq!(said(&again), Some("hit"));
}

#[test]
fn what_is_not_cacheable_is_bypassed_and_never_stored() {
    let c =
        cache(r#"{"max_request_bytes": 2048, "max_temperature": 0.5, "skip_with_tools": true}"#);
    let big = body(&format!(r#","pad":"{}""#, "x".repeat(4096)));
    let cases: Vec<(&str, Exchange)> = vec![
        (
            "no consumer",
            Exchange::post(CHAT, &body("")).answer(200, "application/json", vec![answer("stop")]),
        ),
        ("not json", ask("a", "{not json")),
        ("not an object", ask("a", "[1,2]")),
        ("over the size", ask("a", &big)),
        (
            "hot",
            ask(
                "a",
                &body("").replace("\"temperature\":0", "\"temperature\":0.9"),
            ),
        ),
        (
            "default temperature is 1",
            ask("a", &body("").replace("\"temperature\":0,", "")),
        ),
        (
            "tools",
            ask(
                "a",
                &body(r#","tools":[{"type":"function","function":{"name":"f"}}]"#),
            ),
        ),
        (
            "bypass header",
            ask("a", &body("")).header("x-aigw-cache-bypass", "1"),
        ),
    ];
    for (name, ex) in cases {
        let mut host = Host::default();
        for round in 0..2 {
            let out = run(&mut host, &c, &ex);
            assert!(out.upstream.is_some(), "{name} {round}");
            assert_eq!(said(&out), Some("bypass"), "{name} {round}");
            assert_eq!(out.state.text(facts::CACHE), Some("bypass"), "{name}");
        }
    }
    // Invalid UTF-8 inside a string is not JSON either.
    let mut ex = ask("a", &body(""));
    ex.request_body = b"{\"model\":\"gpt-4o\",\"messages\":[{\"content\":\"\xff\xfe\"}]}".to_vec();
    let mut host = Host::default();
    assert_eq!(said(&run(&mut host, &c, &ex)), Some("bypass"));
    // Not an LLM call: not a word from the cache.
    let mut get = ask("a", "");
    get.method = "GET".into();
    get.path = "/v1/models".into();
    let out = run(&mut host, &c, &get);
    assert_eq!(said(&out), None);
    assert_eq!(out.state.text(facts::CACHE), None);
}

#[test]
fn clients_control_lookup_and_store() {
    let c = cache("");
    let mut host = Host::default();
    let no_store = run(
        &mut host,
        &c,
        &ask("a", &body("")).header("cache-control", "no-store"),
    );
    assert_eq!(said(&no_store), Some("miss"));
    assert_eq!(
        said(&run(&mut host, &c, &ask("a", &body("")))),
        Some("miss"),
        "not stored"
    );
    assert_eq!(said(&run(&mut host, &c, &ask("a", &body("")))), Some("hit"));
    let fresh = run(
        &mut host,
        &c,
        &ask("a", &body("")).header("cache-control", "no-cache"),
    );
    assert!(fresh.upstream.is_some(), "no-cache skips the lookup");
    assert_eq!(said(&fresh), Some("miss"));
}

#[test]
fn only_whole_successful_answers_are_kept() {
    let lenient = cache(r#"{"finish_reasons": ["stop", "length"]}"#);
    let strict = cache("");
    let cases: &[(&str, u16, Vec<u8>, bool, bool)] = &[
        ("length", 200, answer("length"), false, true),
        ("tool calls", 200, answer("tool_calls"), false, false),
        ("an error", 500, answer("stop"), false, false),
        ("rate limited", 429, answer("stop"), false, false),
        ("cut json", 200, answer("stop")[..50].to_vec(), false, false),
    ];
    for (name, status, answer_bytes, strict_keeps, lenient_keeps) in cases {
        for (c, keeps) in [(&strict, strict_keeps), (&lenient, lenient_keeps)] {
            let mut host = Host::default();
            let ex =
                ask("a", &body("")).answer(*status, "application/json", vec![answer_bytes.clone()]);
            run(&mut host, c, &ex);
            let again = run(&mut host, c, &ask("a", &body("")));
            assert_eq!(said(&again) == Some("hit"), *keeps, "{name}");
        }
    }
}

fn sse_answer() -> Vec<Vec<u8>> {
    let head = r#""id":"c1","object":"chat.completion.chunk","created":1,"model":"gpt-4o""#;
    vec![
        format!("data: {{{head},\"choices\":[{{\"index\":0,\"delta\":{{\"role\":\"assistant\",\"content\":\"\"}},\"finish_reason\":null}}]}}\n\n").into_bytes(),
        format!("data: {{{head},\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"w0 \"}},\"finish_reason\":null}}]}}\n\ndata: {{{head},\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"w1 \"}}").into_bytes(),
        format!(",\"finish_reason\":null}}]}}\n\ndata: {{{head},\"choices\":[{{\"index\":0,\"delta\":{{}},\"finish_reason\":\"stop\"}}]}}\n\n").into_bytes(),
        format!("data: {{{head},\"choices\":[],\"usage\":{{\"prompt_tokens\":2,\"completion_tokens\":2,\"total_tokens\":4}}}}\n\ndata: [DONE]\n\n").into_bytes(),
    ]
}

#[test]
fn a_streamed_answer_is_stored_as_it_passes_and_replayed_in_either_form() {
    let c = cache("");
    let mut host = Host::default();
    let streamed = r#","stream":true,"stream_options":{"include_usage":true}"#;
    let ex = ask("a", &body(streamed)).answer(200, "text/event-stream", sse_answer());
    let first = run(&mut host, &c, &ex);
    assert_eq!(
        first.client_body,
        sse_answer().concat(),
        "the stream passes untouched"
    );
    assert_eq!(said(&first), Some("miss"));

    let json = run(&mut host, &c, &ask("a", &body("")));
    assert_eq!(said(&json), Some("hit"));
    let v: Value = serde_json::from_slice(&json.client_body).unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "w0 w1 ");
    assert_eq!(v["usage"]["total_tokens"], 4);
    assert_eq!(
        json.client_headers.get("content-type"),
        Some("application/json")
    );

    let sse = run(&mut host, &c, &ask("a", &body(streamed)));
    assert_eq!(
        sse.client_headers.get("content-type"),
        Some("text/event-stream")
    );
    let text = sse.client_text();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(text.contains(r#""usage":{"completion_tokens":2"#), "{text}");
    let no_usage = run(&mut host, &c, &ask("a", &body(r#","stream":true"#)));
    assert!(!no_usage.client_text().contains("usage"));

    // A stream cut before its end, or with an error event, is not kept.
    for broken in [
        sse_answer()[..3].to_vec(),
        vec![
            sse_answer()[0].clone(),
            b"data: {\"error\":{\"message\":\"x\"}}\n\ndata: [DONE]\n\n".to_vec(),
        ],
    ] {
        let mut host = Host::default();
        let mut ex = ask("a", &body(streamed)).answer(200, "text/event-stream", broken);
        ex.complete = true;
        run(&mut host, &c, &ex);
        assert_eq!(
            said(&run(&mut host, &c, &ask("a", &body("")))),
            Some("miss")
        );
    }
}

#[test]
fn entries_expire_and_ttls_may_differ_by_model() {
    let c = cache(r#"{"ttl_seconds": 60, "ttl_by_model": {"gpt-4o-mini": 5}}"#);
    let mut host = Host::at(1_000);
    run(&mut host, &c, &ask("a", &body("")));
    let mini = body("").replace("gpt-4o", "gpt-4o-mini");
    run(&mut host, &c, &ask("a", &mini));
    host.clock.advance(10_000);
    assert_eq!(said(&run(&mut host, &c, &ask("a", &body("")))), Some("hit"));
    assert_eq!(said(&run(&mut host, &c, &ask("a", &mini))), Some("miss"));
    host.clock.advance(60_000);
    assert_eq!(
        said(&run(&mut host, &c, &ask("a", &body("")))),
        Some("miss")
    );
}

#[test]
fn a_failed_upstream_is_answered_with_the_stale_entry() {
    let c = cache(r#"{"ttl_seconds": 10, "stale_on_error": {"window_seconds": 600}}"#);
    let mut host = Host::at(1_000);
    run(&mut host, &c, &ask("a", &body("")));
    host.clock.advance(30_000);
    let error = br#"{"error":{"message":"overloaded"}}"#.to_vec();
    for status in [429, 500, 503, 504] {
        let ex = ask("a", &body("")).answer(status, "application/json", vec![error.clone()]);
        let out = run(&mut host, &c, &ex);
        assert!(
            out.upstream.is_some(),
            "expired: the upstream is asked first"
        );
        assert_eq!(out.client_status, 200, "{status}");
        assert_eq!(said(&out), Some("stale"));
        assert_eq!(out.client_headers.get("age"), Some("30"));
        assert_eq!(out.client_body, answer("stop"));
        assert_eq!(out.state.text(facts::CACHE), Some("stale"));
    }
    // Streaming requests get the stale answer as a stream.
    let ex =
        ask("a", &body(r#","stream":true"#)).answer(502, "application/json", vec![error.clone()]);
    let out = run(&mut host, &c, &ex);
    assert!(out.client_text().ends_with("data: [DONE]\n\n"));
    // A 400 is the client's fault: passed on as it is.
    let ex = ask("a", &body("")).answer(400, "application/json", vec![error.clone()]);
    assert_eq!(run(&mut host, &c, &ex).client_status, 400);
    // Past the window there is nothing to stand in.
    host.clock.advance(700_000);
    let ex = ask("a", &body("")).answer(500, "application/json", vec![error.clone()]);
    let out = run(&mut host, &c, &ex);
    assert_eq!((out.client_status, said(&out)), (500, Some("miss")));
    // Without stale_on_error an error is passed on.
    let plain = cache(r#"{"ttl_seconds": 10}"#);
    let mut host = Host::at(1_000);
    run(&mut host, &plain, &ask("a", &body("")));
    host.clock.advance(30_000);
    let ex = ask("a", &body("")).answer(500, "application/json", vec![error]);
    assert_eq!(run(&mut host, &plain, &ex).client_status, 500);
}

#[test]
fn the_shared_tier_is_asked_after_a_local_miss_and_fails_open() {
    let c = cache(r#"{"redis": {"cluster": "webdis", "timeout_ms": 40}}"#);
    // Another Envoy stored the answer: it is in Redis only.
    let mut other = Host::at(1_000);
    let stored = run(&mut other, &c, &ask("a", &body("")));
    let put = stored
        .callouts
        .iter()
        .find_map(|s| match s {
            Sent::Http(h) if h.headers.iter().any(|(k, v)| k == ":method" && v == "PUT") => {
                Some(h.clone())
            }
            _ => None,
        })
        .expect("a detached store");
    let path = &put.headers.iter().find(|(k, _)| k == ":path").unwrap().1;
    assert!(
        path.starts_with("/SETEX/aigw:cache:") && path.ends_with("/300"),
        "{path}"
    );
    let value = put.body.clone();

    let mut host = Host::at(2_000);
    let mut stage = CacheStage::new(Rc::clone(&c));
    let mut from_redis = |s: &Sent| match s {
        Sent::Http(h) => {
            assert_eq!(h.timeout_ms, 40);
            assert_eq!(h.cluster, "webdis");
            CalloutResponse::Http {
                status: 200,
                headers: vec![],
                body: value.clone(),
            }
        }
        Sent::Grpc(_) => CalloutResponse::Failed,
    };
    let out = host.run(&mut stage, &ask("a", &body("")), &mut from_redis);
    assert_eq!(said(&out), Some("hit"));
    assert!(out.upstream.is_none());
    // Now it is local too: no callout the second time.
    let again = run(&mut host, &c, &ask("a", &body("")));
    assert_eq!(said(&again), Some("hit"));
    assert!(again.callouts.is_empty());

    // An outage, an empty answer, garbage: a miss, and the request goes on.
    for answer in [
        CalloutResponse::Failed,
        CalloutResponse::Http {
            status: 503,
            headers: vec![],
            body: vec![],
        },
        CalloutResponse::Http {
            status: 200,
            headers: vec![],
            body: vec![],
        },
        CalloutResponse::Http {
            status: 200,
            headers: vec![],
            body: b"aigw-cache {garbage".to_vec(),
        },
    ] {
        let mut host = Host::default();
        let mut stage = CacheStage::new(Rc::clone(&c));
        let out = host.run(&mut stage, &ask("b", &body("")), &mut |_| answer.clone());
        assert!(out.upstream.is_some());
        assert_eq!(said(&out), Some("miss"));
    }
}

#[test]
fn named_scopes_share_and_header_scopes_follow_the_header() {
    let c = cache(r#"{"scope_groups": {"team": ["alice", "bob"]}}"#);
    let mut host = Host::default();
    run(&mut host, &c, &ask("alice", &body("")));
    assert_eq!(
        said(&run(&mut host, &c, &ask("bob", &body("")))),
        Some("hit")
    );
    assert_eq!(
        said(&run(&mut host, &c, &ask("carol", &body("")))),
        Some("miss")
    );

    let h = cache(r#"{"scope": "header", "scope_header": "x-tenant"}"#);
    let mut host = Host::default();
    run(
        &mut host,
        &h,
        &ask("alice", &body("")).header("x-tenant", "t1"),
    );
    assert_eq!(
        said(&run(
            &mut host,
            &h,
            &ask("bob", &body("")).header("x-tenant", "t1")
        )),
        Some("hit")
    );
    assert_eq!(
        said(&run(
            &mut host,
            &h,
            &ask("bob", &body("")).header("x-tenant", "t2")
        )),
        Some("miss")
    );
    assert_eq!(
        said(&run(&mut host, &h, &ask("bob", &body("")))),
        Some("bypass")
    );

    let s = cache(r#"{"scope": "shared"}"#);
    let mut host = Host::default();
    run(&mut host, &s, &ask("alice", &body("")));
    let anyone =
        Exchange::post(CHAT, &body("")).answer(200, "application/json", vec![answer("stop")]);
    assert_eq!(said(&run(&mut host, &s, &anyone)), Some("hit"));
}

#[test]
fn bad_configurations_name_the_field() {
    let cases: &[(&str, &str)] = &[
        (r#"{"scope": "tenant"}"#, "scope"),
        (r#"{"scope": "header"}"#, "scope_header"),
        (r#"{"scope_header": "x-t"}"#, "scope_header"),
        (
            r#"{"scope": "header", "scope_header": "X-T"}"#,
            "scope_header",
        ),
        (r#"{"ttl_seconds": 0}"#, "ttl_seconds"),
        (r#"{"ttl_by_model": {"m": 0}}"#, "ttl_by_model.m"),
        (r#"{"finish_reasons": ["done"]}"#, "finish_reasons[0]"),
        (r#"{"max_temperature": 3}"#, "max_temperature"),
        (r#"{"local": {"max_entries": 0}}"#, "local.max_entries"),
        (r#"{"local": {"max_bytes": 10}}"#, "local.max_bytes"),
        (r#"{"local": {"max_entrys": 10}}"#, "local.max_entrys"),
        (r#"{"redis": {"cluster": ""}}"#, "redis.cluster"),
        (
            r#"{"redis": {"cluster": "w", "prefix": "a/b"}}"#,
            "redis.prefix",
        ),
        (
            r#"{"redis": {"cluster": "w", "timeout_ms": 0}}"#,
            "redis.timeout_ms",
        ),
        (
            r#"{"scope_groups": {"g": ["a"], "h": ["a"]}}"#,
            "scope_groups.h",
        ),
        (r#"{"stale_on_error": {}}"#, "stale_on_error"),
        (r#"{"tll_seconds": 5}"#, "tll_seconds"),
    ];
    for (json, field) in cases {
        let err = Cache::from_json(json.as_bytes()).unwrap_err();
        assert_eq!(err.field, *field, "{json}: {err}");
    }
    assert!(Cache::from_json(b"").is_ok());
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

    /// Whatever the client sends and the upstream answers, the stage decides
    /// without panicking, and what it stores replays without panicking.
    #[test]
    fn arbitrary_bytes_never_panic(
        request in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
        pieces in proptest::collection::vec(
            proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200), 0..6),
        sse in proptest::prelude::any::<bool>(),
        path in proptest::sample::select(vec![CHAT, "/v1/completions", "/v1/messages", "/v1/responses", "/v1/embeddings"]),
    ) {
        let c = cache("");
        let mut host = Host::default();
        let content_type = if sse { "text/event-stream" } else { "application/json" };
        let mut ex = Exchange::post(path, "").header("x-aigw-consumer", "p")
            .answer(200, content_type, pieces.clone());
        ex.request_body = request.clone();
        run(&mut host, &c, &ex);
        // A valid request, so the answer is read for storing, then asked again.
        let mut ex = Exchange::post(path, &body(r#","stream":true"#)).header("x-aigw-consumer", "p")
            .answer(200, content_type, pieces);
        run(&mut host, &c, &ex);
        ex.request_body = body("").into_bytes();
        run(&mut host, &c, &ex);
    }
}

#[test]
fn the_meter_counts_a_hit_as_saved_tokens_that_cost_nothing_upstream() {
    use crate::meter::{Meter, MeterStage};
    let meter = Rc::new(
        Meter::from_json(
            br#"{"metrics_flush_ms": 0, "prices": {"gpt-4o": {"input": 2.5, "output": 10.0}}}"#,
        )
        .unwrap(),
    );
    let ex = ask("a", &body(""));
    for (outcome, upstream_tokens, cost) in
        [("miss", 2, 0.000025), ("hit", 0, 0.0), ("stale", 0, 0.0)]
    {
        let mut host = Host {
            next_state: crate::boundary::FakeFilterState::default().with(facts::CACHE, outcome),
            ..Host::default()
        };
        let mut stage = MeterStage::new(Rc::clone(&meter));
        let out = host.run(&mut stage, &ex, &mut no_service);
        let line: Value = serde_json::from_str(out.state.text(facts::ACCESS_LOG).unwrap()).unwrap();
        assert_eq!(line["cache"], outcome);
        assert_eq!(
            line["input_tokens"], 2,
            "{outcome}: the line shows what was asked"
        );
        assert_eq!(line["cost_usd"], cost, "{outcome}");
        let usage = facts::usage(&out.state).unwrap();
        assert_eq!(usage.input_tokens, Some(upstream_tokens), "{outcome}");
        let counted = host
            .metrics
            .counter("aigw_tokens_total;model=gpt-4o;consumer=a;token_type=input");
        assert_eq!(counted, upstream_tokens, "{outcome}");
    }
}
