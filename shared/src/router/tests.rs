#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::type_complexity
)] // tables of cases read best inline

use super::*;
use crate::boundary::{FakeFilterState, Sent};
use crate::exchange::{no_service, Exchange, Host, Outcome};
use crate::stage::CalloutResponse;
use serde_json::{json, Value};

const CONFIG: &str = r#"{
  "model_header": "x-model",
  "targets": {
    "small": { "cluster": "small", "model": "gpt-4o-mini", "api_key": "sk-small" },
    "large": { "cluster": "large", "model": "gpt-4o" },
    "azure": { "cluster": "azure", "provider": "azure", "deployment": "gpt4o-prod",
               "api_version": "2024-10-21", "api_key": "az-key", "authority": "x.openai.azure.com" },
    "claude": { "cluster": "anthropic", "provider": "anthropic", "api_key": "ant-key" },
    "canary": { "cluster": "large", "model": "gpt-4.1" },
    "local": { "cluster": "vllm" },
    "pass": { "cluster": "llm" }
  },
  "aliases": { "fast": "small", "smart": "large" },
  "rules": [
    { "name": "gold", "match": { "consumer": "gold-*" }, "target": "large" },
    { "name": "pin", "match": { "headers": { "x-pin": "azure" } }, "target": "azure" },
    { "name": "eu", "match": { "model": "gpt-4o", "headers": { "x-region": "eu" } }, "target": "azure" },
    { "name": "vllm", "match": { "provider": "local" }, "target": "local" },
    { "name": "vision", "match": { "model": "gpt-4o", "images": true }, "target": "large" },
    { "name": "sql", "match": { "model": "smart", "last_user_message": "(?i)\\bselect\\b.*\\bfrom\\b" }, "target": "small" },
    { "name": "big", "match": { "model": "gpt-4o", "min_prompt_tokens": 1000 }, "target": "large" },
    { "name": "claude", "match": { "model": "claude-*", "api": "messages" }, "target": "claude" },
    { "name": "canary", "match": { "model": "gpt-4.1" },
      "split": [ { "target": "large", "weight": 80 }, { "target": "canary", "weight": 20 } ] },
    { "name": "sticky", "match": { "model": "sticky" }, "sticky": "consumer",
      "split": [ { "target": "small", "weight": 50 }, { "target": "large", "weight": 50 } ] }
  ],
  "auto": { "tiers": [ { "name": "small", "max_score": 30, "target": "small" },
                       { "name": "large", "target": "large" } ] },
  "default_target": "pass",
  "max_tokens": { "gpt-4o-mini": 1000 }
}"#;

fn router(json: &str) -> Router {
    Router::from_json(json.as_bytes()).unwrap_or_else(|e| panic!("{e}"))
}

fn run_with(r: &Rc<Router>, ex: &Exchange, state: FakeFilterState) -> Outcome {
    let mut host = Host {
        next_state: state,
        ..Host::default()
    };
    let mut stage = Router::stage(r);
    host.run(&mut stage, ex, &mut no_service)
}

fn run(r: &Rc<Router>, ex: &Exchange) -> Outcome {
    run_with(r, ex, FakeFilterState::default())
}

/// The route fact the router published (empty when none).
fn routed(state: &FakeFilterState) -> facts::Route {
    facts::route(state).unwrap_or_default()
}

fn chat(model: &str, text: &str) -> String {
    json!({"model": model, "messages": [{"role": "user", "content": text}]}).to_string()
}

fn sent_json(out: &Outcome) -> Value {
    serde_json::from_slice(&out.upstream.as_ref().unwrap().body).unwrap()
}

