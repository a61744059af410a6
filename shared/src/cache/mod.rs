//! The prompt-cache stage: repeated prompts answered here, at once, for
//! nothing.
//!
//! It decides three things. *Whether* a request may use the cache: an LLM
//! call with a JSON object body under the size limit, a known scope (by
//! default the consumer, so one tenant is never served another's answer),
//! within the temperature and tools policy, and not bypassed by the client
//! (`Cache-Control: no-cache` skips the lookup, `no-store` the store, the
//! bypass header both). *Which* entry answers it: a BLAKE3 key over the
//! scope, the API, the model and the canonical body (see [`key`]). *What*
//! may be stored: a 200 whose finish reasons are allowed and whose stream,
//! if it streamed, ended whole and without an error event.
//!
//! A hit is a local reply from the request body step, so the request never
//! goes upstream and the reply passes back through the filters above (the
//! meter counts it; the screen screens it). The stored form is the JSON
//! answer, replayed as the provider's stream when the request streams (see
//! [`replay`]); a streamed answer is assembled as it passes, from copies of
//! the chunks, so the stream to the client is never delayed.
//!
//! Storage is local first (proxy-wasm shared data, bounded, see [`store`]),
//! then optionally Redis through webdis over an HTTP callout with a timeout;
//! a tier that fails costs only hits (fail-open). With `stale_on_error`, an
//! upstream 429 / 5xx / timeout is replaced in place (status, headers, body)
//! by the entry for the same key, even expired, within the stale window.
//!
//! The outcome is published once (`aigw.cache`), when it is final: on a hit
//! at once, otherwise with the response headers, where a miss may still turn
//! stale.

mod chunk;
pub mod key;
pub mod replay;
pub mod store;

use crate::boundary::HttpCall;
use crate::config::{self, ConfigError};
use crate::facts;
use crate::metrics::Registry;
use crate::stage::{CalloutResponse, Chunk, Env, Filter, Headers, Reply, RequestBody, Stage, Step};
use crate::wire::api::{self, Api, Operation};
use crate::wire::sse::{self, Item};
use key::Key;
use replay::Assembler;
use serde::Deserialize;
use serde_json::Value;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use store::{Entry, Local};

