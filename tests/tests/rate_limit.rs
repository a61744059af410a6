//! rate-limit through the real Envoy with the real `.wasm`, in front of the mock LLM.
//!
//! Each test starts its own Envoy (from `envoy/gateway.yaml`, or from it
//! with another rate-limit policy) and uses consumer ids of its own, so
//! counters and log lines never mix between tests.

// Test code: a failed expectation is a panic with a message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use aigw_tests::client::{self, Response};
use aigw_tests::harness::{root, Envoy};
use aigw_tests::mock::MockLlm;
use serde_json::{json, Value};
use std::sync::{Arc, Barrier};
use std::time::Duration;

struct Gateway {
    // Envoy first: it is dropped first, and prints its log if the test failed.
    envoy: Envoy,
    _mock: MockLlm,
}

/// The gateway (either shape) without the prompt cache: these tests send the
/// same prompt again and again, and the cache below rate-limit would answer
/// it (a hit costs no tokens, and each local reply to a `connection: close`
/// client takes Envoy's 1 s delayed close).
fn gateway_yaml() -> String {
    aigw_tests::harness::without(&aigw_tests::harness::gateway_yaml(), &["prompt-cache"])
}

/// The gateway YAML (either shape) with another rate-limit configuration:
/// the separate filter's, or the bundle's `rate_limit` member.
fn with_policy(yaml: &str, policy: &Value) -> String {
    let (at, bundle) = match yaml.find("root_id: rate-limit") {
        Some(at) => (at, false),
        None => (
            yaml.find("root_id: gateway")
                .expect("a rate-limit filter or the bundle"),
            true,
        ),
    };
    let value = at + yaml[at..].find("value: |\n").expect("its configuration") + "value: |\n".len();
    let indent = " ".repeat(20);
    let end = value
        + yaml[value..]
            .split_inclusive('\n')
            .take_while(|l| l.starts_with(&indent))
            .map(str::len)
            .sum::<usize>();
    let config = if bundle {
        let mut doc: Value = serde_json::from_str(&yaml[value..end]).unwrap();
        doc["rate_limit"] = policy.clone();
        doc
    } else {
        policy.clone()
    };
    let body = serde_json::to_string_pretty(&config).unwrap();
    let body: String = body.lines().map(|l| format!("{indent}{l}\n")).collect();
    format!("{}{body}{}", &yaml[..value], &yaml[end..])
}

fn start(yaml: &str, workers: u32) -> Gateway {
    let mock = MockLlm::start().expect("mock LLM starts");
    let envoy =
        Envoy::start_with_workers(yaml, &format!("http://{}", mock.addr()), None, &[], workers)
            .unwrap_or_else(|e| panic!("{e}"));
    Gateway { envoy, _mock: mock }
}

/// 4 prompt tokens for the mock (it counts words), 18 bytes (5 estimated).
const PROMPT: &str = "one two three four";

fn chat(extra: &[(&str, Value)]) -> String {
    let mut body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": PROMPT}]});
    for (k, v) in extra {
        body[*k] = v.clone();
    }
    body.to_string()
}

fn post(g: &Gateway, headers: &[(&str, &str)], body: &str) -> Response {
    let mut h = vec![("content-type", "application/json")];
    h.extend_from_slice(headers);
    client::post(g.envoy.addr(), "/v1/chat/completions", &h, body).expect("request through envoy")
}

fn as_consumer(g: &Gateway, consumer: &str, body: &str) -> Response {
    post(g, &[("x-aigw-consumer", consumer)], body)
}

/// Waits until no window of `secs` seconds ends within the next `margin` s,
/// so a burst does not straddle two windows.
fn clear_of_window_edge(secs: u64, margin: u64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let left = secs - now % secs;
    if left <= margin {
        std::thread::sleep(Duration::from_secs(left + 1));
    }
}