#[test]
fn routes_each_request_to_its_target() {
    let r = Rc::new(router(CONFIG));
    // (name, exchange, target header, upstream model, route fact)
    let long = "word ".repeat(1200);
    let cases: Vec<(&str, Exchange, &str, Option<&str>, &str)> = vec![
        ("alias", Exchange::post("/v1/chat/completions", &chat("fast", "hi")), "small", Some("gpt-4o-mini"), "small"),
        ("alias smart", Exchange::post("/v1/chat/completions", &chat("smart", "hi")), "large", Some("gpt-4o"), "large"),
        ("unknown model passes as asked", Exchange::post("/v1/chat/completions", &chat("o3", "hi")), "llm", Some("o3"), "pass"),
        ("consumer rule", Exchange::post("/v1/chat/completions", &chat("fast", "hi")).header("x-aigw-consumer", "gold-team"), "large", Some("gpt-4o"), "large"),
        ("consumer rule misses", Exchange::post("/v1/chat/completions", &chat("fast", "hi")).header("x-aigw-consumer", "silver"), "small", Some("gpt-4o-mini"), "small"),
        ("header rule", Exchange::post("/v1/chat/completions", &chat("fast", "hi")).header("x-pin", "azure"), "azure", Some("fast"), "azure"),
        ("model and header", Exchange::post("/v1/chat/completions", &chat("gpt-4o", "hi")).header("x-region", "eu"), "azure", Some("gpt-4o"), "azure"),
        ("provider/model split", Exchange::post("/v1/chat/completions", &chat("local/llama-3.1-8b", "hi")), "vllm", Some("llama-3.1-8b"), "local"),
        ("prompt tokens", Exchange::post("/v1/chat/completions", &chat("gpt-4o", &long)), "large", Some("gpt-4o"), "large"),
        ("regex on last user message", Exchange::post("/v1/chat/completions", &chat("smart", "Select name FROM users")), "small", Some("gpt-4o-mini"), "small"),
        ("api rule", Exchange::post("/v1/messages", &json!({"model":"claude-sonnet-4-5","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}).to_string()), "anthropic", Some("claude-sonnet-4-5"), "claude"),
        ("model from azure path", Exchange::post("/openai/deployments/fast/chat/completions?api-version=2024-10-21", r#"{"messages":[]}"#), "small", Some("gpt-4o-mini"), "small"),
        ("model from header", Exchange::post("/v1/chat/completions", r#"{"messages":[]}"#).header("x-model", "smart"), "large", Some("gpt-4o"), "large"),
        ("auto short", Exchange::post("/v1/chat/completions", &chat("auto", "What is the capital of France?")), "small", Some("gpt-4o-mini"), "small"),
        ("auto long analysis", Exchange::post("/v1/chat/completions", &chat("auto", &format!("Analyze step by step and compare the trade-offs. {}", "context ".repeat(400)))), "large", Some("gpt-4o"), "large"),
    ];
    for (name, ex, cluster, model, route) in cases {
        let out = run(&r, &ex);
        let up = out
            .upstream
            .as_ref()
            .unwrap_or_else(|| panic!("{name}: {}", out.client_text()));
        assert_eq!(up.headers.get("x-aigw-target"), Some(cluster), "{name}");
        let body: Value = serde_json::from_slice(&up.body).unwrap();
        if route != "azure" {
            assert_eq!(body["model"].as_str(), model, "{name}: {body}");
        }
        assert_eq!(routed(&out.state).target, route, "{name}");
        assert_eq!(routed(&out.state).model.as_deref(), model, "{name}");
        assert!(
            out.state.refused.is_empty(),
            "{name}: {:?}",
            out.state.refused
        );
        let len: usize = up.headers.get("content-length").unwrap().parse().unwrap();
        assert_eq!(len, up.body.len(), "{name}");
    }
}

#[test]
fn rewrites_for_azure_and_injects_the_targets_key() {
    let r = Rc::new(router(CONFIG));
    let ex = Exchange::post("/v1/chat/completions?x=1", &chat("gpt-4o", "hi"))
        .header("x-pin", "azure")
        .header("authorization", "Bearer client-key")
        .header("x-api-key", "client-other");
    let out = run(&r, &ex);
    let up = out.upstream.unwrap();
    assert_eq!(
        up.headers.get(":path"),
        Some("/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21")
    );
    assert_eq!(up.headers.get("api-key"), Some("az-key"));
    assert_eq!(up.headers.get("authorization"), None);
    assert_eq!(up.headers.get("x-api-key"), None);
    assert_eq!(up.headers.get(":authority"), Some("x.openai.azure.com"));
    assert_eq!(routed(&out.state).provider.as_deref(), Some("azure"));

    // An Azure-shaped request to an OpenAI target: /v1 path, model in the body.
    let ex = Exchange::post(
        "/openai/deployments/fast/chat/completions?api-version=2024-10-21",
        r#"{"messages":[{"role":"user","content":"hi"}]}"#,
    )
    .header("api-key", "client-key");
    let out = run(&r, &ex);
    let up = out.upstream.as_ref().unwrap();
    assert_eq!(up.headers.get(":path"), Some("/v1/chat/completions"));
    assert_eq!(up.headers.get("authorization"), Some("Bearer sk-small"));
    assert_eq!(up.headers.get("api-key"), None);
    assert_eq!(sent_json(&out)["model"], "gpt-4o-mini");
    assert_eq!(routed(&out.state).model_requested.as_deref(), Some("fast"));

    // A target that names no provider leaves the meter to name it from the API.
    let out = run(
        &r,
        &Exchange::post("/v1/chat/completions", &chat("smart", "hi")),
    );
    assert_eq!(routed(&out.state).provider, None);

    // A target without a key leaves the client's alone.
    let ex = Exchange::post("/v1/chat/completions", &chat("smart", "hi"))
        .header("authorization", "Bearer client-key");
    let out = run(&r, &ex);
    assert_eq!(
        out.upstream.unwrap().headers.get("authorization"),
        Some("Bearer client-key")
    );
    // The key never shows in a debug print of the configuration.
    assert!(!format!("{:?}", r).contains("sk-small"));
}

#[test]
fn bad_requests_get_clear_answers() {
    let strict = Rc::new(router(
        r#"{"targets":{"a":{"model":"m"}},"aliases":{"x":"a"},"non_json":"reject"}"#,
    ));
    let lenient = Rc::new(router(
        r#"{"targets":{"a":{"model":"m"},"b":{}},"aliases":{"x":"a"},"missing_model_target":"b",
            "rules":[{"match":{"headers":{"x-t":"a"}},"target":"a"}]}"#,
    ));
    // (name, router, exchange, status, code)
    let cases: Vec<(&str, &Rc<Router>, Exchange, u16, Option<&str>)> = vec![
        (
            "missing model",
            &strict,
            Exchange::post("/v1/chat/completions", r#"{"messages":[]}"#),
            400,
            Some("missing_model"),
        ),
        (
            "unknown model",
            &strict,
            Exchange::post("/v1/chat/completions", &chat("nope", "hi")),
            404,
            Some("model_not_found"),
        ),
        (
            "not json, rejected",
            &strict,
            Exchange::post("/v1/chat/completions", "{nope"),
            400,
            Some("invalid_json"),
        ),
        (
            "not json, by headers",
            &lenient,
            Exchange::post("/v1/chat/completions", "{nope").header("x-t", "a"),
            200,
            None,
        ),
        (
            "missing model, default",
            &lenient,
            Exchange::post("/v1/chat/completions", r#"{"messages":[]}"#),
            200,
            None,
        ),
        (
            "no body at all",
            &lenient,
            Exchange::post("/v1/chat/completions", ""),
            200,
            None,
        ),
    ];
    for (name, r, ex, status, code) in cases {
        let out = run(r, &ex);
        assert_eq!(out.client_status, status, "{name}: {}", out.client_text());
        if let Some(code) = code {
            let v: Value = serde_json::from_slice(&out.client_body).unwrap();
            assert_eq!(v["error"]["code"], code, "{name}");
            assert!(v["error"]["message"].as_str().unwrap().len() > 10, "{name}");
            assert!(out.upstream.is_none(), "{name}");
        } else {
            let up = out.upstream.as_ref().unwrap();
            assert!(up.headers.get("x-aigw-target").is_some(), "{name}");
            // A body the router cannot read goes on as it came.
            assert_eq!(up.body, ex.request_body, "{name}");
        }
    }
}

#[test]
fn max_tokens_are_capped_or_refused() {
    let cap = Rc::new(router(CONFIG));
    let reject = Rc::new(router(
        r#"{"targets":{"a":{"model":"m"}},"aliases":{"x":"a"},"max_tokens":{"m*":100},"over_max_tokens":"reject"}"#,
    ));
    let body = |extra: Value| {
        let mut b = json!({"model":"fast","messages":[{"role":"user","content":"hi"}]});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b.to_string()
    };
    let out = run(
        &cap,
        &Exchange::post("/v1/chat/completions", &body(json!({"max_tokens": 5000}))),
    );
    assert_eq!(sent_json(&out)["max_tokens"], 1000);
    let out = run(
        &cap,
        &Exchange::post(
            "/v1/chat/completions",
            &body(json!({"max_completion_tokens": 5000})),
        ),
    );
    let sent = sent_json(&out);
    assert_eq!(sent["max_completion_tokens"], 1000);
    assert!(sent.get("max_tokens").is_none());
    let out = run(
        &cap,
        &Exchange::post("/v1/chat/completions", &body(json!({}))),
    );
    assert_eq!(
        sent_json(&out)["max_tokens"],
        1000,
        "a missing value gets the cap"
    );
    let out = run(
        &cap,
        &Exchange::post("/v1/chat/completions", &body(json!({"max_tokens": 10}))),
    );
    assert_eq!(sent_json(&out)["max_tokens"], 10, "a smaller value stays");
    // Models without a cap are left alone.
    let out = run(
        &cap,
        &Exchange::post("/v1/chat/completions", &chat("smart", "hi")),
    );
    assert!(sent_json(&out).get("max_tokens").is_none());

    let b = json!({"model":"x","max_tokens":101,"messages":[]}).to_string();
    let out = run(&reject, &Exchange::post("/v1/chat/completions", &b));
    assert_eq!(out.client_status, 400);
    assert!(
        out.client_text().contains("max_tokens_exceeded"),
        "{}",
        out.client_text()
    );
    let b = json!({"model":"x","max_output_tokens":50,"input":"hi"}).to_string();
    let out = run(&reject, &Exchange::post("/v1/responses", &b));
    assert_eq!(sent_json(&out)["max_output_tokens"], 50);
}

#[test]
fn splits_follow_their_weights_and_stick() {
    let r = Rc::new(router(CONFIG));
    let mut canary = 0;
    for i in 0..2000 {
        let ex = Exchange::post("/v1/chat/completions", &chat("gpt-4.1", "hi"))
            .header("x-request-id", &format!("req-{i}"));
        let out = run(&r, &ex);
        if routed(&out.state).target == "canary" {
            canary += 1;
        }
    }
    assert!(
        (340..=460).contains(&canary),
        "20% of 2000 is 400, got {canary}"
    );
    // The same request id always gets the same answer.
    let once = |id: &str| {
        let ex = Exchange::post("/v1/chat/completions", &chat("gpt-4.1", "hi"))
            .header("x-request-id", id);
        routed(&run(&r, &ex).state).target
    };
    assert_eq!(once("abc"), once("abc"));
    // Sticky per consumer: every request of one consumer goes one way.
    for c in ["alice", "bob", "carol"] {
        let routes: std::collections::BTreeSet<_> = (0..20)
            .map(|i| {
                let ex = Exchange::post("/v1/chat/completions", &chat("sticky", "hi"))
                    .header("x-aigw-consumer", c)
                    .header("x-request-id", &i.to_string());
                routed(&run(&r, &ex).state).target
            })
            .collect();
        assert_eq!(routes.len(), 1, "{c}: {routes:?}");
    }
}

#[test]
fn auto_publishes_its_score_and_tier() {
    let r = Rc::new(router(CONFIG));
    let out = run(
        &r,
        &Exchange::post("/v1/chat/completions", &chat("auto", "hi there")),
    );
    let route = routed(&out.state);
    assert_eq!(route.tier.as_deref(), Some("small"));
    assert_eq!(route.score, Some(0));
    assert_eq!(route.reason, "auto:small");
    // Non-auto requests publish neither, but say what chose their route.
    let reasons = [
        (chat("fast", "hi"), vec![], "alias:fast"),
        (chat("o3", "hi"), vec![], "default"),
        (chat("fast", "hi"), vec![("x-pin", "azure")], "rule:pin"),
    ];
    for (body, headers, reason) in reasons {
        let mut ex = Exchange::post("/v1/chat/completions", &body);
        for (k, v) in headers {
            ex = ex.header(k, v);
        }
        let out = run(&r, &ex);
        assert_eq!(routed(&out.state).tier, None);
        assert_eq!(routed(&out.state).reason, reason);
    }
}

#[test]
fn facts_other_filters_wrote_are_read_not_rewritten() {
    let r = Rc::new(router(CONFIG));
    let body = chat("fast", "hi");
    let facts_json =
        serde_json::to_string(&crate::wire::request::parse(body.as_bytes()).unwrap()).unwrap();
    let state = FakeFilterState::default()
        .with(facts::REQUEST, &facts_json)
        .with(facts::MODEL_REQUESTED, "fast")
        .with(facts::CONSUMER, "gold-1");
    let out = run_with(&r, &Exchange::post("/v1/chat/completions", &body), state);
    assert_eq!(routed(&out.state).target, "large", "the consumer fact wins");
    assert!(out.state.refused.is_empty(), "{:?}", out.state.refused);
}

#[test]
fn a_clients_own_target_header_is_not_obeyed() {
    let r = Rc::new(router(CONFIG));
    let mut get = Exchange::post("/v1/models", "");
    get.method = "GET".into();
    let out = run(&r, &get.header("x-aigw-target", "large"));
    assert_eq!(out.upstream.unwrap().headers.get("x-aigw-target"), None);
    let ex = Exchange::post("/v1/chat/completions", &chat("fast", "hi"))
        .header("x-aigw-target", "large");
    let out = run(&r, &ex);
    assert_eq!(
        out.upstream.unwrap().headers.get("x-aigw-target"),
        Some("small")
    );
}

#[test]
fn response_model_maps_back_to_the_alias() {
    let r = Rc::new(router(
        r#"{"targets":{"a":{"model":"gpt-4o-mini"}},"aliases":{"fast":"a"},"map_response_model":true}"#,
    ));
    let json_answer = br#"{"id":"x","model":"gpt-4o-mini-2024-07-18","choices":[]}"#.to_vec();
    let ex = Exchange::post("/v1/chat/completions", &chat("fast", "hi")).answer(
        200,
        "application/json",
        vec![json_answer[..10].to_vec(), json_answer[10..].to_vec()],
    );
    let out = run(&r, &ex);
    assert_eq!(
        out.client_text(),
        r#"{"id":"x","model":"fast","choices":[]}"#
    );
    assert_eq!(
        out.state.text(facts::MODEL_RESPONSE),
        Some("gpt-4o-mini-2024-07-18")
    );

    let sse = b"data: {\"model\":\"gpt-4o-mini\",\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: {\"model\":\"gpt-4o-mini\",\"choices\":[]}\n\ndata: [DONE]\n\n".to_vec();
    let pieces: Vec<Vec<u8>> = sse.chunks(7).map(<[u8]>::to_vec).collect();
    let ex = Exchange::post("/v1/chat/completions", &chat("fast", "hi")).answer(
        200,
        "text/event-stream",
        pieces,
    );
    let out = run(&r, &ex);
    assert_eq!(
        out.client_text(),
        String::from_utf8(sse)
            .unwrap()
            .replace("gpt-4o-mini", "fast")
    );
    // Errors pass untouched.
    let ex = Exchange::post("/v1/chat/completions", &chat("fast", "hi")).answer(
        500,
        "application/json",
        vec![br#"{"model":"gpt-4o-mini"}"#.to_vec()],
    );
    assert!(run(&r, &ex).client_text().contains("gpt-4o-mini"));
}

#[test]
fn bad_configurations_name_the_field() {
    let cases: &[(&str, &str)] = &[
        (r#"{"targets":{}}"#, "targets"),
        (r#"{"targets":{"a":{}},"aliases":{"x":"b"}}"#, "aliases.x"),
        (
            r#"{"targets":{"a":{"provider":"azure"}}}"#,
            "targets.a.api_version",
        ),
        (
            r#"{"targets":{"a":{"provider":"gcp"}}}"#,
            "targets.a.provider",
        ),
        (
            r#"{"targets":{"a":{}},"rules":[{"match":{"last_user_message":"("}, "target":"a"}]}"#,
            "rules[0].match.last_user_message",
        ),
        (
            r#"{"targets":{"a":{}},"rules":[{"match":{}, "target":"a","split":[{"target":"a","weight":1}]}]}"#,
            "rules[0]",
        ),
        (
            r#"{"targets":{"a":{}},"rules":[{"match":{"api":"chats"}, "target":"a"}]}"#,
            "rules[0].match.api",
        ),
        (
            r#"{"targets":{"a":{}},"rules":[{"match":{}, "split":[{"target":"a","weight":0}]}]}"#,
            "rules[0].split",
        ),
        (
            r#"{"targets":{"a":{}},"auto":{"tiers":[{"name":"s","target":"a"},{"name":"l","target":"a"}]}}"#,
            "auto.tiers[0].max_score",
        ),
        (
            r#"{"targets":{"a":{}},"auto":{"tiers":[{"name":"s","max_score":5,"target":"a"}]}}"#,
            "auto.tiers[0].max_score",
        ),
        (
            r#"{"targets":{"a":{}},"max_tokens":{"m":0}}"#,
            "max_tokens.m",
        ),
        (
            r#"{"targets":{"a":{"api_key":"has space"}}}"#,
            "targets.a.api_key",
        ),
        (
            r#"{"targets":{"a":{}},"target_header":"X-Target"}"#,
            "target_header",
        ),
        (r#"{"targets":{"a":{}},"rulez":[]}"#, "rulez"),
    ];
    for (json, field) in cases {
        match Router::from_json(json.as_bytes()) {
            Ok(_) => panic!("{json} was accepted"),
            Err(e) => {
                assert_eq!(e.field, *field, "{json}: {e}");
                assert!(
                    !e.to_string().contains("has space"),
                    "the key is not echoed: {e}"
                );
            }
        }
    }
}

#[test]
fn callouts_are_never_made() {
    // The router decides locally: nothing to wait for on the request path.
    let r = Rc::new(router(CONFIG));
    let mut host = Host::default();
    let mut stage = Router::stage(&r);
    let ex = Exchange::post("/v1/chat/completions", &chat("fast", "hi"));
    let out = host.run(&mut stage, &ex, &mut |_: &Sent| CalloutResponse::Failed);
    assert!(out.callouts.is_empty());
    // The counter is kept in VM memory until the timer hands it to Envoy.
    let routed = "aigw_route_requests_total;model=gpt-4o-mini";
    assert_eq!(host.metrics.counter(routed), 0);
    host.tick(&*r);
    assert_eq!(host.metrics.counter(routed), 1);
    host.run(&mut Router::stage(&r), &ex, &mut no_service);
    host.tick(&*r);
    host.tick(&*r);
    assert_eq!(host.metrics.counter(routed), 2, "each increment once");
}

#[test]
fn counters_reach_envoy_on_the_timer_or_at_once() {
    let at_once = Rc::new(router(&CONFIG.replacen(
        '{',
        r#"{"metrics_flush_ms":0,"#,
        1,
    )));
    assert_eq!(at_once.tick_ms(), None);
    let mut host = Host::default();
    let ex = Exchange::post("/v1/chat/completions", &chat("fast", "hi"));
    host.run(&mut Router::stage(&at_once), &ex, &mut no_service);
    assert_eq!(
        host.metrics
            .counter("aigw_route_requests_total;model=gpt-4o-mini"),
        1
    );
    assert_eq!(router(CONFIG).tick_ms(), Some(1000));
    let slow = router(&CONFIG.replacen('{', r#"{"metrics_flush_ms":60000,"#, 1));
    assert_eq!(slow.tick_ms(), Some(60_000));
    let err = Router::from_json(
        CONFIG
            .replacen('{', r#"{"metrics_flush_ms":60001,"#, 1)
            .as_bytes(),
    )
    .map(|_| ())
    .unwrap_err();
    assert_eq!(err.field, "metrics_flush_ms");
}

#[test]
fn without_held_headers_it_routes_on_headers_alone() {
    let r = Rc::new(router(
        r#"{"hold_request_headers":false,"model_header":"x-model",
            "targets":{"small":{"model":"gpt-4o-mini"},"pass":{}},
            "aliases":{"fast":"small"},"default_target":"pass"}"#,
    ));
    let cases: Vec<(Exchange, &str, Option<&str>)> = vec![
        (
            Exchange::post("/v1/chat/completions", &chat("fast", "hi")).header("x-model", "fast"),
            "small",
            Some("gpt-4o-mini"),
        ),
        (
            Exchange::post(
                "/openai/deployments/fast/chat/completions?api-version=1",
                "{}",
            ),
            "small",
            Some("gpt-4o-mini"),
        ),
        // The body is not read: its model goes on as asked, to the default.
        (
            Exchange::post("/v1/chat/completions", &chat("fast", "hi")),
            "pass",
            None,
        ),
    ];
    for (ex, target, model) in cases {
        let out = run(&r, &ex);
        let up = out.upstream.as_ref().unwrap();
        assert_eq!(up.headers.get("x-aigw-target"), Some(target), "{}", ex.path);
        assert_eq!(up.body, ex.request_body, "the body is untouched");
        assert_eq!(routed(&out.state).model.as_deref(), model, "{}", ex.path);
    }
}

#[test]
fn a_clients_model_name_stays_inside_its_path_segment() {
    let r = Rc::new(router(
        r#"{"targets":{"az":{"provider":"azure","api_version":"v1"}},"default_target":"az"}"#,
    ));
    let cases = [
        (
            "gpt-4o",
            "/openai/deployments/gpt-4o/chat/completions?api-version=v1",
        ),
        (
            "../../admin?x=1#",
            "/openai/deployments/..%2F..%2Fadmin%3Fx%3D1%23/chat/completions?api-version=v1",
        ),
        (
            "..",
            "/openai/deployments/%2E%2E/chat/completions?api-version=v1",
        ),
        (
            "a b",
            "/openai/deployments/a%20b/chat/completions?api-version=v1",
        ),
    ];
    for (model, path) in cases {
        let out = run(
            &r,
            &Exchange::post("/v1/chat/completions", &chat(model, "hi")),
        );
        assert_eq!(
            out.upstream.unwrap().headers.get(":path"),
            Some(path),
            "{model}"
        );
    }
}

#[test]
fn bodies_past_the_limit_are_routed_by_headers_or_refused() {
    let lenient = Rc::new(router(
        r#"{"max_request_body_bytes":1024,"targets":{"a":{"model":"m"},"b":{}},"aliases":{"x":"a"},"default_target":"b"}"#,
    ));
    let strict = Rc::new(router(
        r#"{"max_request_body_bytes":1024,"non_json":"reject","targets":{"a":{"model":"m"}},"aliases":{"x":"a"}}"#,
    ));
    let big = chat("x", &"word ".repeat(1000));
    let out = run(&lenient, &Exchange::post("/v1/chat/completions", &big));
    let up = out.upstream.unwrap();
    assert_eq!(up.headers.get("x-aigw-target"), Some("b"));
    assert_eq!(up.body, big.as_bytes(), "unread, unchanged");
    let out = run(&strict, &Exchange::post("/v1/chat/completions", &big));
    assert_eq!(out.client_status, 413);
    assert!(out.client_text().contains("request_too_large"));
}

#[test]
fn the_messages_api_has_no_azure_path() {
    let r = Rc::new(router(CONFIG));
    let body = json!({"model":"claude-x","max_tokens":5,"messages":[]}).to_string();
    let out = run(
        &r,
        &Exchange::post("/v1/messages", &body).header("x-pin", "azure"),
    );
    assert_eq!(out.client_status, 400);
    assert!(
        out.client_text().contains("unsupported_api"),
        "{}",
        out.client_text()
    );
}

mod never_panics {
    use super::*;
    use proptest::prelude::*;

    /// JSON-looking bytes: pieces of request bodies, broken anywhere.
    fn bodies() -> impl Strategy<Value = Vec<u8>> {
        let piece = prop_oneof![
            Just(br#"{"model":"#.to_vec()),
            Just(br#""fast""#.to_vec()),
            Just(br#""auto""#.to_vec()),
            Just(br#""local/x""#.to_vec()),
            Just(br#","messages":[{"role":"user","content":"#.to_vec()),
            Just(br#"[{"type":"image_url"},{"type":"text","text":"select a from b"}]"#.to_vec()),
            Just(br#","max_tokens":99999"#.to_vec()),
            Just(br#","tools":[{}]"#.to_vec()),
            Just(b"\"\\\"model\\\":\"".to_vec()),
            Just(b"}]}".to_vec()),
            Just(b"{".to_vec()),
            proptest::collection::vec(any::<u8>(), 0..12),
        ];
        proptest::collection::vec(piece, 0..12).prop_map(|p| p.concat())
    }

    proptest! {
        #[test]
        fn any_body_is_routed_or_refused_and_an_edited_body_stays_json(body in bodies()) {
            let r = Rc::new(router(CONFIG));
            let mut ex = Exchange::post("/v1/chat/completions", "");
            ex.request_body = body.clone();
            let out = run(&r, &ex);
            match &out.upstream {
                Some(up) => {
                    if up.body != body {
                        prop_assert!(serde_json::from_slice::<Value>(&up.body).is_ok());
                    }
                }
                None => prop_assert!(out.client_status >= 400),
            }
        }

        #[test]
        fn splices_of_any_bytes_never_panic(body in bodies(), key in "[a-z_]{1,12}") {
            let _ = body::set_member(&body, &key, "1");
            let _ = body::replace_model_values(&body, "\"m\"");
            let _ = body::shape(&body);
        }
    }
}

#[test]
fn in_the_bundle_the_meter_logs_what_the_router_decided() {
    use crate::bundle::Bundle;
    let config = json!({
        "token_meter": {},
        "model_router": serde_json::from_str::<Value>(CONFIG).unwrap(),
    });
    let bundle = Rc::new(Bundle::from_config(config.to_string().as_bytes()).unwrap());
    let mut host = Host::default();
    let mut chain = Bundle::stage(&bundle);
    let answer = br#"{"model":"gpt-4o-mini","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}"#;
    let ex = Exchange::post("/v1/chat/completions", &chat("fast", "hi")).answer(
        200,
        "application/json",
        vec![answer.to_vec()],
    );
    let out = host.run(&mut chain, &ex, &mut no_service);
    assert_eq!(sent_json(&out)["model"], "gpt-4o-mini");
    let line: Value = serde_json::from_str(out.state.text(facts::ACCESS_LOG).unwrap()).unwrap();
    assert_eq!(line["model_requested"], "fast", "{line}");
    assert_eq!(line["model"], "gpt-4o-mini", "{line}");
    assert_eq!(line["route"], "small", "{line}");
    assert_eq!(line["route_reason"], "alias:fast", "{line}");
    assert_eq!(line["input_tokens"], 3, "{line}");
}

#[test]
fn facts_of_filters_before_it_are_read_once_seen_or_while_probing() {
    use crate::presence::{LEARN, PROBE_EVERY};
    use crate::wire::request::RequestFacts;
    let r = Rc::new(router(CONFIG));
    // The body asks for `fast`; an earlier filter's facts say `smart`, and
    // its consumer fact names a gold consumer: whichever the router reads
    // decides the target.
    let ex = Exchange::post("/v1/chat/completions", &chat("fast", "hi"));
    let published = || {
        let mut s = FakeFilterState::default().with(facts::CONSUMER, "gold-1");
        let f = RequestFacts {
            model: Some("smart".into()),
            ..RequestFacts::default()
        };
        s.values
            .insert(facts::REQUEST.into(), serde_json::to_vec(&f).unwrap());
        s
    };
    // Alone, for the VM's first requests and beyond.
    for _ in 0..LEARN + PROBE_EVERY {
        let route = routed(&run(&r, &ex).state);
        assert_eq!(route.reason, "alias:fast");
        // Nobody else wrote aigw.model_requested: the route carries it.
        assert_eq!(route.model_requested.as_deref(), Some("fast"));
    }
    // A filter that publishes is added before it: within one probe
    // interval its facts are read, and from then on always.
    let found = (0..PROBE_EVERY)
        .position(|_| routed(&run_with(&r, &ex, published()).state).reason == "rule:gold");
    assert!(found.is_some(), "not found within {PROBE_EVERY} requests");
    for _ in 0..2 * PROBE_EVERY {
        let route = routed(&run_with(&r, &ex, published()).state);
        assert_eq!(
            (route.reason.as_str(), route.target.as_str()),
            ("rule:gold", "large")
        );
        // The model came from the published facts, whose writer wrote it.
        assert_eq!(route.model_requested, None);
    }
}