/// The configuration as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// `consumer` (default), `header` or `shared`.
    pub scope: Option<String>,
    /// The header whose value is the scope, with `scope: header`.
    pub scope_header: Option<String>,
    /// Where the consumer id is read when no filter published one (default `x-aigw-consumer`).
    pub consumer_header: Option<String>,
    /// Named scopes whose consumers share entries: `{"team-a": ["alice", "bob"]}`.
    pub scope_groups: BTreeMap<String, Vec<String>>,
    /// How long an entry is fresh (default 300).
    pub ttl_seconds: Option<u64>,
    /// Per-model TTLs (the requested model), overriding `ttl_seconds`.
    pub ttl_by_model: BTreeMap<String, u64>,
    /// Finish reasons worth keeping (default `["stop"]`; also `length`, `tool_calls`, `content_filter`).
    pub finish_reasons: Option<Vec<String>>,
    /// Cache only requests whose temperature (1.0 when absent) is at most this.
    pub max_temperature: Option<f64>,
    /// Do not cache requests that offer tools (default false).
    pub skip_with_tools: Option<bool>,
    /// Fold runs of whitespace in prompt text before keying (default false).
    pub fold_whitespace: Option<bool>,
    /// A request with this header (any value but `0`/`false`) neither reads nor writes the cache
    /// (default `x-aigw-cache-bypass`).
    pub bypass_header: Option<String>,
    /// Largest request body that is cached (default 1 MiB); larger ones bypass.
    pub max_request_bytes: Option<usize>,
    /// Hold request headers while the body is read, so a hit never reaches
    /// the upstream at all (default true; needs Envoy's
    /// `allow_on_headers_stop_iteration`). False lets the headers go on at
    /// once, for hosts that cannot set that option (Istio's WasmPlugin): a hit
    /// then resets the upstream request before its body is sent.
    pub hold_request_headers: Option<bool>,
    /// Largest answer stored (default 1 MiB; also bounded by the local shard size).
    pub max_answer_bytes: Option<usize>,
    pub local: LocalConfig,
    pub redis: Option<RedisConfig>,
    pub stale_on_error: Option<StaleConfig>,
    /// How often counters kept in VM memory are handed to Envoy, in ms
    /// (default 1000; 0: on every request).
    pub metrics_flush_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LocalConfig {
    /// Most entries kept (default 1024).
    pub max_entries: Option<usize>,
    /// Most bytes of entries kept (default 64 MiB).
    pub max_bytes: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// The Envoy cluster of the webdis server.
    pub cluster: String,
    /// `:authority` of the callouts (default: the cluster name).
    #[serde(default)]
    pub authority: Option<String>,
    /// Key prefix in Redis (default `aigw:cache:`).
    #[serde(default)]
    pub prefix: Option<String>,
    /// Lookup timeout (default 50).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaleConfig {
    /// How long past its TTL an entry may still stand in for a failed upstream.
    pub window_seconds: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Scope {
    Consumer,
    Header(String),
    Shared,
}

#[derive(Debug)]
struct Redis {
    cluster: String,
    authority: String,
    prefix: String,
    timeout_ms: u64,
}

/// The compiled configuration and the VM's metric ids.
#[derive(Debug)]
pub struct Cache {
    scope: Scope,
    consumer_header: String,
    groups: BTreeMap<String, String>,
    ttl_ms: u64,
    ttl_by_model: BTreeMap<String, u64>,
    finish_reasons: Vec<String>,
    max_temperature: Option<f64>,
    skip_with_tools: bool,
    fold_whitespace: bool,
    bypass_header: String,
    max_request_bytes: usize,
    hold_request_headers: bool,
    max_answer_bytes: usize,
    local: Local,
    redis: Option<Redis>,
    stale_ms: Option<u64>,
    registry: RefCell<Registry>,
}

pub const DEFAULT_BYPASS_HEADER: &str = "x-aigw-cache-bypass";
const FINISH_REASONS: &[&str] = &["stop", "length", "tool_calls", "content_filter"];
const MAX_SCOPE: usize = 256;

impl Cache {
    pub fn from_json(bytes: &[u8]) -> Result<Cache, ConfigError> {
        Cache::compile(config::parse(bytes)?)
    }

    pub fn compile(c: CacheConfig) -> Result<Cache, ConfigError> {
        let scope = match c.scope.as_deref().unwrap_or("consumer") {
            "consumer" => Scope::Consumer,
            "shared" => Scope::Shared,
            "header" => {
                let h = c.scope_header.as_deref().ok_or_else(|| {
                    ConfigError::new("scope_header", "is required with scope \"header\"")
                })?;
                Scope::Header(config::header_name("scope_header", h)?)
            }
            other => {
                return Err(ConfigError::new(
                    "scope",
                    format!("{other:?} is not one of consumer, header, shared"),
                ))
            }
        };
        if c.scope_header.is_some() && !matches!(scope, Scope::Header(_)) {
            return Err(ConfigError::new(
                "scope_header",
                "only applies with scope \"header\"",
            ));
        }
        let consumer_header = config::header_name(
            "consumer_header",
            c.consumer_header
                .as_deref()
                .unwrap_or(crate::meter::DEFAULT_CONSUMER_HEADER),
        )?;
        let mut groups = BTreeMap::new();
        for (name, members) in &c.scope_groups {
            let field = format!("scope_groups.{name}");
            if name.is_empty() || members.is_empty() {
                return Err(ConfigError::new(
                    field,
                    "needs a name and at least one consumer",
                ));
            }
            for m in members {
                if let Some(prev) = groups.insert(m.clone(), name.clone()) {
                    return Err(ConfigError::new(
                        field,
                        format!("consumer {m:?} is already in scope group {prev:?}"),
                    ));
                }
            }
        }
        // Seconds, up to 30 days, as milliseconds.
        let seconds = |field: &str, s: Option<u64>, default: u64| {
            config::within(field, s, default, 1..=30 * 86_400).map(|s| s * 1000)
        };
        let ttl_ms = seconds("ttl_seconds", c.ttl_seconds, 300)?;
        let mut ttl_by_model = BTreeMap::new();
        for (m, s) in &c.ttl_by_model {
            ttl_by_model.insert(
                m.clone(),
                seconds(&format!("ttl_by_model.{m}"), Some(*s), 300)?,
            );
        }
        let finish_reasons = c.finish_reasons.unwrap_or_else(|| vec!["stop".into()]);
        for (i, r) in finish_reasons.iter().enumerate() {
            if !FINISH_REASONS.contains(&r.as_str()) {
                return Err(ConfigError::new(
                    format!("finish_reasons[{i}]"),
                    format!("{r:?} is not one of {}", FINISH_REASONS.join(", ")),
                ));
            }
        }
        if let Some(t) = c.max_temperature {
            config::within("max_temperature", Some(t), 0.0, 0.0..=2.0)?;
        }
        let bypass_header = config::header_name(
            "bypass_header",
            c.bypass_header.as_deref().unwrap_or(DEFAULT_BYPASS_HEADER),
        )?;
        let max_request_bytes = config::within(
            "max_request_bytes",
            c.max_request_bytes,
            1 << 20,
            1024..=(64 << 20),
        )?;
        let max_entries = config::within(
            "local.max_entries",
            c.local.max_entries,
            1024,
            1..=1_000_000,
        )?;
        // Within a 32-bit usize: the filter runs in wasm32.
        let max_bytes = config::within(
            "local.max_bytes",
            c.local.max_bytes,
            64 << 20,
            4096..=(1 << 30),
        )?;
        let local = Local::new(max_entries, max_bytes);
        let max_answer_bytes = c.max_answer_bytes.unwrap_or(1 << 20);
        if max_answer_bytes < 256 {
            return Err(ConfigError::new("max_answer_bytes", "must be at least 256"));
        }
        let redis = match c.redis {
            None => None,
            Some(r) => {
                if r.cluster.is_empty() {
                    return Err(ConfigError::new(
                        "redis.cluster",
                        "must name an Envoy cluster",
                    ));
                }
                let prefix = r.prefix.unwrap_or_else(|| "aigw:cache:".into());
                if prefix
                    .bytes()
                    .any(|b| b == b'/' || b == b'.' || !b.is_ascii_graphic())
                {
                    return Err(ConfigError::new(
                        "redis.prefix",
                        format!(
                            "{prefix:?} may not contain '/', '.' or spaces (webdis reads them)"
                        ),
                    ));
                }
                let timeout_ms = config::within("redis.timeout_ms", r.timeout_ms, 50, 1..=10_000)?;
                Some(Redis {
                    authority: r.authority.unwrap_or_else(|| r.cluster.clone()),
                    cluster: r.cluster,
                    prefix,
                    timeout_ms,
                })
            }
        };
        let stale_ms = match c.stale_on_error {
            None => None,
            Some(s) => Some(seconds(
                "stale_on_error.window_seconds",
                Some(s.window_seconds),
                0,
            )?),
        };
        Ok(Cache {
            scope,
            consumer_header,
            groups,
            ttl_ms,
            ttl_by_model,
            finish_reasons,
            max_temperature: c.max_temperature,
            skip_with_tools: c.skip_with_tools.unwrap_or(false),
            fold_whitespace: c.fold_whitespace.unwrap_or(false),
            bypass_header,
            max_request_bytes,
            hold_request_headers: c.hold_request_headers.unwrap_or(true),
            max_answer_bytes,
            local,
            redis,
            stale_ms,
            registry: RefCell::new(Registry::flushed_every(
                crate::metrics::flush_ms(c.metrics_flush_ms)?,
                1024,
            )),
        })
    }

    fn count(&self, env: &mut Env<'_>, name: &str, model: Option<&str>, n: u64) {
        if let Ok(mut reg) = self.registry.try_borrow_mut() {
            let model = model.unwrap_or(crate::metrics::UNKNOWN);
            reg.add(env.metrics, name, &[("model", model)], n);
        }
    }
}

impl Filter for Cache {
    type Stage = CacheStage;
    const NAME: &'static str = "prompt-cache";

    fn from_config(bytes: &[u8]) -> Result<Self, ConfigError> {
        Cache::from_json(bytes)
    }

    fn stage(cache: &Rc<Self>) -> CacheStage {
        CacheStage::new(Rc::clone(cache))
    }

    fn registry(&self) -> Option<&RefCell<Registry>> {
        Some(&self.registry)
    }
}

/// Metric names (Prometheus: dots become underscores), each labelled by `model`.
pub mod metric {
    pub const HITS: &str = "aigw_cache_hits_total";
    pub const MISSES: &str = "aigw_cache_misses_total";
    pub const BYPASSES: &str = "aigw_cache_bypasses_total";
    pub const STALE: &str = "aigw_cache_stale_total";
    pub const STORES: &str = "aigw_cache_stores_total";
    pub const EVICTIONS: &str = "aigw_cache_evictions_total";
    pub const TOKENS_SAVED: &str = "aigw_cache_tokens_saved_total";
    /// Shared-tier lookups or stores that failed (timeouts, errors): hits lost, nothing else.
    pub const TIER_ERRORS: &str = "aigw_cache_tier_errors_total";
}

/// Where a request stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// Not an LLM call: the cache has nothing to say.
    None,
    Bypass,
    Miss,
    Hit,
    Stale,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::None => "off",
            Outcome::Bypass => "bypass",
            Outcome::Miss => "miss",
            Outcome::Hit => "hit",
            Outcome::Stale => "stale",
        }
    }
}

