//! prompt-cache through the real Envoy with the real `.wasm`, behind the real
//! token meter, in front of the mock LLM; the shared tier is a real Redis
//! behind a real webdis, started here on loopback ports chosen at run time.
//!
//! Each request carries its own consumer id (tests run in parallel, each with
//! its own Envoy, so ids only need to be unique within a test).

// Test code: a failed expectation is a panic with a message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use aigw_tests::client::{self, Response};
use aigw_tests::harness::{free_port, root, Envoy, Scratch};
use aigw_tests::mock::MockLlm;
use serde_json::{json, Value};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const CHAT: &str = "/v1/chat/completions";

struct Gateway {
    // Envoy first: it is dropped first, and prints its log if the test failed.
    envoy: Envoy,
    mock: MockLlm,
}

/// The YAML, as edited; gateway.yaml without content-screen and rate-limit,
/// whose answers (a refused body that is not JSON, a 429 after 60 requests,
/// a default consumer) are not what these tests are about.
fn gateway_text(yaml: &str, edit: impl Fn(String) -> String) -> String {
    let text = std::fs::read_to_string(root().join(yaml)).unwrap();
    let text = if yaml == "envoy/gateway.yaml" {
        aigw_tests::harness::without(&text, &["content-screen", "rate-limit"])
    } else {
        text
    };
    edit(text)
}

fn gateway_with(yaml: &str, edit: impl Fn(String) -> String) -> Gateway {
    let mock = MockLlm::start().expect("mock LLM starts");
    let text = gateway_text(yaml, edit);
    let envoy = Envoy::start_text(&text, mock.addr()).unwrap_or_else(|e| panic!("{e}"));
    Gateway { envoy, mock }
}

fn gateway() -> Gateway {
    gateway_with("envoy/gateway.yaml", |t| t)
}

impl Gateway {
    fn post(&self, consumer: &str, extra: &[(&str, &str)], body: &str) -> Response {
        post(self.envoy.addr(), consumer, extra, body)
    }

    fn upstream_calls(&self) -> usize {
        self.mock.requests().len()
    }

    /// A counter once it reads `want` (the filter hands its counters to
    /// Envoy on a 1 s timer), or what it last read.
    fn metric(&self, name: &str, want: f64) -> f64 {
        self.envoy.metric_eventually(name, &[], want).unwrap_or(0.0)
    }
}

fn post(addr: SocketAddr, consumer: &str, extra: &[(&str, &str)], body: &str) -> Response {
    let mut headers = vec![
        ("x-aigw-consumer", consumer),
        ("content-type", "application/json"),
    ];
    headers.extend_from_slice(extra);
    send(addr, CHAT, &headers, body.as_bytes())
}

/// One request on a keep-alive connection, read to the end of its framing
/// (as HTTP clients read), not to the end of the socket: Envoy closes a
/// `connection: close` socket after a local reply only after its
/// `delayed_close_timeout` (1 s), which is no part of a hit's latency.
fn send(addr: SocketAddr, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Response {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut req = format!("POST {path} HTTP/1.1\r\nhost: aigw.test\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    s.write_all(&bytes).unwrap();
    let mut raw = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
            let rest = &raw[end + 4..];
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok());
            let done = match length {
                Some(n) => rest.len() >= n,
                None if head.contains("transfer-encoding: chunked") => client::dechunk(rest).1,
                None => false,
            };
            if done {
                break;
            }
        }
        let n = s.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
    }
    Response::parse(&raw).unwrap()
}

fn chat(prompt: &str, extra: Value) -> String {
    let mut body = json!({"model": "gpt-4o", "temperature": 0,
                          "messages": [{"role": "user", "content": prompt}]});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            b.insert(k.clone(), v.clone());
        }
    }
    body.to_string()
}

fn said(r: &Response) -> Option<&str> {
    r.header("x-aigw-cache")
}