#[test]
fn the_demo_policy_admits_60_requests_a_minute_per_consumer_then_429s() {
    clear_of_window_edge(60, 15);
    let g = start(&gateway_yaml(), 1);
    let body = chat(&[]);
    for i in 0..60 {
        let r = as_consumer(&g, "demo-rl-a", &body);
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        assert_eq!(
            r.header("x-ratelimit-remaining-requests"),
            Some(&*(59 - i).to_string()),
            "request {i}"
        );
        assert_eq!(r.header("x-ratelimit-limit-requests"), Some("60"));
        assert_eq!(r.header("x-ratelimit-limit-tokens"), Some("100000"));
    }
    let r = as_consumer(&g, "demo-rl-a", &body);
    assert_eq!(r.status, 429, "{}", r.text());
    let e = r.json();
    assert_eq!(e["error"]["code"], "rate_limit_exceeded");
    assert_eq!(e["error"]["type"], "requests");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("rule per-consumer"),
        "{e}"
    );
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "retry-after {retry}");
    assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("0"));
    assert_eq!(
        r.header("x-ratelimit-reset-requests"),
        Some(&*aigw_shared::ratelimit::window::openai_duration(
            retry * 1000
        ))
    );
    assert!(r
        .header("ratelimit-policy")
        .unwrap()
        .contains("\"per-consumer.requests_per_minute\";q=60;w=60"));
    assert!(r
        .header("ratelimit")
        .unwrap()
        .contains("\"per-consumer.requests_per_minute\";r=0;t="));
    // Another consumer is not affected.
    assert_eq!(as_consumer(&g, "demo-rl-b", &body).status, 200);

    // The access log has a line for the denied request too.
    let lines = g.envoy.log_lines("demo-rl-a", 61);
    assert_eq!(lines.len(), 61);
    assert_eq!(
        lines.iter().filter(|l| l["ratelimit"] == "allow").count(),
        60
    );
    let denied: Vec<&Value> = lines.iter().filter(|l| l["ratelimit"] == "deny").collect();
    assert_eq!(denied.len(), 1);
    assert_eq!(denied[0]["status"], 429);
    // Counters reach Envoy on the filter's 1 s timer.
    let m = |outcome: &str, want: f64| {
        g.envoy.metric_eventually(
            "aigw_ratelimit_requests_total",
            &[
                ("rule", "per-consumer"),
                ("consumer", "demo-rl-a"),
                ("outcome", outcome),
            ],
            want,
        )
    };
    assert_eq!(m("allow", 60.0), Some(60.0));
    assert_eq!(m("deny", 1.0), Some(1.0));
    let settled = g.envoy.metric_eventually(
        "aigw_ratelimit_tokens_settled_total",
        &[("rule", "per-consumer"), ("consumer", "demo-rl-a")],
        540.0,
    );
    // 60 answers of 4 prompt + 5 completion tokens.
    assert_eq!(settled, Some(540.0));
}