/// How the answer passing back is read for storing.
enum Capture {
    Off,
    Json(Vec<u8>),
    Sse {
        parser: Box<sse::Parser>,
        assembler: Box<Assembler>,
        bytes: usize,
    },
}

/// What the request asked for, once the body is read.
struct Asked {
    key: Key,
    stream: bool,
    include_usage: bool,
    model: Option<String>,
    no_cache: bool,
    no_store: bool,
}

/// The cache's work on one request.
pub struct CacheStage {
    cache: Rc<Cache>,
    api: Option<Api>,
    outcome: Outcome,
    no_cache: bool,
    no_store: bool,
    asked: Option<Asked>,
    /// An entry past its TTL but within the stale window (or any, with no-cache).
    stale: Option<Entry>,
    lookup_token: Option<u32>,
    capture: Capture,
    replace_body: Option<Vec<u8>>,
}

impl CacheStage {
    pub fn new(cache: Rc<Cache>) -> Self {
        CacheStage {
            cache,
            api: None,
            outcome: Outcome::None,
            no_cache: false,
            no_store: false,
            asked: None,
            stale: None,
            lookup_token: None,
            capture: Capture::Off,
            replace_body: None,
        }
    }

    fn scope(&self, env: &Env<'_>, headers: &Headers) -> Option<String> {
        let consumer = || {
            facts::text(env.state, facts::CONSUMER).or_else(|| {
                let v = headers.get(&self.cache.consumer_header)?.trim();
                (!v.is_empty()).then(|| v.to_string())
            })
        };
        let scope = match &self.cache.scope {
            Scope::Shared => "shared".to_string(),
            Scope::Header(h) => {
                let v = headers.get(h)?.trim();
                if v.is_empty() {
                    return None;
                }
                format!("header:{v}")
            }
            Scope::Consumer => {
                let c = consumer()?;
                match self.cache.groups.get(&c) {
                    Some(g) => format!("group:{g}"),
                    None => format!("consumer:{c}"),
                }
            }
        };
        (scope.len() <= MAX_SCOPE).then_some(scope)
    }