#[test]
fn a_repeated_prompt_is_a_hit_that_never_reaches_the_upstream() {
    let g = gateway();
    let body = chat("one two three four", json!({}));
    let first = g.post("alice", &[], &body);
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(said(&first), Some("miss"));
    assert_eq!(g.upstream_calls(), 1);

    let hit = g.post("alice", &[], &body);
    assert_eq!(hit.status, 200);
    assert_eq!(said(&hit), Some("hit"));
    assert!(hit.header("age").is_some());
    assert_eq!(hit.json(), first.json(), "the answer replayed as it was");
    assert_eq!(g.upstream_calls(), 1, "a hit costs no upstream call");

    // The meter above counts the hit, as a hit, with the tokens it saved.
    let lines = g.envoy.log_lines("alice", 2);
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0]["cache"], "miss");
    assert_eq!(lines[1]["cache"], "hit");
    assert_eq!(lines[1]["status"], 200);
    assert_eq!(lines[1]["input_tokens"], lines[0]["input_tokens"]);
    assert_eq!(lines[1]["output_tokens"], 5);
    assert_eq!(lines[1]["usage_source"], "provider");
    assert_eq!(lines[1]["cost_usd"], 0.0, "nothing was paid for the hit");
    assert!(lines[0]["cost_usd"].as_f64().unwrap() > 0.0);
    // Upstream tokens count the miss only; the hit's are counted as saved.
    let output = [("consumer", "alice"), ("token_type", "output")];
    assert_eq!(
        g.envoy.metric_eventually("aigw_tokens_total", &output, 5.0),
        Some(5.0)
    );

    assert_eq!(g.metric("aigw_cache_hits_total", 1.0), 1.0);
    assert_eq!(g.metric("aigw_cache_stores_total", 1.0), 1.0);
    assert_eq!(g.metric("aigw_cache_tokens_saved_total", 9.0), 9.0);
}

#[test]
fn clients_bypass_skip_the_lookup_or_skip_the_store() {
    let g = gateway();
    let body = chat("five six", json!({}));
    let bypass = [("x-aigw-cache-bypass", "1")];
    assert_eq!(said(&g.post("bob", &bypass, &body)), Some("bypass"));
    assert_eq!(said(&g.post("bob", &bypass, &body)), Some("bypass"));
    let no_store = [("cache-control", "no-store")];
    assert_eq!(said(&g.post("bob", &no_store, &body)), Some("miss"));
    assert_eq!(
        said(&g.post("bob", &[], &body)),
        Some("miss"),
        "no-store kept nothing"
    );
    assert_eq!(said(&g.post("bob", &[], &body)), Some("hit"));
    let no_cache = [("cache-control", "no-cache")];
    let fresh = g.post("bob", &no_cache, &body);
    assert_eq!(said(&fresh), Some("miss"));
    assert_eq!(g.upstream_calls(), 5, "bypass x2, no-store, miss, no-cache");
    let lines = g.envoy.log_lines("bob", 6);
    let cache: Vec<&str> = lines.iter().map(|l| l["cache"].as_str().unwrap()).collect();
    assert_eq!(cache, ["bypass", "bypass", "miss", "miss", "hit", "miss"]);

    // Bad bodies are passed on (the upstream answers them), never cached.
    for bad in ["{not json", "[1]", "\u{1}"] {
        for _ in 0..2 {
            let r = g.post("bob", &[], bad);
            assert_eq!(said(&r), Some("bypass"), "{bad:?}: {}", r.text());
        }
    }
    let mut raw = b"{\"model\":\"gpt-4o\",\"messages\":[{\"role\":\"user\",\"content\":\"".to_vec();
    raw.extend_from_slice(b"\xff\xfe\"}]}");
    let headers = [
        ("x-aigw-consumer", "bob"),
        ("content-type", "application/json"),
    ];
    let r = send(g.envoy.addr(), CHAT, &headers, &raw);
    assert_eq!(said(&r), Some("bypass"));
    assert_eq!(g.metric("aigw_cache_bypasses_total", 9.0), 9.0);
}