/// Sends `n` requests at once, each on its own connection, from `n`
/// threads released together; returns the statuses.
fn burst(g: &Gateway, n: usize, headers: Vec<(String, String)>, body: String) -> Vec<u16> {
    let barrier = Arc::new(Barrier::new(n));
    let addr = g.envoy.addr();
    let threads: Vec<_> = (0..n)
        .map(|_| {
            let barrier = Arc::clone(&barrier);
            let headers = headers.clone();
            let body = body.clone();
            std::thread::spawn(move || {
                let mut h: Vec<(&str, &str)> = vec![("content-type", "application/json")];
                h.extend(headers.iter().map(|(k, v)| (k.as_str(), v.as_str())));
                barrier.wait();
                client::post(addr, "/v1/chat/completions", &h, &body)
                    .map(|r| r.status)
                    .unwrap_or(0)
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

#[test]
fn a_request_limit_is_exact_across_two_workers_under_concurrency() {
    const LIMIT: usize = 25;
    clear_of_window_edge(3600, 60);
    let policy = json!({
        "identity": {"header": "x-aigw-consumer"},
        "rules": [{"name": "burst", "limits": [{"requests": LIMIT, "per": "hour"}]}]
    });
    let g = start(&with_policy(&gateway_yaml(), &policy), 2);
    let mut admitted = 0;
    let mut denied = 0;
    for round in 0..3 {
        let statuses = burst(
            &g,
            40,
            vec![
                ("x-aigw-consumer".into(), "burst-1".into()),
                ("x-mock-ttft-ms".into(), "20".into()),
            ],
            chat(&[]),
        );
        admitted += statuses.iter().filter(|s| **s == 200).count();
        denied += statuses.iter().filter(|s| **s == 429).count();
        assert_eq!(
            statuses.iter().filter(|s| **s != 200 && **s != 429).count(),
            0,
            "round {round}: {statuses:?}"
        );
    }
    eprintln!("concurrency test: limit {LIMIT}, 120 requests in 3 bursts of 40 over 2 workers: {admitted} admitted, {denied} denied, overshoot {}", admitted as i64 - LIMIT as i64);
    assert_eq!(admitted, LIMIT, "exactly the limit is admitted");
    assert_eq!(denied, 120 - LIMIT);
    // Both workers served: the counters really were shared between them.
    let stats = g.envoy.admin("/stats?filter=worker_.*downstream_cx_total");
    let served: Vec<u64> = ["worker_0.", "worker_1."]
        .iter()
        .map(|w| {
            stats
                .lines()
                .filter(|l| l.contains(w))
                .filter_map(|l| l.rsplit_once(": ")?.1.trim().parse::<u64>().ok())
                .sum()
        })
        .collect();
    eprintln!("connections per worker: {served:?}");
    assert!(served.iter().all(|n| *n > 0), "{stats}");
}

#[test]
fn concurrent_streams_never_overshoot_a_token_limit() {
    const LIMIT: u64 = 300;
    clear_of_window_edge(3600, 60);
    let policy = json!({
        "identity": {"header": "x-aigw-consumer"},
        "rules": [{"name": "tokens", "limits": [{"total_tokens": LIMIT, "per": "hour"}]}]
    });
    let g = start(&with_policy(&gateway_yaml(), &policy), 2);
    // Each stream reserves 5 (prompt estimate) + 20 (max_tokens) and uses
    // 4 + 20 (the mock's 20 chunks over a second, so all are in flight at once).
    let body = chat(&[("stream", json!(true)), ("max_tokens", json!(20))]);
    let headers = vec![
        ("x-aigw-consumer".to_string(), "streams-1".to_string()),
        ("x-mock-chunks".into(), "20".into()),
        ("x-mock-chunk-delay-ms".into(), "50".into()),
    ];
    let statuses = burst(&g, 30, headers.clone(), body.clone());
    let admitted = statuses.iter().filter(|s| **s == 200).count() as u64;
    // 300 / 25 = 12 reservations fit; every stream in flight at once.
    assert_eq!(admitted, LIMIT / 25, "{statuses:?}");
    let lines = g.envoy.log_lines("streams-1", 30);
    let used: u64 = lines
        .iter()
        .filter(|l| l["ratelimit"] == "allow")
        .map(|l| l["total_tokens"].as_u64().unwrap())
        .sum();
    eprintln!("token test: limit {LIMIT}, 30 concurrent streams: {admitted} admitted, {used} tokens used, overshoot {}", used as i64 - LIMIT as i64);
    assert!(used <= LIMIT, "{used} tokens used of {LIMIT}");
    assert_eq!(used, admitted * 24);
    // Settled: each stream gave back 1 token, so 12 remain: a 12-token
    // request (5 + 7) fits, a 13-token one did not before it.
    let small = chat(&[("max_tokens", json!(8))]);
    let r = post(&g, &[("x-aigw-consumer", "streams-1")], &small);
    assert_eq!(r.status, 429, "13 tokens do not fit in 12: {}", r.text());
    let small = chat(&[("max_tokens", json!(7))]);
    let r = post(
        &g,
        &[("x-aigw-consumer", "streams-1"), ("x-mock-chunks", "7")],
        &small,
    );
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn a_client_that_hangs_up_is_charged_what_it_used() {
    clear_of_window_edge(3600, 60);
    let policy = json!({
        "identity": {"header": "x-aigw-consumer"},
        "rules": [{"name": "cut", "limits": [{"total_tokens": 1000, "per": "hour"}]}]
    });
    let g = start(&with_policy(&gateway_yaml(), &policy), 1);
    // Reserves 5 + 500; the client leaves after four of 200 slow pieces.
    let body = chat(&[("stream", json!(true)), ("max_tokens", json!(500))]);
    let seen = client::post_and_hang_up(
        g.envoy.addr(),
        "/v1/chat/completions",
        &[
            ("content-type", "application/json"),
            ("x-aigw-consumer", "hangs-up-1"),
            ("x-mock-chunks", "200"),
            ("x-mock-chunk-delay-ms", "20"),
        ],
        &body,
        "w3 ",
    )
    .unwrap();
    assert!(String::from_utf8_lossy(&seen).contains("x-ratelimit-remaining-tokens: 495"));
    let line = g.envoy.log_line("hangs-up-1").unwrap();
    assert_eq!(line["usage_source"], "estimated", "{line}");
    let used = line["total_tokens"].as_u64().unwrap();
    assert!(used < 100, "{line}");
    // What was not used came back: 1000 - used remain before the next reservation (5 + 10).
    let next = chat(&[("max_tokens", json!(10))]);
    let r = as_consumer(&g, "hangs-up-1", &next);
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("x-ratelimit-remaining-tokens"),
        Some(&*(1000 - used - 15).to_string()),
        "{line}"
    );
}

#[test]
fn budgets_answer_insufficient_quota() {
    let policy = json!({
        "identity": {"header": "x-aigw-consumer"},
        "rules": [{"name": "daily", "budgets": [{"total_tokens": 30, "per": "day"}]}]
    });
    let g = start(&with_policy(&gateway_yaml(), &policy), 1);
    let body = chat(&[("max_tokens", json!(5))]);
    // 9 tokens a request: three fit (27), the fourth's reservation (10) does not.
    for _ in 0..3 {
        assert_eq!(as_consumer(&g, "budget-1", &body).status, 200);
    }
    let r = as_consumer(&g, "budget-1", &body);
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["error"]["code"], "insufficient_quota");
    assert_eq!(r.json()["error"]["type"], "insufficient_quota");
    assert_eq!(r.header("x-ratelimit-remaining-tokens"), Some("3"));
}

#[test]
fn shadow_rules_log_shadow_deny_and_let_requests_through() {
    let policy = json!({
        "identity": {"header": "x-aigw-consumer"},
        "rules": [{"name": "trial", "shadow": true, "limits": [{"requests": 2, "per": "hour"}]}]
    });
    let g = start(&with_policy(&gateway_yaml(), &policy), 1);
    for _ in 0..4 {
        assert_eq!(as_consumer(&g, "shadow-1", &chat(&[])).status, 200);
    }
    let lines = g.envoy.log_lines("shadow-1", 4);
    let outcomes: Vec<&str> = lines
        .iter()
        .map(|l| l["ratelimit"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["allow", "allow", "shadow_deny", "shadow_deny"]);
    assert_eq!(
        g.envoy.metric_eventually(
            "aigw_ratelimit_requests_total",
            &[
                ("rule", "trial"),
                ("consumer", "shadow-1"),
                ("outcome", "shadow_deny")
            ],
            2.0,
        ),
        Some(2.0)
    );
}

#[test]
fn api_keys_name_the_consumer_and_a_spoofed_header_is_ignored() {
    let digest = |k: &str| aigw_shared::identity::key_digest(k);
    let policy = json!({
        "identity": {"api_keys": {digest("sk-alice-1"): "alice-k", digest("sk-bob-1"): "bob-k"}},
        "rules": [{"name": "keys", "limits": [{"requests": 2, "per": "hour"}]}]
    });
    let g = start(&with_policy(&gateway_yaml(), &policy), 1);
    let body = chat(&[]);
    // bob spends alice's budget by claiming to be her: he cannot.
    for _ in 0..2 {
        let r = post(
            &g,
            &[
                ("authorization", "Bearer sk-bob-1"),
                ("x-aigw-consumer", "alice-k"),
            ],
            &body,
        );
        assert_eq!(r.status, 200);
    }
    let r = post(
        &g,
        &[
            ("authorization", "Bearer sk-bob-1"),
            ("x-aigw-consumer", "alice-k"),
        ],
        &body,
    );
    assert_eq!(r.status, 429);
    assert!(r.text().contains("consumer bob-k"), "{}", r.text());
    let r = post(&g, &[("api-key", "sk-alice-1")], &body);
    assert_eq!(r.status, 200);
    // The upstream saw the consumer the key names.
    assert_eq!(
        g._mock.last_request().unwrap().header("x-aigw-consumer"),
        Some("alice-k")
    );
    let lines = g.envoy.log_lines("bob-k", 3);
    assert_eq!(
        lines.len(),
        3,
        "the log names the key's consumer, not the header's"
    );
    assert!(g.envoy.log_line("alice-k").is_some());
    // Unknown keys and no key: 401 in the OpenAI shape.
    for h in [
        vec![("authorization", "Bearer sk-mallory")],
        vec![("x-aigw-consumer", "alice-k")],
    ] {
        let r = post(&g, &h, &body);
        assert_eq!(r.status, 401, "{h:?}");
        assert_eq!(r.json()["error"]["code"], "invalid_api_key");
    }
}

#[test]
fn a_bad_configuration_is_refused_by_envoy_with_the_field_named() {
    let policy = json!({"rules": [{"name": "bad", "limits": [{"requests": 0, "per": "minute"}]}]});
    let mock = MockLlm::start().unwrap();
    let err = Envoy::start_text(&with_policy(&gateway_yaml(), &policy), mock.addr())
        .err()
        .expect("envoy refuses the configuration");
    let want = match aigw_tests::harness::gateway_yaml_path() {
        "envoy/gateway-bundle.yaml" => {
            "gateway: invalid configuration: rate_limit.rules[0].limits[0].requests: 0 is not a positive limit"
        }
        _ => "rate-limit: invalid configuration: rules[0].limits[0].requests: 0 is not a positive limit",
    };
    assert!(err.contains(want), "{err}");
}

// ---- Global mode: a real rate limit service over a real Redis ----

/// A redis-server on a loopback port of its own, stopped on drop.
struct Redis {
    child: std::process::Child,
    port: u16,
}

impl Redis {
    fn start() -> Redis {
        let port = aigw_tests::harness::free_port().unwrap();
        let child = std::process::Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (installed by ./scripts/setup.sh)");
        // Owned before the wait, so a failed start still stops it.
        let redis = Redis { child, port };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        redis
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The test rate limit service in front of `redis`, stopped on drop.
struct Rls {
    child: std::process::Child,
    addr: std::net::SocketAddr,
}

impl Rls {
    fn start(redis: &Redis, config: &str, delay_ms: u64) -> Rls {
        use std::io::BufRead;
        let bin = root().join("target/release/aigw-ratelimit-service");
        let mut child = std::process::Command::new(&bin)
            .args([
                "--addr",
                "127.0.0.1:0",
                "--redis",
                &format!("127.0.0.1:{}", redis.port),
            ])
            .arg("--config")
            .arg(root().join(config))
            .args(["--delay-ms", &delay_ms.to_string()])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e} (run ./scripts/build.sh)", bin.display()));
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on http://")
            .unwrap_or_else(|| panic!("rate limit service said {line:?}"))
            .parse()
            .unwrap();
        Rls { child, addr }
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Rls {
    fn drop(&mut self) {
        self.stop();
    }
}

fn rate_limit_yaml() -> String {
    std::fs::read_to_string(root().join("envoy/rate-limit.yaml")).unwrap()
}

fn global_envoy(yaml: &str, mock: &MockLlm, rls: std::net::SocketAddr) -> Envoy {
    Envoy::start_with_clusters(
        yaml,
        &format!("http://{}", mock.addr()),
        None,
        &[("ratelimit", rls)],
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

fn post_to(envoy: &Envoy, headers: &[(&str, &str)]) -> Response {
    let mut h = vec![("content-type", "application/json")];
    h.extend_from_slice(headers);
    client::post(envoy.addr(), "/v1/chat/completions", &h, &chat(&[])).unwrap()
}

#[test]
fn two_envoys_share_one_global_budget_through_the_redis_backed_service() {
    clear_of_window_edge(60, 20);
    let redis = Redis::start();
    let rls = Rls::start(&redis, "envoy/ratelimit-service.yaml", 0);
    let mock = MockLlm::start().unwrap();
    let yaml = rate_limit_yaml();
    let a = global_envoy(&yaml, &mock, rls.addr);
    let b = global_envoy(&yaml, &mock, rls.addr);
    let alice = [("authorization", "Bearer sk-aigw-demo-alice")];
    // 60 a minute for alice, whichever Envoy she reaches.
    for i in 0..60 {
        let envoy = if i % 2 == 0 { &a } else { &b };
        let r = post_to(envoy, &alice);
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        assert_eq!(
            r.header("x-ratelimit-remaining-requests"),
            Some(&*(59 - i).to_string()),
            "request {i}"
        );
    }
    for envoy in [&a, &b] {
        let r = post_to(envoy, &alice);
        assert_eq!(r.status, 429, "{}", r.text());
        assert_eq!(r.json()["error"]["code"], "rate_limit_exceeded");
        let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
        assert!((1..=60).contains(&retry), "{retry}");
        assert_eq!(r.header("x-ratelimit-limit-requests"), Some("60"));
    }
    // bob has his own budget, and cannot spend alice's by naming her.
    let r = post_to(
        &b,
        &[
            ("x-api-key", "sk-aigw-demo-bob"),
            ("x-aigw-consumer", "alice"),
        ],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("59"));
    let lines = b.log_lines("alice", 31);
    assert_eq!(lines.iter().filter(|l| l["ratelimit"] == "deny").count(), 1);
    assert!(b.log_line("bob").is_some());
}

#[test]
fn a_stopped_or_slow_service_follows_the_failure_mode_within_the_timeout() {
    let redis = Redis::start();
    let mock = MockLlm::start().unwrap();
    for (mode, want) in [("allow", 200), ("deny", 503)] {
        let yaml = rate_limit_yaml().replace(
            "\"failure_mode\": \"allow\"",
            &format!("\"failure_mode\": \"{mode}\""),
        );
        assert!(yaml.contains(&format!("\"failure_mode\": \"{mode}\"")));
        let bob = [("authorization", "Bearer sk-aigw-demo-bob")];

        // Stopped: it answered, then it is gone.
        let mut rls = Rls::start(&redis, "envoy/ratelimit-service.yaml", 0);
        let envoy = global_envoy(&yaml, &mock, rls.addr);
        assert_eq!(post_to(&envoy, &bob).status, 200);
        rls.stop();
        let r = post_to(&envoy, &bob);
        assert_eq!(r.status, want, "{mode}, service stopped: {}", r.text());
        if want == 503 {
            assert_eq!(r.json()["error"]["code"], "rate_limit_service_unavailable");
        }
        drop(envoy);

        // Slow: answers after 1.5 s; the filter waits 200 ms.
        let slow = Rls::start(&redis, "envoy/ratelimit-service.yaml", 1500);
        let envoy = global_envoy(&yaml, &mock, slow.addr);
        let started = std::time::Instant::now();
        let r = post_to(&envoy, &bob);
        let took = started.elapsed();
        assert_eq!(r.status, want, "{mode}, service slow: {}", r.text());
        assert!(
            took < Duration::from_millis(1200),
            "{mode}: took {took:?}, past the timeout"
        );
        let line = envoy.log_line("bob").unwrap();
        assert_eq!(line["status"], want);
    }
}