    fn bypass(&mut self, env: &mut Env<'_>) -> Step {
        self.outcome = Outcome::Bypass;
        let model = self.asked.as_ref().and_then(|a| a.model.clone());
        self.cache.count(env, metric::BYPASSES, model.as_deref(), 1);
        Step::Continue
    }

    /// Reads the body: `None` means bypass.
    fn ask(&self, env: &Env<'_>, body: &mut RequestBody, headers: &Headers) -> Option<Asked> {
        let api = self.api.as_ref()?;
        if body.is_truncated() || body.bytes().len() > self.cache.max_request_bytes {
            return None;
        }
        // Invalid UTF-8 or anything but a JSON object: not ours to cache.
        // The document another stage parsed is read if there is one (the
        // bundle's screen, when it could not read the bytes in place), else
        // the bytes in place, else (a member written twice, a body serde
        // may refuse) serde's reading.
        let fold = self.cache.fold_whitespace;
        let read = match body.parsed_json() {
            Some(Some(Value::Object(doc))) => key::Request::of_value(doc, fold),
            Some(_) => return None,
            None => match key::Request::walked(body.bytes(), fold) {
                Ok(read) => read,
                Err(_) => match body.json() {
                    Some(Value::Object(doc)) => key::Request::of_value(doc, fold),
                    _ => return None,
                },
            },
        };
        if let Some(max) = self.cache.max_temperature {
            if read.temperature? > max {
                return None;
            }
        }
        if self.cache.skip_with_tools && read.tools {
            return None;
        }
        let scope = self.scope(env, headers)?;
        let api_name = format!(
            "{}/{}/{}",
            crate::meter::operation_name(api.operation),
            api.family.name(),
            api.deployment.as_deref().unwrap_or("")
        );
        let routed = facts::route(env.state).and_then(|r| r.model);
        let ctx = key::Context {
            scope: &scope,
            api: &api_name,
            routed_model: routed.as_deref(),
        };
        let key = key::finish(&ctx, &read.form);
        let (stream, include_usage) = (read.stream, read.include_usage);
        let model = read.model.or_else(|| api.deployment.clone());
        Some(Asked {
            key,
            stream,
            include_usage,
            model,
            no_cache: self.no_cache,
            no_store: self.no_store,
        })
    }