#[test]
fn tenants_never_share_and_every_parameter_counts() {
    let g = gateway();
    let body = chat("same prompt", json!({}));
    assert_eq!(said(&g.post("tenant-a", &[], &body)), Some("miss"));
    assert_eq!(
        said(&g.post("tenant-b", &[], &body)),
        Some("miss"),
        "isolated"
    );
    assert_eq!(said(&g.post("tenant-a", &[], &body)), Some("hit"));
    assert_eq!(said(&g.post("tenant-b", &[], &body)), Some("hit"));
    let warmer = chat("same prompt", json!({"temperature": 0.7}));
    assert_eq!(said(&g.post("tenant-a", &[], &warmer)), Some("miss"));
    let mini = body.replace("\"gpt-4o\"", "\"gpt-4o-mini\"");
    assert_eq!(said(&g.post("tenant-a", &[], &mini)), Some("miss"));
    let capped = chat("same prompt", json!({"max_tokens": 3}));
    assert_eq!(said(&g.post("tenant-a", &[], &capped)), Some("miss"));
    // Excluded members do not split entries.
    let tagged = chat(
        "same prompt",
        json!({"user": "end-user-9", "metadata": {"k": "v"}}),
    );
    assert_eq!(said(&g.post("tenant-a", &[], &tagged)), Some("hit"));
    // No consumer: no scope, so no cache at all (never a shared anonymous entry).
    let anon = send(
        g.envoy.addr(),
        CHAT,
        &[("content-type", "application/json")],
        body.as_bytes(),
    );
    assert_eq!(said(&anon), Some("bypass"));
}

#[test]
fn a_streamed_answer_is_stored_and_replayed_as_sse_and_as_json() {
    let g = gateway();
    let plain = chat("stream me", json!({}));
    let streamed = chat("stream me", json!({"stream": true}));
    let first = g.post("carol", &[("x-mock-chunk-delay-ms", "5")], &streamed);
    assert_eq!(said(&first), Some("miss"));
    let first_text = first.text();
    assert!(first_text.ends_with("data: [DONE]\n\n"), "{first_text}");

    let sse = g.post("carol", &[], &streamed);
    assert_eq!(said(&sse), Some("hit"));
    assert_eq!(sse.header("content-type"), Some("text/event-stream"));
    let text = sse.text();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    // The client did not ask for usage: the stream it gets has none (the
    // meter asked for it on its behalf and takes it out again).
    assert!(!text.contains("\"usage\""), "{text}");
    let content: String = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(content, "w0 w1 w2 w3 w4 ");

    let with_usage = chat(
        "stream me",
        json!({"stream": true, "stream_options": {"include_usage": true}}),
    );
    let u = g.post("carol", &[], &with_usage);
    assert_eq!(said(&u), Some("hit"));
    assert!(u.text().contains("\"completion_tokens\":5"), "{}", u.text());

    let json = g.post("carol", &[], &plain);
    assert_eq!(said(&json), Some("hit"));
    assert_eq!(json.header("content-type"), Some("application/json"));
    let v = json.json();
    assert_eq!(v["choices"][0]["message"]["content"], "w0 w1 w2 w3 w4 ");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["completion_tokens"], 5);
    assert_eq!(g.upstream_calls(), 1);

    let lines = g.envoy.log_lines("carol", 4);
    for l in &lines[1..] {
        assert_eq!(l["cache"], "hit", "{l}");
        assert_eq!(l["output_tokens"], 5, "{l}");
    }

    // Anthropic and the Responses API replay in their own stream formats.
    let anthropic = json!({"model": "claude-sonnet-4-5", "max_tokens": 64, "temperature": 0,
        "stream": true, "messages": [{"role": "user", "content": "hello there"}]})
    .to_string();
    let headers = [
        ("x-aigw-consumer", "carol"),
        ("content-type", "application/json"),
    ];
    // Asked twice: a miss that is stored, then the hit it returns.
    let twice = |path: &str, body: &str| {
        let first = send(g.envoy.addr(), path, &headers, body.as_bytes());
        assert_eq!(said(&first), Some("miss"), "{path}");
        let again = send(g.envoy.addr(), path, &headers, body.as_bytes());
        assert_eq!(said(&again), Some("hit"), "{path}");
        again
    };
    let t = twice("/v1/messages", &anthropic).text();
    assert!(t.starts_with("event: message_start\n"), "{t}");
    assert!(
        t.ends_with("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"),
        "{t}"
    );
    let responses = json!({"model": "gpt-4o", "input": "hello there", "stream": true}).to_string();
    let r2 = twice("/v1/responses", &responses);
    assert!(
        r2.text().contains("event: response.completed\n"),
        "{}",
        r2.text()
    );
    let lines = g.envoy.log_lines("carol", 8);
    assert_eq!(lines[5]["cache"], "hit");
    assert_eq!(lines[5]["output_tokens"], 5, "{}", lines[5]);
    assert_eq!(lines[7]["output_tokens"], 5, "{}", lines[7]);
}

