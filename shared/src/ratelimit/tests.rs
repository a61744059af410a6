// Test code: a failed expectation is a panic with a message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::*;
use crate::boundary::Sent;
use crate::exchange::{no_service, Exchange, Host};
use crate::identity::key_digest;
use crate::wire::usage::{Usage, UsageSource};

/// 2026-12-01T07:48:19.5Z
const NOW: u64 = 1_796_111_299_500;

fn filter(json: &str) -> Rc<RateLimit> {
    let f =
        Rc::new(RateLimit::from_json(json.as_bytes()).unwrap_or_else(|e| panic!("{e}\n{json}")));
    f
}

fn host(f: &RateLimit) -> Host {
    let mut h = Host::at(NOW);
    f.start(&mut RootEnv {
        clock: &h.clock,
        metrics: &mut h.metrics,
        shared: &mut h.shared,
        callouts: &mut crate::boundary::FakeCallouts::default(),
    });
    h
}

/// 4 prompt bytes → 1 token; `max_tokens` as given.
fn chat(consumer: &str, max_tokens: Option<i64>) -> Exchange {
    let mut body =
        serde_json::json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "abcd"}]});
    if let Some(m) = max_tokens {
        body["max_tokens"] = m.into();
    }
    Exchange::post("/v1/chat/completions", &body.to_string()).header("x-aigw-consumer", consumer)
}

/// The meter's usage fact, as it publishes it when the answer ends.
fn usage(host: &mut Host, input: u64, output: u64) {
    let mut s = crate::boundary::FakeFilterState::default();
    facts::put_usage(
        &mut s,
        &Usage {
            input_tokens: Some(input),
            output_tokens: Some(output),
            source: UsageSource::Provider,
            ..Usage::default()
        },
    );
    host.next_state = s;
}

fn run(host: &mut Host, f: &Rc<RateLimit>, ex: &Exchange) -> crate::exchange::Outcome {
    let mut stage = RateLimitStage::new(Rc::clone(f));
    host.run(&mut stage, ex, &mut no_service)
}

fn error_code(out: &crate::exchange::Outcome) -> String {
    let v: serde_json::Value = serde_json::from_slice(&out.client_body).unwrap();
    v["error"]["code"].as_str().unwrap_or_default().to_string()
}