    /// The entry as the request wants it: the reply a hit sends.
    fn reply(&self, entry: &Entry, now_ms: u64) -> Option<Reply> {
        let asked = self.asked.as_ref()?;
        let op = self.api.as_ref()?.operation;
        let (content_type, body) = self.render(entry, asked, op)?;
        let age = now_ms.saturating_sub(entry.created_ms) / 1000;
        Some(Reply {
            status: 200,
            headers: vec![
                ("content-type".into(), content_type.into()),
                ("x-aigw-cache".into(), "hit".into()),
                ("age".into(), age.to_string()),
            ],
            body,
            details: "aigw_cache_hit".into(),
        })
    }

    fn render(
        &self,
        entry: &Entry,
        asked: &Asked,
        op: Operation,
    ) -> Option<(&'static str, Vec<u8>)> {
        if asked.stream {
            let answer: Value = serde_json::from_slice(&entry.body).ok()?;
            let s = replay::to_stream(op, &answer, asked.include_usage)?;
            Some(("text/event-stream", s))
        } else {
            Some(("application/json", entry.body.clone()))
        }
    }

    fn hit(&mut self, env: &mut Env<'_>, entry: &Entry) -> Option<Step> {
        let now = env.clock.now_ms();
        let reply = self.reply(entry, now)?;
        self.outcome = Outcome::Hit;
        env.state.set(facts::CACHE, b"hit");
        let model = self.asked.as_ref().and_then(|a| a.model.clone());
        self.cache.count(env, metric::HITS, model.as_deref(), 1);
        self.cache
            .count(env, metric::TOKENS_SAVED, model.as_deref(), entry.tokens);
        Some(Step::Reply(reply))
    }

    fn miss(&mut self, env: &mut Env<'_>) -> Step {
        self.outcome = Outcome::Miss;
        let model = self.asked.as_ref().and_then(|a| a.model.clone());
        self.cache.count(env, metric::MISSES, model.as_deref(), 1);
        Step::Continue
    }