#[test]
fn entries_expire_after_their_ttl() {
    let g = gateway_with("envoy/gateway.yaml", |t| {
        t.replace("\"ttl_seconds\": 300", "\"ttl_seconds\": 1")
    });
    let body = chat("short lived", json!({}));
    assert_eq!(said(&g.post("dave", &[], &body)), Some("miss"));
    assert_eq!(said(&g.post("dave", &[], &body)), Some("hit"));
    std::thread::sleep(Duration::from_millis(1300));
    assert_eq!(said(&g.post("dave", &[], &body)), Some("miss"));
    assert_eq!(g.upstream_calls(), 2);
}

#[test]
fn the_memory_bound_holds_under_ten_times_the_capacity() {
    // 16 entries in 2 shards of 8, but only 3 KiB per shard: with entries of
    // about 600 bytes the byte bound binds first, at 5 per shard.
    let g = gateway_with("envoy/gateway.yaml", |t| {
        t.replace(
            "\"local\": { \"max_entries\": 1024, \"max_bytes\": 67108864 }",
            "\"local\": { \"max_entries\": 16, \"max_bytes\": 6144 }",
        )
    });
    let hot = chat("the hot question", json!({}));
    g.post("erin", &[], &hot);
    for i in 0..160 {
        let r = g.post("erin", &[], &chat(&format!("cold question {i}"), json!({})));
        assert_eq!(said(&r), Some("miss"));
        assert_eq!(said(&g.post("erin", &[], &hot)), Some("hit"), "after {i}");
    }
    let stores = g.metric("aigw_cache_stores_total", 161.0);
    let evictions = g
        .envoy
        .metric("aigw_cache_evictions_total", &[])
        .unwrap_or(0.0);
    assert_eq!(stores, 161.0);
    // At most 10 entries fit in the bytes: every store past them evicts one.
    assert!(
        evictions >= stores - 10.0,
        "stores {stores}, evictions {evictions}"
    );
    // The oldest cold entries are gone, the newest are there.
    assert_eq!(
        said(&g.post("erin", &[], &chat("cold question 0", json!({})))),
        Some("miss")
    );
    assert_eq!(
        said(&g.post("erin", &[], &chat("cold question 159", json!({})))),
        Some("hit")
    );
}

#[test]
fn a_bad_configuration_is_refused_by_envoy() {
    let mock = MockLlm::start().unwrap();
    let text = gateway_text("envoy/gateway.yaml", |t| {
        t.replace("\"ttl_seconds\": 300", "\"ttl_seconds\": 0")
    });
    let err = match Envoy::start_text(&text, mock.addr()) {
        Ok(_) => panic!("envoy accepted ttl_seconds 0"),
        Err(e) => e,
    };
    assert!(
        err.contains("prompt-cache: invalid configuration: ttl_seconds: 0 is outside"),
        "{err}"
    );
}

