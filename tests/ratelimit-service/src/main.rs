//! A rate limit service for the tests, in the manner of envoyproxy/ratelimit:
//! Envoy's `envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`
//! over gRPC (tonic, with the messages written out by hand for prost, so no
//! protoc), fixed windows counted in Redis with `INCRBY` + `EXPIRE`, and
//! limits configured in envoyproxy/ratelimit's YAML format (a tree of
//! descriptor keys and values, a key without a value counting each value
//! apart).
//!
//! Why not the `limitador` crate, which the design names: its
//! `redis_storage` feature without `disk_storage` does not compile (0.11 to
//! 0.14: `storage::keys` calls a `bin` module that only `disk_storage`
//! defines), and `disk_storage` builds RocksDB from C++ sources, which costs
//! CI more minutes than the whole test suite.
//!
//! Usage: `aigw-ratelimit-service --addr 127.0.0.1:0 --redis 127.0.0.1:6379
//! --config limits.yaml [--delay-ms N]`. It prints `listening on
//! http://ADDR` once it accepts. `--delay-ms` makes every answer late (the
//! tests' slow service).

use serde::Deserialize;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tonic::codegen::{empty_body, http, Body, BoxFuture, Context, Poll, Service, StdError};

/// The messages of `rls.proto`, as much of them as the service reads and writes.
mod pb {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RateLimitRequest {
        #[prost(string, tag = "1")]
        pub domain: String,
        #[prost(message, repeated, tag = "2")]
        pub descriptors: Vec<RateLimitDescriptor>,
        #[prost(uint32, tag = "3")]
        pub hits_addend: u32,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RateLimitDescriptor {
        #[prost(message, repeated, tag = "1")]
        pub entries: Vec<Entry>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Entry {
        #[prost(string, tag = "1")]
        pub key: String,
        #[prost(string, tag = "2")]
        pub value: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RateLimitResponse {
        /// `Code`: 0 unknown, 1 OK, 2 OVER_LIMIT.
        #[prost(int32, tag = "1")]
        pub overall_code: i32,
        #[prost(message, repeated, tag = "2")]
        pub statuses: Vec<DescriptorStatus>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct DescriptorStatus {
        #[prost(int32, tag = "1")]
        pub code: i32,
        #[prost(message, optional, tag = "2")]
        pub current_limit: Option<RateLimit>,
        #[prost(uint32, tag = "3")]
        pub limit_remaining: u32,
        #[prost(message, optional, tag = "4")]
        pub duration_until_reset: Option<Duration>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RateLimit {
        #[prost(uint32, tag = "1")]
        pub requests_per_unit: u32,
        /// `Unit`: 1 second, 2 minute, 3 hour, 4 day, 5 month, 6 year.
        #[prost(int32, tag = "2")]
        pub unit: i32,
        #[prost(string, tag = "3")]
        pub name: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Duration {
        #[prost(int64, tag = "1")]
        pub seconds: i64,
        #[prost(int32, tag = "2")]
        pub nanos: i32,
    }
}

const OK: i32 = 1;
const OVER_LIMIT: i32 = 2;

/// envoyproxy/ratelimit's configuration file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    domain: String,
    #[serde(default)]
    descriptors: Vec<Node>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Node {
    key: String,
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    rate_limit: Option<LimitConfig>,
    #[serde(default)]
    descriptors: Vec<Node>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitConfig {
    unit: String,
    requests_per_unit: u32,
}

/// A limit that a descriptor reached: its size, window and proto unit.
#[derive(Clone, Copy, Debug)]
struct Limit {
    max: u32,
    secs: u64,
    unit: i32,
}

fn unit(name: &str) -> Option<(u64, i32)> {
    Some(match name.to_ascii_lowercase().as_str() {
        "second" => (1, 1),
        "minute" => (60, 2),
        "hour" => (3600, 3),
        "day" => (86_400, 4),
        "month" => (30 * 86_400, 5),
        "year" => (365 * 86_400, 6),
        _ => return None,
    })
}

/// The limit a descriptor's entries reach, walking the tree as
/// envoyproxy/ratelimit does: `key` + `value` first, then `key` alone.
fn find<'a>(nodes: &'a [Node], entries: &[pb::Entry]) -> Option<&'a Node> {
    let (first, rest) = entries.split_first()?;
    let node = nodes
        .iter()
        .find(|n| n.key == first.key && n.value.as_deref() == Some(first.value.as_str()))
        .or_else(|| {
            nodes
                .iter()
                .find(|n| n.key == first.key && n.value.is_none())
        })?;
    if rest.is_empty() {
        Some(node)
    } else {
        find(&node.descriptors, rest)
    }
}

struct State {
    config: Config,
    redis: String,
    delay: Duration,
}

/// Adds `hits` to each key in Redis (`INCRBY`, then `EXPIRE` for the
/// window), in one pipeline; returns the counts after.
async fn incr(redis: &str, keys: &[(String, u64)], hits: u64) -> std::io::Result<Vec<u64>> {
    let stream = TcpStream::connect(redis).await?;
    let (read, mut write) = stream.into_split();
    let mut out = Vec::new();
    let arg = |out: &mut Vec<u8>, a: &str| {
        out.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
    };
    for (key, secs) in keys {
        out.extend_from_slice(b"*3\r\n");
        arg(&mut out, "INCRBY");
        arg(&mut out, key);
        arg(&mut out, &hits.to_string());
        out.extend_from_slice(b"*3\r\n");
        arg(&mut out, "EXPIRE");
        arg(&mut out, key);
        arg(&mut out, &secs.to_string());
    }
    write.write_all(&out).await?;
    let mut lines = BufReader::new(read).lines();
    let mut counts = Vec::new();
    for i in 0..keys.len() * 2 {
        let line = lines
            .next_line()
            .await?
            .ok_or_else(|| std::io::Error::other("redis closed the connection"))?;
        let n = line
            .strip_prefix(':')
            .and_then(|n| n.parse::<u64>().ok())
            .ok_or_else(|| std::io::Error::other(format!("redis answered {line:?}")))?;
        if i % 2 == 0 {
            counts.push(n);
        }
    }
    Ok(counts)
}

async fn should_rate_limit(
    state: &State,
    req: pb::RateLimitRequest,
) -> Result<pb::RateLimitResponse, tonic::Status> {
    tokio::time::sleep(state.delay).await;
    if req.domain != state.config.domain {
        return Err(tonic::Status::invalid_argument(format!(
            "unknown domain {:?}",
            req.domain
        )));
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|e| tonic::Status::internal(e.to_string()))?;
    let hits = u64::from(req.hits_addend.max(1));
    let mut limits: Vec<Option<(Limit, String, u64)>> = Vec::new();
    for d in &req.descriptors {
        let node = find(&state.config.descriptors, &d.entries);
        let limit = node.and_then(|n| {
            let l = n.rate_limit.as_ref()?;
            let (secs, unit) = unit(&l.unit)?;
            Some(Limit {
                max: l.requests_per_unit,
                secs,
                unit,
            })
        });
        limits.push(limit.map(|l| {
            let start = now.as_secs() - now.as_secs() % l.secs;
            let mut key = req.domain.clone();
            for e in &d.entries {
                key.push_str(&format!("_{}_{}", e.key, e.value));
            }
            key.push_str(&format!("_{start}"));
            (l, key, start + l.secs)
        }));
    }
    let keys: Vec<(String, u64)> = limits
        .iter()
        .flatten()
        .map(|(l, k, _)| (k.clone(), l.secs))
        .collect();
    let counts = incr(&state.redis, &keys, hits)
        .await
        .map_err(|e| tonic::Status::unavailable(format!("redis: {e}")))?;
    let mut counts = counts.into_iter();
    let mut overall = OK;
    let mut statuses = Vec::new();
    for limit in limits {
        let Some((l, _, end)) = limit else {
            statuses.push(pb::DescriptorStatus {
                code: OK,
                ..Default::default()
            });
            continue;
        };
        let after = counts.next().unwrap_or(0);
        let over = after > u64::from(l.max);
        if over {
            overall = OVER_LIMIT;
        }
        let left = Duration::from_secs(end).saturating_sub(now);
        statuses.push(pb::DescriptorStatus {
            code: if over { OVER_LIMIT } else { OK },
            current_limit: Some(pb::RateLimit {
                requests_per_unit: l.max,
                unit: l.unit,
                name: String::new(),
            }),
            limit_remaining: u32::try_from(u64::from(l.max).saturating_sub(after)).unwrap_or(0),
            duration_until_reset: Some(pb::Duration {
                seconds: i64::try_from(left.as_secs()).unwrap_or(i64::MAX),
                nanos: i32::try_from(left.subsec_nanos()).unwrap_or(0),
            }),
        });
    }
    Ok(pb::RateLimitResponse {
        overall_code: overall,
        statuses,
    })
}

/// The gRPC service, written out as tonic's generated code would be.
#[derive(Clone)]
struct Rls(Arc<State>);

impl tonic::server::NamedService for Rls {
    const NAME: &'static str = "envoy.service.ratelimit.v3.RateLimitService";
}

struct ShouldRateLimit(Arc<State>);

impl tonic::server::UnaryService<pb::RateLimitRequest> for ShouldRateLimit {
    type Response = pb::RateLimitResponse;
    type Future = BoxFuture<tonic::Response<Self::Response>, tonic::Status>;
    fn call(&mut self, request: tonic::Request<pb::RateLimitRequest>) -> Self::Future {
        let state = Arc::clone(&self.0);
        Box::pin(async move {
            should_rate_limit(&state, request.into_inner())
                .await
                .map(tonic::Response::new)
        })
    }
}

impl<B> Service<http::Request<B>> for Rls
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::BoxBody>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() == "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit" {
            let state = Arc::clone(&self.0);
            return Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(tonic::codec::ProstCodec::default());
                Ok(grpc.unary(ShouldRateLimit(state), req).await)
            });
        }
        Box::pin(async move {
            let mut res = http::Response::new(empty_body());
            res.headers_mut()
                .insert("grpc-status", http::HeaderValue::from_static("12"));
            res.headers_mut().insert(
                "content-type",
                http::HeaderValue::from_static("application/grpc"),
            );
            Ok(res)
        })
    }
}

fn args() -> Result<(String, String, Config, Duration), String> {
    let mut flags: HashMap<String, String> = HashMap::new();
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        flags.insert(flag, value);
    }
    let get = |f: &str| flags.get(f).cloned().ok_or(format!("{f} is required"));
    let path = get("--config")?;
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    let config: Config = serde_norway::from_str(&text).map_err(|e| format!("{path}: {e}"))?;
    let delay = match flags.get("--delay-ms") {
        Some(ms) => Duration::from_millis(ms.parse().map_err(|e| format!("--delay-ms: {e}"))?),
        None => Duration::ZERO,
    };
    Ok((get("--addr")?, get("--redis")?, config, delay))
}

fn main() -> std::process::ExitCode {
    let (addr, redis, config, delay) = match args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("aigw-ratelimit-service: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("aigw-ratelimit-service: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result: Result<(), String> = runtime.block_on(async move {
        let listener = TcpListener::bind(&addr)
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
        let local = listener.local_addr().map_err(|e| e.to_string())?;
        let incoming = tonic::transport::server::TcpIncoming::from_listener(listener, true, None)
            .map_err(|e| e.to_string())?;
        println!("listening on http://{local}");
        let state = Arc::new(State {
            config,
            redis,
            delay,
        });
        tonic::transport::Server::builder()
            .add_service(Rls(state))
            .serve_with_incoming(incoming)
            .await
            .map_err(|e| e.to_string())
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("aigw-ratelimit-service: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