    /// Looks the key up locally, then in the shared tier.
    fn lookup(&mut self, env: &mut Env<'_>) -> Step {
        let Some(asked) = &self.asked else {
            return self.bypass(env);
        };
        let key = asked.key;
        let no_cache = asked.no_cache;
        let now = env.clock.now_ms();
        // With no-cache an entry is only wanted as a stale stand-in.
        let wanted = !no_cache || self.cache.stale_ms.is_some();
        if let Some(e) = wanted
            .then(|| self.cache.local.get(env.shared, &key, now))
            .flatten()
        {
            if e.is_fresh(now) && !no_cache {
                if let Some(step) = self.hit(env, &e) {
                    return step;
                }
            }
            if now < e.stale_until_ms {
                self.stale = Some(e);
            }
        }
        if no_cache {
            return self.miss(env);
        }
        if let Some(r) = &self.cache.redis {
            let call = HttpCall {
                cluster: r.cluster.clone(),
                headers: vec![
                    (":method".into(), "GET".into()),
                    (
                        ":path".into(),
                        format!("/GET/{}{}.txt", r.prefix, key.hex()),
                    ),
                    (":authority".into(), r.authority.clone()),
                ],
                body: Vec::new(),
                timeout_ms: r.timeout_ms,
            };
            match env.callouts.http(&call) {
                Ok(token) => {
                    self.lookup_token = Some(token);
                    return Step::Wait;
                }
                Err(_) => self.cache.count(env, metric::TIER_ERRORS, None, 1),
            }
        }
        self.miss(env)
    }

    /// Keeps an answer; `tokens` is what it saves, when it may be kept.
    fn store(&mut self, env: &mut Env<'_>, body: Vec<u8>, tokens: Option<u64>) {
        let (Some(asked), Some(tokens)) = (&self.asked, tokens) else {
            return;
        };
        let now = env.clock.now_ms();
        let ttl = asked
            .model
            .as_ref()
            .and_then(|m| self.cache.ttl_by_model.get(m))
            .copied()
            .unwrap_or(self.cache.ttl_ms);
        let expires_ms = now + ttl;
        let entry = Entry {
            key: asked.key,
            created_ms: now,
            expires_ms,
            stale_until_ms: expires_ms + self.cache.stale_ms.unwrap_or(0),
            tokens,
            body,
        };
        let model = asked.model.clone();
        let stored = self.cache.local.put(env.shared, &entry, now);
        if stored.stored {
            self.cache.count(env, metric::STORES, model.as_deref(), 1);
        }
        if stored.evicted > 0 {
            self.cache
                .count(env, metric::EVICTIONS, model.as_deref(), stored.evicted);
        }
        if let Some(r) = &self.cache.redis {
            let seconds = (entry.stale_until_ms - now).div_ceil(1000);
            let call = HttpCall {
                cluster: r.cluster.clone(),
                headers: vec![
                    (":method".into(), "PUT".into()),
                    (
                        ":path".into(),
                        format!("/SETEX/{}{}/{seconds}", r.prefix, entry.key.hex()),
                    ),
                    (":authority".into(), r.authority.clone()),
                    ("content-type".into(), "application/octet-stream".into()),
                ],
                body: entry.encode(),
                timeout_ms: 1000,
            };
            // Detached: the store outlives the request; its answer is not awaited.
            if env.callouts.http_detached(&call).is_err() {
                self.cache.count(env, metric::TIER_ERRORS, None, 1);
            }
        }
    }