/// `prompt-cache.yaml` with this TTL and a short upstream timeout.
fn tiered(webdis: Option<SocketAddr>, mock: &MockLlm, ttl_seconds: u64) -> Envoy {
    let text = gateway_text("envoy/prompt-cache.yaml", |t| {
        t.replace(
            "\"ttl_seconds\": 300",
            &format!("\"ttl_seconds\": {ttl_seconds}"),
        )
        .replace("timeout: 60s", "timeout: 1s")
    });
    let upstream = format!("http://{}", mock.addr());
    // With no webdis, the cluster points at a port nobody listens on.
    let addr = webdis.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], free_port().unwrap())));
    Envoy::start_with_clusters(&text, &upstream, None, &[("webdis", addr)])
        .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn a_failed_upstream_is_answered_with_a_stale_entry() {
    let mock = MockLlm::start().unwrap();
    let envoy = tiered(None, &mock, 1);
    let body = chat("keep me around", json!({}));
    let first = post(envoy.addr(), "frank", &[], &body);
    assert_eq!(said(&first), Some("miss"));
    std::thread::sleep(Duration::from_millis(1300));
    for (name, knob) in [
        ("500", ("x-mock-status", "500")),
        ("429", ("x-mock-status", "429")),
        ("timeout", ("x-mock-ttft-ms", "3000")),
    ] {
        let r = post(envoy.addr(), "frank", &[knob], &body);
        assert_eq!(r.status, 200, "{name}: {}", r.text());
        assert_eq!(said(&r), Some("stale"), "{name}");
        assert_eq!(r.json(), first.json(), "{name}");
    }
    let streamed = chat("keep me around", json!({"stream": true}));
    let r = post(
        envoy.addr(),
        "frank",
        &[("x-mock-status", "503")],
        &streamed,
    );
    assert_eq!((r.status, said(&r)), (200, Some("stale")));
    assert!(r.text().ends_with("data: [DONE]\n\n"), "{}", r.text());
    // A 400 is the client's own: passed on.
    let r = post(envoy.addr(), "frank", &[("x-mock-status", "400")], &body);
    assert_eq!(r.status, 400);
    // Nothing cached for this one: the error is passed on.
    let other = chat("never seen", json!({}));
    let r = post(envoy.addr(), "frank", &[("x-mock-status", "500")], &other);
    assert_eq!((r.status, said(&r)), (500, Some("miss")));
    let lines = envoy.log_lines("frank", 7);
    assert_eq!(lines[1]["cache"], "stale");
    assert_eq!(lines[1]["status"], 200);
}

/// A Redis server and a webdis in front of it, on free loopback ports.
struct Tier {
    redis: Child,
    webdis: Child,
    addr: SocketAddr,
    _dir: Scratch,
}