#[test]
fn a_request_limit_admits_exactly_n_per_window_per_consumer() {
    let f = filter(r#"{"rules": [{"name": "rpm", "limits": [{"requests": 3, "per": "minute"}]}]}"#);
    let mut h = host(&f);
    let statuses: Vec<u16> = (0..5)
        .map(|_| run(&mut h, &f, &chat("alice", None)).client_status)
        .collect();
    assert_eq!(statuses, [200, 200, 200, 429, 429]);
    // Another consumer has its own counter.
    assert_eq!(run(&mut h, &f, &chat("bob", None)).client_status, 200);
    let out = run(&mut h, &f, &chat("alice", None));
    assert_eq!(error_code(&out), "rate_limit_exceeded");
    assert!(
        out.client_text().contains("rule rpm"),
        "{}",
        out.client_text()
    );
    assert_eq!(out.state.text(facts::RATELIMIT), Some("deny"));
    for (name, want) in [
        ("retry-after", "41"),
        ("x-ratelimit-limit-requests", "3"),
        ("x-ratelimit-remaining-requests", "0"),
        ("x-ratelimit-reset-requests", "41s"),
        ("ratelimit-policy", "\"rpm.requests_per_minute\";q=3;w=60"),
        ("ratelimit", "\"rpm.requests_per_minute\";r=0;t=41"),
    ] {
        assert_eq!(out.client_headers.get(name), Some(want), "{name}");
    }
    // The next minute admits again.
    h.clock.advance(41_000);
    assert_eq!(run(&mut h, &f, &chat("alice", None)).client_status, 200);
    h.tick(&*f);
    assert_eq!(
        h.metrics
            .counter("aigw_ratelimit_requests_total;rule=rpm;consumer=alice;outcome=allow"),
        4
    );
    assert_eq!(
        h.metrics
            .counter("aigw_ratelimit_requests_total;rule=rpm;consumer=alice;outcome=deny"),
        3
    );
}

#[test]
fn admitted_answers_carry_what_remains() {
    let f = filter(
        r#"{"rules": [{"name": "r", "limits": [{"requests": 10, "per": "minute"}, {"total_tokens": 1000, "per": "hour"}]}]}"#,
    );
    let mut h = host(&f);
    let out = run(&mut h, &f, &chat("alice", Some(99)));
    assert_eq!(out.client_status, 200);
    assert_eq!(out.state.text(facts::RATELIMIT), Some("allow"));
    assert_eq!(
        out.client_headers.get("x-ratelimit-remaining-requests"),
        Some("9")
    );
    // 1 prompt token + 99 reserved.
    assert_eq!(
        out.client_headers.get("x-ratelimit-remaining-tokens"),
        Some("900")
    );
    assert_eq!(
        out.client_headers.get("x-ratelimit-limit-tokens"),
        Some("1000")
    );
    let out = run(&mut h, &f, &chat("alice", Some(99)));
    assert_eq!(
        out.client_headers.get("x-ratelimit-remaining-requests"),
        Some("8")
    );
    let off = filter(
        r#"{"response_headers": false, "rules": [{"name": "r", "limits": [{"requests": 10, "per": "minute"}]}]}"#,
    );
    let out = run(&mut host(&off), &off, &chat("alice", None));
    assert_eq!(
        out.client_headers.get("x-ratelimit-remaining-requests"),
        None
    );
}

#[test]
fn tokens_are_reserved_then_settled_to_the_real_usage() {
    let f = filter(
        r#"{"rules": [{"name": "tpm", "limits": [{"total_tokens": 1000, "per": "minute"}]}]}"#,
    );
    let mut h = host(&f);
    // Reserve 1 + 500; the answer used 1 + 99: 400 come back.
    usage(&mut h, 1, 99);
    let out = run(&mut h, &f, &chat("alice", Some(500)));
    assert_eq!(
        out.client_headers.get("x-ratelimit-remaining-tokens"),
        Some("499")
    );
    let place = counters::place(
        &counters::prefix("tpm"),
        tag(Kind::TotalTokens, window::Window::Minute),
        "alice",
    );
    let (start, _) = window::Window::Minute.span(NOW);
    assert_eq!(counters::read(&h.shared, &place, start), 100);
    // An answer that used more than reserved is charged in full.
    usage(&mut h, 1, 700);
    run(&mut h, &f, &chat("alice", Some(100)));
    assert_eq!(counters::read(&h.shared, &place, start), 801);
    // 801 used: a reservation of 1 + 500 no longer fits, one of 1 + 100 does.
    let out = run(&mut h, &f, &chat("alice", Some(500)));
    assert_eq!(out.client_status, 429);
    assert!(out.client_text().contains("total_tokens per minute"));
    assert_eq!(
        counters::read(&h.shared, &place, start),
        801,
        "a denial holds nothing"
    );
    usage(&mut h, 1, 10);
    assert_eq!(
        run(&mut h, &f, &chat("alice", Some(100))).client_status,
        200
    );
    assert_eq!(counters::read(&h.shared, &place, start), 812);
    h.tick(&*f);
    assert_eq!(
        h.metrics
            .counter("aigw_ratelimit_tokens_settled_total;rule=tpm;consumer=alice"),
        100 + 701 + 11
    );
    assert_eq!(
        h.metrics
            .counter("aigw_ratelimit_tokens_reserved_total;rule=tpm;consumer=alice"),
        501 + 101 + 101
    );
}

#[test]
fn an_error_or_an_unmetered_request_settles_to_what_was_used() {
    let f = filter(
        r#"{"rules": [{"name": "t", "limits": [{"output_tokens": 100, "per": "minute"}]}]}"#,
    );
    let mut h = host(&f);
    let place = counters::place(
        &counters::prefix("t"),
        tag(Kind::OutputTokens, window::Window::Minute),
        "alice",
    );
    let (start, _) = window::Window::Minute.span(NOW);
    // The meter says nothing was used (an upstream error): all refunded.
    let mut s = crate::boundary::FakeFilterState::default();
    facts::put_usage(&mut s, &Usage::default());
    h.next_state = s;
    let ex = chat("alice", Some(50)).answer(500, "application/json", vec![b"{}".to_vec()]);
    run(&mut h, &f, &ex);
    assert_eq!(counters::read(&h.shared, &place, start), 0);
    // No meter in the chain: the reservation stands.
    run(&mut h, &f, &chat("alice", Some(50)));
    assert_eq!(counters::read(&h.shared, &place, start), 50);
}

#[test]
fn a_large_default_is_capped_at_a_small_limit_and_bad_max_tokens_are_defaults() {
    let f = filter(
        r#"{"default_max_tokens": 100000, "rules": [{"name": "small", "limits": [{"total_tokens": 50, "per": "minute"}]}]}"#,
    );
    let mut h = host(&f);
    usage(&mut h, 1, 5);
    assert_eq!(run(&mut h, &f, &chat("alice", None)).client_status, 200);
    for bad in [-5, 0] {
        usage(&mut h, 1, 1);
        assert_eq!(
            run(&mut h, &f, &chat("alice", Some(bad))).client_status,
            200,
            "{bad}"
        );
    }
    let output_cap = |body: &[u8]| crate::wire::request::parse(body).ok()?.output_cap;
    assert_eq!(output_cap(br#"{"max_tokens": 1e300}"#), None);
    assert_eq!(output_cap(br#"{"max_tokens": "12"}"#), None);
    assert_eq!(
        output_cap(br#"{"max_completion_tokens": 7, "max_tokens": 9}"#),
        Some(7)
    );
    assert_eq!(
        output_cap(br#"{"max_output_tokens": 18446744073709551615}"#),
        Some(u64::MAX)
    );
    assert_eq!(output_cap(b"not json"), None);
    // A body that is not JSON is still counted and reserves the default.
    let rpm = filter(
        r#"{"rules": [{"name": "r", "limits": [{"requests": 1, "per": "minute"}, {"output_tokens": 10, "per": "minute"}]}]}"#,
    );
    let mut h = host(&rpm);
    let bad = Exchange::post("/v1/chat/completions", "{not json").header("x-aigw-consumer", "a");
    let out = run(&mut h, &rpm, &bad);
    assert_eq!(
        out.client_headers.get("x-ratelimit-remaining-tokens"),
        Some("0")
    );
    assert_eq!(run(&mut h, &rpm, &bad).client_status, 429);
}

#[test]
fn every_matching_rule_applies_and_the_strictest_binds() {
    let alice = key_digest("sk-alice");
    let bob = key_digest("sk-bob");
    let json = format!(
        r#"{{
        "identity": {{"api_keys": {{"{alice}": "alice", "{bob}": "bob"}}, "groups": {{"premium": ["alice"]}}}},
        "rules": [
            {{"name": "everyone", "limits": [{{"requests": 5, "per": "minute"}}]}},
            {{"name": "gpt4o", "match": {{"models": ["gpt-4o"]}}, "limits": [{{"requests": 2, "per": "minute"}}],
              "overrides": {{"alice": {{"limits": [{{"requests": 4, "per": "minute"}}]}}}}}},
            {{"name": "premium", "match": {{"groups": ["premium"]}}, "limits": [{{"requests": 3, "per": "second"}}]}},
            {{"name": "header", "match": {{"headers": {{"x-tier": "free"}}}}, "limits": [{{"requests": 1, "per": "hour"}}]}}
        ]}}"#
    );
    let f = filter(&json);
    let mut h = host(&f);
    let req =
        |who: &str| chat("ignored", None).header("authorization", &format!("Bearer sk-{who}"));
    let got: Vec<u16> = (0..3)
        .map(|_| run(&mut h, &f, &req("bob")).client_status)
        .collect();
    assert_eq!(got, [200, 200, 429]);
    let out = run(&mut h, &f, &req("bob"));
    assert!(
        out.client_text().contains("rule gpt4o"),
        "{}",
        out.client_text()
    );
    // alice: her override (4) is looser, the premium rule (3 per second) binds first.
    let got: Vec<u16> = (0..4)
        .map(|_| run(&mut h, &f, &req("alice")).client_status)
        .collect();
    assert_eq!(got, [200, 200, 200, 429]);
    assert!(run(&mut h, &f, &req("alice"))
        .client_text()
        .contains("rule premium"));
    h.clock.advance(1000);
    assert_eq!(run(&mut h, &f, &req("alice")).client_status, 200);
    assert!(run(&mut h, &f, &req("alice"))
        .client_text()
        .contains("rule gpt4o"));
    // A header rule; another model escapes the model rule.
    let other = Exchange::post("/v1/chat/completions", r#"{"model":"m2","messages":[]}"#)
        .header("authorization", "Bearer sk-bob")
        .header("x-tier", "free");
    assert_eq!(run(&mut h, &f, &other).client_status, 200);
    assert!(run(&mut h, &f, &other)
        .client_text()
        .contains("rule header"));
}

#[test]
fn shadow_rules_report_and_never_deny() {
    let f = filter(
        r#"{"rules": [{"name": "trial", "shadow": true, "limits": [{"requests": 1, "per": "minute"}]}]}"#,
    );
    let mut h = host(&f);
    let a = run(&mut h, &f, &chat("alice", None));
    let b = run(&mut h, &f, &chat("alice", None));
    assert_eq!((a.client_status, b.client_status), (200, 200));
    assert_eq!(a.state.text(facts::RATELIMIT), Some("allow"));
    assert_eq!(b.state.text(facts::RATELIMIT), Some("shadow_deny"));
    h.tick(&*f);
    assert_eq!(
        h.metrics
            .counter("aigw_ratelimit_requests_total;rule=trial;consumer=alice;outcome=shadow_deny"),
        1
    );
}

#[test]
fn budgets_answer_insufficient_quota_until_the_month_turns() {
    let f = filter(
        r#"{"rules": [{"name": "monthly", "budgets": [{"total_tokens": 100, "per": "month"}], "limits": [{"requests": 1000, "per": "minute"}]}]}"#,
    );
    let mut h = host(&f);
    usage(&mut h, 1, 98);
    assert_eq!(run(&mut h, &f, &chat("alice", Some(10))).client_status, 200);
    let out = run(&mut h, &f, &chat("alice", Some(10)));
    assert_eq!(out.client_status, 429);
    assert_eq!(error_code(&out), "insufficient_quota");
    // 2027-01-01T00:00Z is 30 days, 16 h, 11 min, 41 s away.
    assert_eq!(
        out.client_headers.get("retry-after"),
        Some(&*(30 * 86_400 + 16 * 3600 + 11 * 60 + 41).to_string())
    );
    h.clock.advance(31 * 86_400_000);
    assert_eq!(run(&mut h, &f, &chat("alice", Some(10))).client_status, 200);
}

#[test]
fn no_matching_rule_is_off_and_unknown_callers_get_401() {
    let f = filter(&format!(
        r#"{{"identity": {{"api_keys": {{"{}": "alice"}}}}, "rules": [{{"name": "a", "match": {{"consumers": ["alice"]}}, "limits": [{{"requests": 1, "per": "minute"}}]}}]}}"#,
        key_digest("k")
    ));
    let mut h = host(&f);
    let out = run(&mut h, &f, &chat("alice", None));
    assert_eq!(out.client_status, 401);
    assert_eq!(error_code(&out), "invalid_api_key");
    assert!(out.upstream.is_none());
    let f = filter(
        r#"{"rules": [{"name": "a", "match": {"models": ["x"]}, "limits": [{"requests": 1, "per": "minute"}]}]}"#,
    );
    let out = run(&mut host(&f), &f, &chat("alice", None));
    assert_eq!(out.state.text(facts::RATELIMIT), Some("off"));
    assert_eq!(out.client_headers.get("ratelimit"), None);
}

#[test]
fn bad_configs_name_the_field() {
    let cases = [
        (
            r#"{"rules": [{"name": "a", "limits": [{"requests": 0, "per": "minute"}]}]}"#,
            "rules[0].limits[0].requests",
            "not a positive",
        ),
        (
            r#"{"rules": [{"name": "a", "limits": [{"requests": -3, "per": "minute"}]}]}"#,
            "rules[0].limits[0].requests",
            "not a positive",
        ),
        (
            r#"{"rules": [{"name": "a", "limits": [{"requests": 3, "per": "fortnight"}]}]}"#,
            "rules[0].limits[0].per",
            "unknown window",
        ),
        (
            r#"{"rules": [{"name": "a", "budgets": [{"total_tokens": 3, "per": "minute"}]}]}"#,
            "rules[0].budgets[0].per",
            "unknown window",
        ),
        (
            r#"{"rules": [{"name": "a", "limits": [{"requests": 3, "total_tokens": 4, "per": "minute"}]}]}"#,
            "rules[0].limits[0]",
            "exactly one",
        ),
        (
            r#"{"rules": [{"name": "a", "limits": []}]}"#,
            "rules[0].limits",
            "at least one",
        ),
        (
            r#"{"rules": [{"name": "a", "match": {"models": []}, "limits": [{"requests": 1, "per": "day"}]}]}"#,
            "rules[0].match.models",
            "never match",
        ),
        (
            r#"{"rules": [{"name": "a", "match": {"groups": ["g"]}, "limits": [{"requests": 1, "per": "day"}]}]}"#,
            "rules[0].match.groups[0]",
            "never match",
        ),
        (
            r#"{"rules": [{"name": "a", "match": {"consumers": ["x"]}, "overrides": {"y": {}}, "limits": [{"requests": 1, "per": "day"}]}]}"#,
            "rules[0].overrides.y",
            "never matches",
        ),
        (
            r#"{"identity": {"api_keys": {"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad": "a"}}, "rules": [{"name": "a", "match": {"consumers": ["b"]}, "limits": [{"requests": 1, "per": "day"}]}]}"#,
            "rules[0].match.consumers[0]",
            "never match",
        ),
        (
            r#"{"rules": [{"name": "a b", "limits": [{"requests": 1, "per": "day"}]}]}"#,
            "rules[0].name",
            "not a rule name",
        ),
        (
            r#"{"rules": [{"name": "a", "limits": [{"requests": 1, "per": "day"}]}, {"name": "a", "limits": [{"requests": 1, "per": "day"}]}]}"#,
            "rules[1].name",
            "second rule",
        ),
        (
            r#"{"rules": [{"name": "a", "limits": [{"requests": 1, "per": "day"}, {"requests": 2, "per": "day"}]}]}"#,
            "rules[0].limits",
            "two limits",
        ),
        (r#"{"counters": "global"}"#, "service", "needs a service"),
        (
            r#"{"counters": "global", "service": {"cluster": "rls", "failure_mode": "maybe"}}"#,
            "service.failure_mode",
            "allow or deny",
        ),
        (r#"{"counters": "redis"}"#, "counters", "local or global"),
        (
            r#"{"default_max_tokens": 0}"#,
            "default_max_tokens",
            "positive",
        ),
        (
            r#"{"rules": [{"name": "a", "limit": []}]}"#,
            "rules[0].limit",
            "unknown field",
        ),
    ];
    for (json, field, reason) in cases {
        let e = RateLimit::from_json(json.as_bytes()).unwrap_err();
        assert_eq!(e.field, field, "{json}: {e}");
        assert!(e.reason.contains(reason), "{json}: {e}");
    }
}

fn global(failure_mode: &str) -> Rc<RateLimit> {
    filter(&format!(
        r#"{{"counters": "global", "service": {{"cluster": "rls", "timeout_ms": 50, "failure_mode": "{failure_mode}"}},
            "rules": [{{"name": "g", "limits": [{{"requests": 60, "per": "minute"}}, {{"total_tokens": 1000, "per": "minute"}}]}}]}}"#
    ))
}

fn rls_answer(code: u64, remaining: u64) -> CalloutResponse {
    // RateLimitResponse{overall_code, statuses{code, current_limit{60, MINUTE}, limit_remaining, duration_until_reset{30s}}}
    let mut status = vec![
        0x08,
        code as u8,
        0x12,
        4,
        0x08,
        60,
        0x10,
        2,
        0x18,
        remaining as u8,
        0x22,
        2,
        0x08,
        30,
    ];
    let mut msg = vec![0x08, code as u8, 0x12, status.len() as u8];
    msg.append(&mut status);
    CalloutResponse::Grpc {
        status: 0,
        message: msg,
    }
}

#[test]
fn global_mode_asks_the_service_per_limit_and_follows_its_answer() {
    let f = global("allow");
    let mut h = Host::at(NOW);
    let mut stage = RateLimitStage::new(Rc::clone(&f));
    let mut sent = Vec::new();
    let out = h.run(&mut stage, &chat("alice", Some(100)), &mut |s: &Sent| {
        sent.push(s.clone());
        rls_answer(1, 59)
    });
    assert_eq!(out.client_status, 200);
    assert_eq!(
        out.client_headers.get("x-ratelimit-remaining-requests"),
        Some("59")
    );
    assert_eq!(sent.len(), 2);
    let Sent::Grpc(call) = &sent[1] else { panic!() };
    assert_eq!(
        (
            call.cluster.as_str(),
            call.service.as_str(),
            call.method.as_str()
        ),
        ("rls", rls::SERVICE, "ShouldRateLimit")
    );
    assert_eq!(call.timeout_ms, 50);
    // The token call charges the prompt estimate (1 token) up front.
    assert_eq!(
        call.message,
        rls::encode_request(
            "aigw",
            &[vec![
                ("rule", "g"),
                ("consumer", "alice"),
                ("limit", "total_tokens_per_minute")
            ]],
            1
        )
    );
    let mut stage = RateLimitStage::new(Rc::clone(&f));
    let out = h.run(&mut stage, &chat("alice", None), &mut |_: &Sent| {
        rls_answer(2, 0)
    });
    assert_eq!(out.client_status, 429);
    assert_eq!(out.client_headers.get("retry-after"), Some("30"));
}

#[test]
fn global_mode_settles_excess_with_a_detached_call() {
    let f = global("allow");
    let mut h = Host::at(NOW);
    usage(&mut h, 1, 300);
    let mut stage = RateLimitStage::new(Rc::clone(&f));
    let out = h.run(&mut stage, &chat("alice", Some(100)), &mut |_: &Sent| {
        rls_answer(1, 10)
    });
    assert_eq!(out.callouts.len(), 3, "{:?}", out.callouts);
    let Sent::Grpc(settle) = &out.callouts[2] else {
        panic!()
    };
    assert_eq!(
        settle.message,
        rls::encode_request(
            "aigw",
            &[vec![
                ("rule", "g"),
                ("consumer", "alice"),
                ("limit", "total_tokens_per_minute")
            ]],
            300
        )
    );
}

#[test]
fn a_failed_service_follows_the_failure_mode() {
    for (mode, want) in [("allow", 200), ("deny", 503)] {
        let f = global(mode);
        // One host per filter, as in a VM: the metric ids belong to it.
        let mut h = Host::at(NOW);
        let answers = [
            CalloutResponse::Failed,
            CalloutResponse::Grpc {
                status: 4,
                message: vec![],
            },
            CalloutResponse::Grpc {
                status: 0,
                message: vec![0xff],
            },
        ];
        for (i, answer) in answers.iter().enumerate() {
            let mut stage = RateLimitStage::new(Rc::clone(&f));
            let out = h.run(&mut stage, &chat("alice", None), &mut |_: &Sent| {
                answer.clone()
            });
            assert_eq!(out.client_status, want, "{mode} {answer:?}");
            h.tick(&*f);
            assert_eq!(
                h.metrics.counter("aigw_ratelimit_service_errors_total"),
                i as u64 + 1
            );
        }
    }
}

#[test]
fn a_limit_counter_lives_where_its_prefix_says() {
    for subject in ["alice", "bob", "*", ""] {
        let want = counters::place(&counters::prefix("tpm"), 7, subject);
        let got = counters::place_of("tpm", 7, subject);
        assert_eq!(got, want, "{subject:?}");
    }
}

#[test]
fn headers_name_the_tightest_limit_of_each_kind_and_list_them_all() {
    let standing = |rule: &str, kind, window, max, remaining, reset_ms| Standing {
        rule: rule.into(),
        kind,
        window,
        max,
        remaining,
        reset_ms,
    };
    let standings = [
        standing(
            "rpm",
            Kind::Requests,
            window::Window::Minute,
            60,
            59,
            30_500,
        ),
        standing(
            "rpd",
            Kind::Requests,
            window::Window::Day,
            1000,
            7,
            3_600_000,
        ),
        standing(
            "tpm",
            Kind::TotalTokens,
            window::Window::Minute,
            u64::MAX,
            0,
            999,
        ),
    ];
    let got = headers_for(&standings, true);
    let want = [
        ("x-ratelimit-limit-requests", "1000"),
        ("x-ratelimit-remaining-requests", "7"),
        ("x-ratelimit-reset-requests", "1h0m0s"),
        ("x-ratelimit-limit-tokens", "18446744073709551615"),
        ("x-ratelimit-remaining-tokens", "0"),
        ("x-ratelimit-reset-tokens", "999ms"),
        (
            "ratelimit-policy",
            "\"rpm.requests_per_minute\";q=60;w=60, \"rpd.requests_per_day\";q=1000;w=86400, \"tpm.total_tokens_per_minute\";q=18446744073709551615;w=60",
        ),
        (
            "ratelimit",
            "\"rpm.requests_per_minute\";r=59;t=31, \"rpd.requests_per_day\";r=7;t=3600, \"tpm.total_tokens_per_minute\";r=0;t=1",
        ),
    ];
    let got: Vec<(&str, &str)> = got.iter().map(|(k, v)| (*k, v.as_str())).collect();
    assert_eq!(got, want);
    assert!(headers_for(&[], true).is_empty());
}

#[test]
fn the_timer_flushes_counters_and_sweeps_local_ones() {
    let rules = r#""rules": [{"name": "rpm", "limits": [{"requests": 3, "per": "minute"}]}]"#;
    let global = r#""counters": "global", "service": {"cluster": "rls"}"#;
    let cases = [
        (format!("{{{rules}}}"), Some(1000)),
        (
            format!(r#"{{{rules}, "metrics_flush_ms": 0}}"#),
            Some(SWEEP_MS),
        ),
        (format!("{{{rules}, {global}}}"), Some(1000)),
        (
            format!(r#"{{{rules}, {global}, "metrics_flush_ms": 0}}"#),
            None,
        ),
    ];
    for (json, want) in cases {
        assert_eq!(filter(&json).tick_ms(), want, "{json}");
    }
}