    /// Stores what was captured, once the answer has ended.
    fn finish_capture(&mut self, env: &mut Env<'_>) {
        let capture = std::mem::replace(&mut self.capture, Capture::Off);
        let Some(op) = self.api.as_ref().map(|a| a.operation) else {
            return;
        };
        match capture {
            Capture::Off => {}
            Capture::Json(bytes) => {
                // Read in place, not parsed: the screen above reads it so too.
                let tokens = replay::keepable(op, &bytes, &self.cache.finish_reasons);
                self.store(env, bytes, tokens);
            }
            Capture::Sse {
                mut parser,
                mut assembler,
                ..
            } => {
                // A last event without its blank line still counts, as the standard says.
                parser.feed(b"\n\n", |item| {
                    if let Item::Event(e) = item {
                        assembler.event(e.event_type, e.data);
                    }
                });
                if let Some(answer) = assembler.finish() {
                    if let Ok(bytes) = serde_json::to_vec(&answer) {
                        if bytes.len() <= self.cache.max_answer_bytes {
                            let tokens =
                                replay::keepable_value(op, &answer, &self.cache.finish_reasons);
                            self.store(env, bytes, tokens);
                        }
                    }
                }
            }
        }
    }
}

/// `Cache-Control` directives the client may send: (no-cache, no-store).
fn cache_control(headers: &Headers) -> (bool, bool) {
    let Some(v) = headers.get("cache-control") else {
        return (false, false);
    };
    let mut out = (false, false);
    for d in v.split(',') {
        let d = d.trim().to_ascii_lowercase();
        match d.as_str() {
            "no-cache" | "max-age=0" => out.0 = true,
            "no-store" => out.1 = true,
            _ => {}
        }
    }
    out
}

impl Stage for CacheStage {
    fn request_headers(
        &mut self,
        env: &mut Env<'_>,
        headers: &mut Headers,
        end_of_stream: bool,
    ) -> Step {
        self.api = api::classify(
            headers.get(":method").unwrap_or(""),
            headers.get(":path").unwrap_or(""),
        );
        if self.api.is_none() {
            return Step::Continue;
        }
        let bypass = headers
            .get(&self.cache.bypass_header)
            .is_some_and(|v| !matches!(v.trim(), "0" | "false"));
        if bypass || end_of_stream {
            return self.bypass(env);
        }
        (self.no_cache, self.no_store) = cache_control(headers);
        // Held so that a hit never reaches the upstream, not even its headers.
        Step::ReadBody {
            hold_headers: self.cache.hold_request_headers,
        }
    }

    fn request_body(
        &mut self,
        env: &mut Env<'_>,
        body: &mut RequestBody,
        headers: &mut Headers,
    ) -> Step {
        if self.api.is_none() {
            return Step::Continue;
        }
        match self.ask(env, body, headers) {
            None => self.bypass(env),
            Some(asked) => {
                self.asked = Some(asked);
                self.lookup(env)
            }
        }
    }

    fn on_callout(
        &mut self,
        env: &mut Env<'_>,
        token: u32,
        response: &CalloutResponse,
        _headers: &mut Headers,
    ) -> Step {
        if self.lookup_token != Some(token) {
            return Step::Wait;
        }
        self.lookup_token = None;
        let Some(key) = self.asked.as_ref().map(|a| a.key) else {
            return self.miss(env);
        };
        let now = env.clock.now_ms();
        let entry = match response {
            CalloutResponse::Http {
                status: 200, body, ..
            } => Entry::decode(body, &key),
            CalloutResponse::Http { status: 404, .. } => None,
            _ => {
                self.cache.count(env, metric::TIER_ERRORS, None, 1);
                None
            }
        };
        if let Some(e) = entry {
            if now < e.stale_until_ms {
                // Copied into the local tier: the next ask is answered without a callout.
                let _ = self.cache.local.put(env.shared, &e, now);
            }
            if e.is_fresh(now) {
                if let Some(step) = self.hit(env, &e) {
                    return step;
                }
            }
            if now < e.stale_until_ms && self.stale.is_none() {
                self.stale = Some(e);
            }
        }
        self.miss(env)
    }