impl Tier {
    fn start() -> Tier {
        let dir = Scratch::new("webdis").unwrap();
        let redis_port = free_port().unwrap();
        let http_port = free_port().unwrap();
        let redis = Command::new("redis-server")
            .args(["--port", &redis_port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (./scripts/setup.sh installs it)");
        let config = dir.path().join("webdis.json");
        let log = dir.path().join("webdis.log");
        let conf = json!({
            "redis_host": "127.0.0.1", "redis_port": redis_port, "redis_auth": null,
            "http_host": "127.0.0.1", "http_port": http_port, "threads": 2,
            "daemonize": false, "database": 0, "verbosity": 3, "logfile": log,
        });
        std::fs::write(&config, conf.to_string()).unwrap();
        wait_port(redis_port);
        let webdis = Command::new("webdis")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("webdis (./scripts/setup.sh installs it)");
        wait_port(http_port);
        Tier {
            redis,
            webdis,
            addr: SocketAddr::from(([127, 0, 0, 1], http_port)),
            _dir: dir,
        }
    }

    fn stop(&mut self) {
        let _ = self.webdis.kill();
        let _ = self.redis.kill();
        let _ = self.webdis.wait();
        let _ = self.redis.wait();
    }
}

impl Drop for Tier {
    fn drop(&mut self) {
        self.stop();
    }
}

fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn two_envoys_share_hits_through_redis_and_its_outage_costs_only_hits() {
    let mut tier = Tier::start();
    let mock = MockLlm::start().unwrap();
    let a = tiered(Some(tier.addr), &mock, 300);
    let b = tiered(Some(tier.addr), &mock, 300);
    let body = chat("shared across proxies", json!({}));
    let first = post(a.addr(), "grace", &[], &body);
    assert_eq!(said(&first), Some("miss"));
    // The store is a detached callout: give it a moment to land.
    let deadline = Instant::now() + Duration::from_secs(3);
    let hit = loop {
        std::thread::sleep(Duration::from_millis(100));
        let r = post(b.addr(), "grace", &[], &chat("probe", json!({})));
        assert_eq!(r.status, 200);
        let r = post(b.addr(), "grace", &[], &body);
        if said(&r) == Some("hit") || Instant::now() > deadline {
            break r;
        }
    };
    assert_eq!(said(&hit), Some("hit"), "B answers from what A stored");
    assert_eq!(hit.json(), first.json());
    let calls_with_body = mock
        .requests()
        .iter()
        .filter(|r| String::from_utf8_lossy(&r.body).contains("shared across proxies"))
        .count();
    assert_eq!(calls_with_body, 1, "one upstream call for two Envoys");
    // Another tenant on B still misses.
    assert_eq!(said(&post(b.addr(), "heidi", &[], &body)), Some("miss"));

    // Redis and webdis go away: requests go on, as misses; local hits remain.
    tier.stop();
    let fresh = chat("asked during the outage", json!({}));
    let r = post(a.addr(), "grace", &[], &fresh);
    assert_eq!((r.status, said(&r)), (200, Some("miss")));
    assert_eq!(said(&post(a.addr(), "grace", &[], &fresh)), Some("hit"));
    assert_eq!(
        said(&post(b.addr(), "grace", &[], &body)),
        Some("hit"),
        "local copy"
    );
    // Counters reach Envoy on the filter's 1 s timer.
    let deadline = Instant::now() + Duration::from_secs(5);
    let errors = loop {
        let n = a.metric("aigw_cache_tier_errors_total", &[]).unwrap_or(0.0)
            + a.metric("aigw_cache_misses_total", &[]).unwrap_or(0.0);
        if n >= 1.0 || Instant::now() > deadline {
            break n;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(errors >= 1.0);
}

/// Measures a hit against a miss through Envoy (printed for the issue note;
/// `cargo test -p aigw-tests --test prompt_cache latency -- --nocapture`).
#[test]
fn hit_latency_against_miss_latency() {
    let g = gateway();
    let n = 200;
    let mut miss = Vec::with_capacity(n);
    let mut hit = Vec::with_capacity(n);
    for i in 0..n {
        let body = chat(
            &format!("latency probe {i} {}", "pad ".repeat(200)),
            json!({}),
        );
        let t = Instant::now();
        let r = g.post("ivan", &[], &body);
        miss.push(t.elapsed());
        assert_eq!(said(&r), Some("miss"));
        let t = Instant::now();
        let r = g.post("ivan", &[], &body);
        hit.push(t.elapsed());
        assert_eq!(said(&r), Some("hit"));
    }
    miss.sort();
    hit.sort();
    let p = |v: &[Duration], q: usize| v[v.len() * q / 100].as_micros();
    println!(
        "prompt-cache through envoy, {n} requests each: miss p50 {} us p90 {} us; hit p50 {} us p90 {} us",
        p(&miss, 50),
        p(&miss, 90),
        p(&hit, 50),
        p(&hit, 90)
    );
    assert_eq!(g.upstream_calls(), n);
}

#[test]
fn hits_work_where_request_headers_cannot_be_held() {
    // As under Istio: no allow_on_headers_stop_iteration, hold_request_headers false.
    let g = gateway_with("envoy/gateway.yaml", |t| {
        t.replace(
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
        )
    });
    let body = chat("not held", json!({}));
    let first = g.post("judy", &[], &body);
    assert_eq!((first.status, said(&first)), (200, Some("miss")));
    let hit = g.post("judy", &[], &body);
    assert_eq!((hit.status, said(&hit)), (200, Some("hit")));
    assert_eq!(hit.json(), first.json());
    let complete = g
        .mock
        .requests()
        .iter()
        .filter(|r| String::from_utf8_lossy(&r.body).contains("not held"))
        .count();
    assert_eq!(complete, 1, "the hit's body never reached the upstream");
}