    fn response_headers(
        &mut self,
        env: &mut Env<'_>,
        headers: &mut Headers,
        end_of_stream: bool,
    ) -> Step {
        if matches!(self.outcome, Outcome::None | Outcome::Hit) {
            return Step::Continue;
        }
        let status: u16 = headers
            .get(":status")
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        // A header-only error has no body to rewrite into the stale answer.
        if self.outcome == Outcome::Miss && (status == 429 || status >= 500) && !end_of_stream {
            if let Some(stale) = self.stale.take().filter(|_| self.cache.stale_ms.is_some()) {
                let now = env.clock.now_ms();
                let op = self.api.as_ref().map(|a| a.operation);
                let rendered = match (&self.asked, op) {
                    (Some(asked), Some(op)) => self.render(&stale, asked, op),
                    _ => None,
                };
                if let Some((content_type, body)) = rendered {
                    self.outcome = Outcome::Stale;
                    headers.set(":status", "200");
                    headers.set("content-type", content_type);
                    headers.remove("content-length");
                    headers.remove("content-encoding");
                    headers.remove("retry-after");
                    headers.set("x-aigw-cache", "stale");
                    headers.set(
                        "age",
                        (now.saturating_sub(stale.created_ms) / 1000).to_string(),
                    );
                    self.replace_body = Some(body);
                    env.state.set(facts::CACHE, b"stale");
                    let model = self.asked.as_ref().and_then(|a| a.model.clone());
                    self.cache.count(env, metric::STALE, model.as_deref(), 1);
                    return Step::ReadBody { hold_headers: true };
                }
            }
        }
        headers.set("x-aigw-cache", self.outcome.as_str());
        env.state
            .set(facts::CACHE, self.outcome.as_str().as_bytes());
        if self.outcome != Outcome::Miss
            || status != 200
            || self.asked.as_ref().is_none_or(|a| a.no_store)
        {
            return Step::Continue;
        }
        if headers
            .get("content-encoding")
            .is_some_and(|e| !e.eq_ignore_ascii_case("identity"))
        {
            return Step::Continue;
        }
        let content_type = headers
            .get("content-type")
            .unwrap_or("")
            .to_ascii_lowercase();
        let op = self.api.as_ref().map(|a| a.operation);
        self.capture = if content_type.trim_start().starts_with("text/event-stream") {
            match op {
                Some(op) if op != Operation::Embeddings => Capture::Sse {
                    parser: Box::new(sse::Parser::new(sse::Limits::default(), false)),
                    assembler: Box::new(Assembler::new(op)),
                    bytes: 0,
                },
                _ => Capture::Off,
            }
        } else if content_type.contains("json") {
            Capture::Json(Vec::new())
        } else {
            Capture::Off
        };
        Step::Continue
    }

    fn response_body(&mut self, env: &mut Env<'_>, chunk: &mut Chunk, end_of_stream: bool) -> Step {
        if let Some(body) = &self.replace_body {
            // The whole upstream error was read (`ReadBody`): the stale answer replaces it.
            if end_of_stream || chunk.is_truncated() {
                chunk.set(body.clone());
                self.replace_body = None;
            } else {
                chunk.set(Vec::new());
            }
            return Step::Continue;
        }
        let max = self.cache.max_answer_bytes;
        let over = match &mut self.capture {
            Capture::Off => false,
            Capture::Json(buf) => {
                buf.extend_from_slice(chunk.bytes());
                buf.len() > max
            }
            Capture::Sse {
                parser,
                assembler,
                bytes,
            } => {
                *bytes += chunk.bytes().len();
                parser.feed(chunk.bytes(), |item| {
                    if let Item::Event(e) = item {
                        assembler.event(e.event_type, e.data);
                    }
                });
                *bytes > max || assembler.failed()
            }
        };
        if over {
            self.capture = Capture::Off;
        }
        if end_of_stream {
            self.finish_capture(env);
        }
        Step::Continue
    }

    fn max_body(&self) -> usize {
        // Read one byte past the cacheable size, so a larger body is seen as such.
        self.cache.max_request_bytes.saturating_add(1)
    }

    fn wants_response_body(&self) -> bool {
        !matches!(self.capture, Capture::Off) || self.replace_body.is_some()
    }
}

#[cfg(test)]
mod tests;
