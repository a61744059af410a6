//! The token-meter stage: every token counted once, streams included.
//!
//! On the request side it learns the API (from the path), the consumer, and
//! the request facts (from the body, parsed once and published for the other
//! filters). For OpenAI-style streams that did not ask for usage it asks for
//! it (`stream_options.include_usage`), and later removes what that added
//! (the usage-only chunk and the `"usage":null` members) so the client gets
//! the stream it asked for.
//!
//! On the response side it reads without holding anything back: SSE through
//! the incremental parser, JSON through the top-level scanner, gzip through a
//! side decoder that hands over its output in small pieces and stops at a
//! budget of inflated bytes (`max_inflated_bytes`); error statuses are not
//! read at all. Memory per stream is the parser's bound plus one decoded
//! piece, whatever the response's length or compression ratio.
//!
//! In the log phase it decides the usage (provider, estimated or none; see
//! `usage.rs`), prices it, records the metrics, publishes the usage fact and
//! composes the access-log line.

pub mod access_log;
pub mod price;

use crate::config::{self, ConfigError};
use crate::facts;
use crate::metrics::{self, Registry};
use crate::presence::{Presence, Writer};
use crate::stage::{Chunk, Env, Filter, Headers, LogInput, RequestBody, Stage, Step};
use crate::wire::api::{self, Api, Family, Operation};
use crate::wire::decode::{Decoder, Fed};
use crate::wire::json_scan::TopLevel;
use crate::wire::request::{self, RequestFacts};
use crate::wire::sse::{self, Item};
use crate::wire::usage::{estimate_tokens, Observed, Usage, UsageSource, WireUsage};
use crate::wire::walk::{Bad, Once, Walked, Walker};
use access_log::Line;
use price::{PriceConfig, Prices};
use serde::Deserialize;
use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

/// The token-meter configuration as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MeterConfig {
    /// Request header that names the consumer (until an identity filter publishes one).
    pub consumer_header: Option<String>,
    /// Provider name for the log and metrics; by default the API's family.
    pub provider: Option<String>,
    /// Ask OpenAI-style streams for usage when the client did not (default true).
    pub inject_stream_usage: Option<bool>,
    /// Hold request headers while the body is read, so Content-Length can be
    /// set after the body grows (default true; needs Envoy's
    /// `allow_on_headers_stop_iteration`). False drops Content-Length up front
    /// instead and Envoy sends the body chunked: for hosts that cannot set
    /// that option, such as Istio's WasmPlugin.
    pub hold_request_headers: Option<bool>,
    /// Ask upstreams for uncompressed responses (default true).
    pub identity_encoding: Option<bool>,
    /// Largest request body read for facts (default 8 MiB).
    pub max_request_body_bytes: Option<usize>,
    /// Largest single SSE event held while parsing (default 1 MiB).
    pub max_event_bytes: Option<usize>,
    /// Most bytes inflated from one compressed response before the meter
    /// stops reading it (default 4 x `max_event_bytes`).
    pub max_inflated_bytes: Option<usize>,
    /// USD per 1M tokens, by model.
    pub prices: BTreeMap<String, PriceConfig>,
    /// Compose the `aigw.access_log` line (default true).
    pub access_log: Option<bool>,
    /// Distinct metric series per VM before model and consumer fold into `other` (default 4096).
    pub max_metric_series: Option<usize>,
    /// How often counters kept in VM memory are handed to Envoy, in ms
    /// (default 1000; 0: on every request).
    pub metrics_flush_ms: Option<u64>,
}

/// The compiled configuration, shared by every request of a VM.
#[derive(Debug)]
pub struct Meter {
    consumer_header: String,
    provider: Option<String>,
    inject_stream_usage: bool,
    hold_request_headers: bool,
    identity_encoding: bool,
    max_request_body_bytes: usize,
    max_event_bytes: usize,
    max_inflated_bytes: usize,
    prices: Prices,
    access_log: bool,
    registry: RefCell<Registry>,
    presence: Presence,
}

pub const DEFAULT_CONSUMER_HEADER: &str = "x-aigw-consumer";
const MAX_CONSUMER: usize = 256;
const MAX_USAGE_VALUE: usize = 16 * 1024;

impl Meter {
    pub fn from_json(bytes: &[u8]) -> Result<Meter, ConfigError> {
        Meter::compile(config::parse(bytes)?)
    }

    pub fn compile(c: MeterConfig) -> Result<Meter, ConfigError> {
        let consumer_header = config::header_name(
            "consumer_header",
            c.consumer_header
                .as_deref()
                .unwrap_or(DEFAULT_CONSUMER_HEADER),
        )?;
        if let Some(p) = &c.provider {
            if p.is_empty() || p.len() > 64 {
                return Err(ConfigError::new("provider", "must be 1 to 64 characters"));
            }
        }
        let max_request_body_bytes = config::within(
            "max_request_body_bytes",
            c.max_request_body_bytes,
            8 << 20,
            1024..=(64 << 20),
        )?;
        let max_event_bytes = config::within(
            "max_event_bytes",
            c.max_event_bytes,
            1 << 20,
            1024..=(16 << 20),
        )?;
        // A budget of inflated bytes bounds what a decompression bomb costs;
        // a few events' worth is more than any usage-bearing answer needs.
        let max_inflated_bytes = config::within(
            "max_inflated_bytes",
            c.max_inflated_bytes,
            4 * max_event_bytes,
            1024..=(256 << 20),
        )?;
        let metrics_flush_ms = metrics::flush_ms(c.metrics_flush_ms)?;
        let max_series = c.max_metric_series.unwrap_or(4096);
        if max_series == 0 {
            return Err(ConfigError::new("max_metric_series", "must be at least 1"));
        }
        Ok(Meter {
            consumer_header,
            provider: c.provider,
            inject_stream_usage: c.inject_stream_usage.unwrap_or(true),
            hold_request_headers: c.hold_request_headers.unwrap_or(true),
            identity_encoding: c.identity_encoding.unwrap_or(true),
            max_request_body_bytes,
            max_event_bytes,
            max_inflated_bytes,
            prices: Prices::compile("prices", &c.prices)?,
            access_log: c.access_log.unwrap_or(true),
            registry: RefCell::new(Registry::flushed_every(metrics_flush_ms, max_series)),
            presence: Presence::default(),
        })
    }
}

impl Filter for Meter {
    type Stage = MeterStage;
    const NAME: &'static str = "token-meter";

    fn from_config(bytes: &[u8]) -> Result<Self, ConfigError> {
        Meter::from_json(bytes)
    }

    fn stage(meter: &Rc<Self>) -> MeterStage {
        MeterStage::new(Rc::clone(meter))
    }

    fn registry(&self) -> Option<&RefCell<Registry>> {
        Some(&self.registry)
    }
}

enum Reading {
    /// Not an LLM response, an error status, or an encoding we cannot read.
    Nothing,
    Sse {
        parser: Box<sse::Parser>,
        strip: bool,
    },
    Json(Box<TopLevel>),
}

/// What the response said, accumulated.
#[derive(Default)]
struct Seen {
    observed: Observed,
    model: Option<String>,
    text_bytes: u64,
    read_any: bool,
}

/// The meter's work on one request.
pub struct MeterStage {
    meter: Rc<Meter>,
    api: Option<Api>,
    start_ms: Option<u64>,
    request_id: Option<String>,
    consumer: Option<String>,
    request: Option<RequestFacts>,
    injected: bool,
    status: Option<u16>,
    reading: Reading,
    decoder: Option<Decoder>,
    /// The compressed body stopped being read (corrupt, or over the budget).
    inflate_stopped: bool,
    /// The budget of inflated bytes ran out: what was read is not all there was.
    over_budget: bool,
    seen: Seen,
    first_byte_ms: Option<u64>,
    last_byte_ms: Option<u64>,
    complete: bool,
    json_done: bool,
    /// The usage, once published (when the answer ended, or at log time).
    published: Option<Usage>,
    /// This request looks for every other filter's facts (see `presence`).
    probing: bool,
}

impl MeterStage {
    pub fn new(meter: Rc<Meter>) -> Self {
        MeterStage {
            meter,
            api: None,
            start_ms: None,
            request_id: None,
            consumer: None,
            request: None,
            injected: false,
            status: None,
            reading: Reading::Nothing,
            decoder: None,
            inflate_stopped: false,
            over_budget: false,
            seen: Seen::default(),
            first_byte_ms: None,
            last_byte_ms: None,
            complete: false,
            json_done: false,
            published: None,
            probing: false,
        }
    }

    /// Reads another filter's fact if this VM has seen that filter publish
    /// (or this request looks for it), and notes what it finds.
    fn fact<T>(
        &self,
        w: Writer,
        get: impl FnOnce(&dyn crate::boundary::FilterState) -> Option<T>,
        env: &Env<'_>,
    ) -> Option<T> {
        self.meter
            .presence
            .look(w, self.probing, || get(&*env.state))
    }

    fn wants_injection(&self, api: &Api, r: &RequestFacts) -> bool {
        self.meter.inject_stream_usage && api.has_stream_options() && r.stream && !r.include_usage
    }

    /// Reads plain (decoded) response bytes; returns the bytes to send on
    /// when the stage rewrites the stream.
    fn read(&mut self, family: Family, bytes: &[u8], end_of_stream: bool) -> Option<Vec<u8>> {
        let seen = &mut self.seen;
        seen.read_any = true;
        match &mut self.reading {
            Reading::Nothing => None,
            Reading::Json(scan) => {
                scan.feed(bytes);
                None
            }
            Reading::Sse {
                parser,
                strip: false,
            } => {
                parser.feed(bytes, |item| {
                    if let Item::Event(e) = item {
                        on_event(seen, family, e.event_type, e.data, false);
                    }
                });
                None
            }
            Reading::Sse {
                parser,
                strip: true,
            } => {
                let mut out = Vec::with_capacity(bytes.len());
                parser.feed(bytes, |item| match item {
                    Item::Event(e) => match on_event(seen, family, e.event_type, e.data, true) {
                        EventUse::Keep => out.extend_from_slice(e.raw),
                        EventUse::UsageOnly => {}
                        EventUse::NullUsage(a, b) => match data_offset(e.raw, e.data) {
                            Some(at) => {
                                out.extend_from_slice(&e.raw[..at + a]);
                                out.extend_from_slice(&e.raw[at + b..]);
                            }
                            None => out.extend_from_slice(&without_null_usage(e.raw)),
                        },
                    },
                    Item::Other { raw } => out.extend_from_slice(raw),
                    Item::Spill(raw) => out.extend_from_slice(raw),
                });
                if end_of_stream {
                    out.extend_from_slice(&parser.take_pending_raw());
                }
                Some(out)
            }
        }
    }

    fn finish_json(&mut self) {
        if self.json_done {
            return;
        }
        let Reading::Json(scan) = &self.reading else {
            return;
        };
        self.json_done = true;
        let complete = self.complete && !self.over_budget;
        if let Some(u) = scan.value("usage") {
            if let Ok(Some(w)) = serde_json::from_slice::<Option<WireUsage>>(u) {
                self.seen.observed.observe(&w, complete);
            }
        }
        if let Some(m) = scan.value("model") {
            if let Ok(m) = serde_json::from_slice::<String>(m) {
                self.seen.model = Some(m);
            }
        }
        self.seen.text_bytes = scan.text_bytes();
    }

    /// Decides the usage once and publishes it as the `aigw.usage` fact.
    fn publish_usage(&mut self, env: &mut Env<'_>, status: Option<u16>) -> Usage {
        if let Some(u) = self.published {
            return u;
        }
        self.finish_json();
        let usage = self.usage(env, status);
        if self.api.is_some() {
            // An answer from the prompt cache cost no upstream tokens: the
            // fact (what a rate limiter settles to) counts none.
            let upstream = if self.served_from_cache(env) {
                none_used(&usage)
            } else {
                usage
            };
            facts::put_usage(env.state, &upstream);
            self.published = Some(usage);
        }
        usage
    }

    /// The prompt cache answered this request (a hit, or a stale answer).
    fn served_from_cache(&self, env: &Env<'_>) -> bool {
        matches!(
            self.fact(
                Writer::Cache,
                |s| facts::outcome(s, facts::CACHE, facts::CACHE_OUTCOMES),
                env
            ),
            Some("hit" | "stale")
        )
    }

    fn usage(&self, env: &Env<'_>, status: Option<u16>) -> Usage {
        let Some(api) = &self.api else {
            return facts::usage(env.state).unwrap_or_default();
        };
        if status.is_some_and(|s| s >= 400) {
            return Usage::default();
        }
        let estimate_input = self.request.as_ref().map(|r| estimate_tokens(r.text_bytes));
        let readable = !matches!(self.reading, Reading::Nothing);
        let estimate_output =
            (readable && self.seen.read_any).then(|| estimate_tokens(self.seen.text_bytes));
        self.seen.observed.resolve(
            api.family,
            api.operation,
            self.complete && !self.over_budget,
            estimate_input,
            estimate_output,
        )
    }
}

impl Stage for MeterStage {
    fn request_headers(
        &mut self,
        env: &mut Env<'_>,
        headers: &mut Headers,
        end_of_stream: bool,
    ) -> Step {
        self.start_ms = Some(env.clock.now_ms());
        // Envoy's `request.id` is this header, which the connection manager
        // sets before any filter runs: read here, it costs no host call.
        self.request_id = headers.get("x-request-id").map(str::to_string);
        self.probing = self.meter.presence.begin();
        // Only a filter above the meter can have named the caller by now;
        // one below does it later, and the log phase reads it then.
        self.consumer = headers.get(&self.meter.consumer_header).and_then(|v| {
            let v = v.trim();
            (!v.is_empty()).then(|| v.chars().take(MAX_CONSUMER).collect())
        });
        self.api = api::classify(
            headers.get(":method").unwrap_or(""),
            headers.get(":path").unwrap_or(""),
        );
        let Some(api) = self.api.clone() else {
            return Step::Continue;
        };
        if self.meter.identity_encoding
            && headers
                .get("accept-encoding")
                .is_some_and(|v| !v.eq_ignore_ascii_case("identity"))
        {
            headers.set("accept-encoding", "identity");
        }
        if end_of_stream {
            return Step::Continue;
        }
        let above = self.fact(Writer::Above, |s| facts::request(s), env);
        if let Some(r) = above {
            let needs_body = self.wants_injection(&api, &r);
            self.request = Some(r);
            if !needs_body {
                return Step::Continue;
            }
        }
        let may_inject = self.meter.inject_stream_usage && api.has_stream_options();
        if may_inject && !self.meter.hold_request_headers {
            // The body may grow after these headers are gone: no stale length.
            headers.remove("content-length");
        }
        Step::ReadBody {
            hold_headers: may_inject && self.meter.hold_request_headers,
        }
    }

    fn request_body(
        &mut self,
        env: &mut Env<'_>,
        body: &mut RequestBody,
        _headers: &mut Headers,
    ) -> Step {
        let Some(api) = self.api.clone() else {
            return Step::Continue;
        };
        if body.is_truncated() {
            return Step::Continue;
        }
        match &self.request {
            Some(r) => body.set_facts(r.clone()),
            None => match body.facts() {
                Some(r) => {
                    facts::put_request(env.state, r);
                    self.request = Some(r.clone());
                }
                // Not ours to reject: the upstream answers a malformed body
                // with its own 400, which the meter then logs.
                None => return Step::Continue,
            },
        }
        let Some(r) = &self.request else {
            return Step::Continue;
        };
        if !self.wants_injection(&api, r) {
            return Step::Continue;
        }
        if let Some(new) = request::with_include_usage(body.bytes(), r) {
            // The body grows: the shell fixes Content-Length while the
            // headers are held (or the length was dropped up front).
            self.injected = true;
            let facts = r.clone();
            body.replace(new);
            body.set_facts(RequestFacts {
                include_usage: true,
                has_stream_options: true,
                ..facts
            });
        }
        Step::Continue
    }

    fn response_headers(
        &mut self,
        _env: &mut Env<'_>,
        headers: &mut Headers,
        _end_of_stream: bool,
    ) -> Step {
        self.status = headers.get(":status").and_then(|s| s.parse().ok());
        if self.api.is_none() || self.status.is_none_or(|s| s >= 400) {
            return Step::Continue;
        }
        if let Some(enc) = headers.get("content-encoding") {
            if !enc.eq_ignore_ascii_case("identity") {
                match Decoder::for_encoding(enc, self.meter.max_inflated_bytes as u64) {
                    Some(d) => self.decoder = Some(d),
                    None => return Step::Continue,
                }
            }
        }
        let sse = headers.get("content-type").is_some_and(|t| {
            t.trim_start()
                .to_ascii_lowercase()
                .starts_with("text/event-stream")
        });
        self.reading = if sse {
            // Rewriting needs the plain bytes; a compressed stream is only read.
            let strip = self.injected && self.decoder.is_none();
            if strip {
                headers.remove("content-length");
            }
            let limits = sse::Limits {
                max_event_bytes: self.meter.max_event_bytes,
            };
            Reading::Sse {
                parser: Box::new(sse::Parser::new(limits, strip)),
                strip,
            }
        } else {
            Reading::Json(Box::new(TopLevel::new(
                &["usage", "model"],
                MAX_USAGE_VALUE,
            )))
        };
        Step::Continue
    }

    fn response_body(&mut self, env: &mut Env<'_>, chunk: &mut Chunk, end_of_stream: bool) -> Step {
        if let Some(out) = self.response_chunk(env, chunk.bytes(), end_of_stream) {
            chunk.set(out);
        }
        if end_of_stream {
            // Published as the answer ends, not at log time: Envoy runs the
            // filters' log phases in an order of its own, and the filters
            // that settle on it (rate-limit) must find it in theirs.
            self.publish_usage(env, self.status);
        }
        Step::Continue
    }

    fn log(&mut self, env: &mut Env<'_>, input: &dyn LogInput) {
        self.log_line(env, input);
    }

    fn max_body(&self) -> usize {
        self.meter.max_request_body_bytes
    }

    fn wants_response_body(&self) -> bool {
        !matches!(self.reading, Reading::Nothing) && !self.inflate_stopped
    }

    fn holding(&self) -> bool {
        matches!(&self.reading, Reading::Sse { parser, strip: true } if parser.held_bytes() > 0)
    }
}

impl MeterStage {
    /// Reads one piece of the response; the bytes to send instead, when the
    /// stage rewrites the stream.
    fn response_chunk(
        &mut self,
        env: &mut Env<'_>,
        chunk: &[u8],
        end_of_stream: bool,
    ) -> Option<Vec<u8>> {
        if !chunk.is_empty() {
            let now = env.clock.now_ms();
            self.first_byte_ms.get_or_insert(now);
            self.last_byte_ms = Some(now);
        }
        if end_of_stream {
            self.complete = true;
        }
        let family = self.api.as_ref().map(|a| a.family)?;
        let out = match self.decoder.take() {
            Some(mut d) => {
                // Each inflated piece is read as it comes: a chunk of a
                // bomb never exists inflated in the VM.
                match d.feed(chunk, |plain| {
                    self.read(family, plain, false);
                }) {
                    Fed::More => self.decoder = Some(d),
                    // What was inflated before the corrupt point has been
                    // read (it often holds the usage); read no further, keep
                    // passing bytes.
                    Fed::Corrupt => self.inflate_stopped = true,
                    Fed::OverBudget => {
                        self.inflate_stopped = true;
                        self.over_budget = true;
                    }
                }
                None
            }
            // Compressed bytes the decoder gave up on are not plain text.
            None if self.inflate_stopped => None,
            None => self.read(family, chunk, end_of_stream),
        };
        if end_of_stream {
            self.finish_json();
        }
        out
    }

    fn log_line(&mut self, env: &mut Env<'_>, input: &dyn LogInput) {
        let now = env.clock.now_ms();
        self.finish_json();
        // The meter is the outermost filter: the status it saw is the one
        // the client got. Envoy's word is asked only when no answer passed
        // here (a filter above answered, the client left first).
        let status = self.status.or_else(|| input.status());
        // A filter after this one (rate-limit's identity) may have named the
        // caller since the request headers passed: its word wins.
        if let Some(c) = self.fact(Writer::Identity, |s| facts::text(s, facts::CONSUMER), env) {
            self.consumer = Some(c);
        }
        let route = self.fact(Writer::Router, |s| facts::route(s), env);
        // Written as the answer passed, once the router is known to have run.
        let routed_response = route
            .as_ref()
            .and_then(|_| facts::text(&*env.state, facts::MODEL_RESPONSE));
        let ran = route.is_some();
        let facts::Route {
            target,
            reason,
            model: routed_model,
            provider: routed_provider,
            tier: route_tier,
            score: route_score,
            model_requested: routed_requested,
        } = route.unwrap_or_default();
        let (routed, route_reason) = if ran {
            (Some(target), Some(reason))
        } else {
            (None, None)
        };
        let usage = self.publish_usage(env, status);
        // A cached answer's line shows the tokens it saved (its replayed
        // usage), while the token metrics and the cost count none.
        let from_cache = self.served_from_cache(env);
        let upstream = if from_cache { none_used(&usage) } else { usage };
        let meter = Rc::clone(&self.meter);

        let model_requested = self
            .request
            .as_ref()
            .and_then(|r| r.model.clone())
            .or_else(|| self.api.as_ref().and_then(|a| a.deployment.clone()))
            // A filter that read the model elsewhere (model-router's header) said so.
            .or(routed_requested);
        // model-router may have put the client's name back in the answer:
        // the model that served is the one it replaced.
        let model = routed_response
            .or_else(|| self.seen.model.clone())
            .or(routed_model)
            .or_else(|| model_requested.clone());
        let provider = routed_provider
            .or_else(|| meter.provider.clone())
            .or_else(|| self.api.as_ref().map(|a| a.family.name().to_string()));
        let cost = match upstream.source {
            UsageSource::None => None,
            _ => meter
                .prices
                .cost(&[model.as_deref(), model_requested.as_deref()], &upstream),
        };
        let ttft_ms = match (self.start_ms, self.first_byte_ms) {
            (Some(s), Some(f)) => Some(f.saturating_sub(s)),
            _ => None,
        };
        let duration_ms = self
            .start_ms
            .map(|s| now.saturating_sub(s))
            .or_else(|| input.duration_ms());
        let stream = self.request.as_ref().map(|r| r.stream);

        if self.api.is_some() {
            // The server-time histograms describe the upstream; a cached
            // answer's instant replay would only skew them.
            let upstream_stream = stream == Some(true) && !from_cache;
            let timing = Timing {
                ttft_ms: ttft_ms.filter(|_| upstream_stream),
                per_output_token_ms: per_output_token(
                    self.first_byte_ms,
                    self.last_byte_ms,
                    &usage,
                )
                .filter(|_| upstream_stream),
                duration_ms,
            };
            if let Ok(mut registry) = meter.registry.try_borrow_mut() {
                record_metrics(
                    &mut registry,
                    env,
                    model.as_deref(),
                    self.consumer.as_deref(),
                    &if from_cache { uncounted(&usage) } else { usage },
                    cost,
                    &timing,
                );
            }
        }

        if meter.access_log {
            let line = Line {
                request_id: self.request_id.take().or_else(|| input.request_id()),
                consumer: self.consumer.clone(),
                provider,
                operation: self.api.as_ref().map(|a| operation_name(a.operation)),
                model_requested,
                model,
                route_reason,
                route_tier,
                route_score,
                route: routed.or_else(|| input.route_name()),
                status,
                stream,
                input_tokens: usage.input_tokens,
                output_tokens: usage.output_tokens,
                total_tokens: usage.total_tokens(),
                cached_input_tokens: usage.cached_input_tokens,
                cache_write_input_tokens: usage.cache_write_input_tokens,
                reasoning_tokens: usage.reasoning_tokens,
                usage_source: usage.source.as_str(),
                cost_usd: cost,
                cache: self.fact(
                    Writer::Cache,
                    |s| facts::outcome(s, facts::CACHE, facts::CACHE_OUTCOMES),
                    env,
                ),
                ratelimit: self.fact(
                    Writer::RateLimit,
                    |s| facts::outcome(s, facts::RATELIMIT, facts::RATELIMIT_OUTCOMES),
                    env,
                ),
                screen: self.fact(
                    Writer::Screen,
                    |s| facts::outcome(s, facts::SCREEN, facts::SCREEN_OUTCOMES),
                    env,
                ),
                duration_ms,
                ttft_ms,
            };
            env.state.set(facts::ACCESS_LOG, &line.to_json());
        }
    }
}

pub fn operation_name(op: Operation) -> &'static str {
    match op {
        Operation::Chat => "chat",
        Operation::Completions => "completions",
        Operation::Responses => "responses",
        Operation::Embeddings => "embeddings",
        Operation::Messages => "messages",
    }
}

struct Timing {
    ttft_ms: Option<u64>,
    per_output_token_ms: Option<u64>,
    duration_ms: Option<u64>,
}

/// Milliseconds between output tokens after the first, over the stream's body.
fn per_output_token(first: Option<u64>, last: Option<u64>, usage: &Usage) -> Option<u64> {
    let out = usage.output_tokens?;
    if out < 2 {
        return None;
    }
    Some(last?.saturating_sub(first?) / (out - 1))
}

/// Metric names (Prometheus: dots become underscores). Token totals are
/// counters so they stay exact; the OpenTelemetry GenAI histograms carry the
/// distributions.
pub mod metric {
    pub const TOKENS: &str = "aigw_tokens_total";
    pub const REQUESTS: &str = "aigw_requests_total";
    pub const COST: &str = "aigw_cost_microdollars_total";
    pub const TOKEN_USAGE: &str = "gen_ai.client.token.usage";
    pub const TTFT: &str = "gen_ai.server.time_to_first_token_ms";
    pub const PER_OUTPUT_TOKEN: &str = "gen_ai.server.time_per_output_token_ms";
    pub const DURATION: &str = "gen_ai.server.request.duration_ms";
}

/// The same fields, each zero where it was known: what an answer served
/// from the cache cost upstream.
fn none_used(u: &Usage) -> Usage {
    let zero = |v: Option<u64>| v.map(|_| 0);
    Usage {
        input_tokens: zero(u.input_tokens),
        output_tokens: zero(u.output_tokens),
        cached_input_tokens: zero(u.cached_input_tokens),
        cache_write_input_tokens: zero(u.cache_write_input_tokens),
        reasoning_tokens: zero(u.reasoning_tokens),
        source: u.source,
    }
}

/// No token counts at all (the request still counts, with its usage source).
fn uncounted(u: &Usage) -> Usage {
    Usage {
        input_tokens: None,
        output_tokens: None,
        cached_input_tokens: None,
        cache_write_input_tokens: None,
        reasoning_tokens: None,
        source: u.source,
    }
}

fn record_metrics(
    reg: &mut Registry,
    env: &mut Env<'_>,
    model: Option<&str>,
    consumer: Option<&str>,
    usage: &Usage,
    cost: Option<f64>,
    timing: &Timing,
) {
    let model = model.unwrap_or(metrics::UNKNOWN);
    let consumer = consumer.unwrap_or(metrics::UNKNOWN);
    let host = &mut *env.metrics;
    let by_type = [
        ("input", usage.input_tokens),
        ("output", usage.output_tokens),
        ("cached_input", usage.cached_input_tokens),
        ("cache_write_input", usage.cache_write_input_tokens),
        ("reasoning", usage.reasoning_tokens),
    ];
    for (token_type, n) in by_type {
        if let Some(n) = n {
            let labels = [
                ("model", model),
                ("consumer", consumer),
                ("token_type", token_type),
            ];
            reg.add(host, metric::TOKENS, &labels, n);
            if matches!(token_type, "input" | "output") {
                reg.record(host, metric::TOKEN_USAGE, &labels, n);
            }
        }
    }
    let labels = [
        ("model", model),
        ("consumer", consumer),
        ("usage_source", usage.source.as_str()),
    ];
    reg.add(host, metric::REQUESTS, &labels, 1);
    if let Some(usd) = cost {
        // Whole micro-dollars, the part below one carried per series, so a
        // run of 3.3 micro-dollar requests counts 3.3 each, not 3.
        let parts = (usd * 1e6 * price::PARTS_PER_MICRODOLLAR as f64).round();
        if parts.is_finite() && parts >= 1.0 {
            reg.add_fraction(
                host,
                metric::COST,
                &[("model", model), ("consumer", consumer)],
                parts as u64,
                price::PARTS_PER_MICRODOLLAR,
            );
        }
    }
    let by_model = [("model", model)];
    if let Some(v) = timing.ttft_ms {
        reg.record(host, metric::TTFT, &by_model, v);
    }
    if let Some(v) = timing.per_output_token_ms {
        reg.record(host, metric::PER_OUTPUT_TOKEN, &by_model, v);
    }
    if let Some(v) = timing.duration_ms {
        reg.record(host, metric::DURATION, &by_model, v);
    }
}

/// What to do with one SSE event when the stream is being rewritten.
enum EventUse {
    Keep,
    /// The chunk that only exists because the meter asked for usage.
    UsageOnly,
    /// A chunk that carries `"usage":null` only because the meter asked:
    /// the byte range of the data to drop.
    NullUsage(usize, usize),
}

#[derive(Deserialize)]
struct Inner<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(default)]
    usage: Option<WireUsage>,
}

/// The members of one event the meter reads.
#[derive(Default)]
struct EventView<'a> {
    kind: Option<Cow<'a, str>>,
    model: Option<Cow<'a, str>>,
    usage: Option<WireUsage>,
    message: Option<Inner<'a>>,
    response: Option<Inner<'a>>,
    /// How many choices the event has, and whether one of them finished;
    /// `None` when it has no `choices` member.
    choices: Option<(usize, bool)>,
    /// The bytes of the text its deltas carry.
    text_bytes: u64,
}

/// Reads an event's data, walking it once (see [`walk`]): `None` when it
/// is not JSON, or a member the meter reads has the wrong type.
fn read_event(data: &[u8]) -> Option<EventView<'_>> {
    Walker::document(data, |w| {
        let mut ev = EventView::default();
        // serde refuses a member it reads twice; so does this.
        let mut seen = Once::default();
        w.object(|w, key| {
            match &*key.name()? {
                b"type" => ev.kind = seen.first(0).and(w.opt_str())?,
                b"model" => ev.model = seen.first(1).and(w.opt_str())?,
                b"usage" => ev.usage = seen.first(2).and(typed(w))?,
                b"message" => ev.message = seen.first(3).and(typed(w))?,
                b"response" => ev.response = seen.first(4).and(typed(w))?,
                b"delta" => ev.text_bytes += seen.first(5).and(w.text_len())?,
                b"choices" => {
                    seen.first(6)?;
                    ev.choices = match w.null()? {
                        true => None,
                        false => Some(choices(w, &mut ev.text_bytes)?),
                    };
                }
                _ => drop(w.skip()?),
            }
            Ok(())
        })?;
        Ok(ev)
    })
    .ok()
}

/// An event's `choices`: how many, and whether one finished; the bytes of
/// their text go to `text_bytes`.
fn choices(w: &mut Walker<'_>, text_bytes: &mut u64) -> Walked<(usize, bool)> {
    let (mut n, mut finished) = (0, false);
    w.array(|w| {
        n += 1;
        let mut seen = Once::default();
        w.object(|w, key| {
            match &*key.name()? {
                b"delta" => *text_bytes += seen.first(0).and(w.text_len())?,
                b"text" => *text_bytes += seen.first(1).and(w.text_len())?,
                b"finish_reason" => finished |= seen.first(2).and(w.opt_str())?.is_some(),
                _ => drop(w.skip()?),
            }
            Ok(())
        })
    })?;
    Ok((n, finished))
}

/// A member the meter reads whole (the usage, Anthropic's `message`, the
/// Responses `response`): `null`, or the value read by serde.
fn typed<'a, T: Deserialize<'a>>(w: &mut Walker<'a>) -> Walked<Option<T>> {
    if w.null()? {
        return Ok(None);
    }
    serde_json::from_slice(w.skip()?).map(Some).map_err(|_| Bad)
}

/// Reads one event into `seen`; with `rewriting`, also says what to do with it.
fn on_event(
    seen: &mut Seen,
    family: Family,
    event_type: &[u8],
    data: &[u8],
    rewriting: bool,
) -> EventUse {
    if data == b"[DONE]" {
        return EventUse::Keep;
    }
    let Some(ev) = read_event(data) else {
        return EventUse::Keep;
    };
    let kind: &[u8] = ev.kind.as_deref().map_or(event_type, str::as_bytes);
    let (choices, finished) = ev.choices.unwrap_or((0, false));
    seen.text_bytes += ev.text_bytes;
    let model = ev
        .model
        .as_deref()
        .or(ev.message.as_ref().and_then(|m| m.model.as_deref()))
        .or(ev.response.as_ref().and_then(|r| r.model.as_deref()));
    if let Some(m) = model {
        if seen.model.as_deref() != Some(m) {
            seen.model = Some(m.to_string());
        }
    }
    if let Some(u) = &ev.usage {
        let final_chunk = match family {
            Family::Anthropic => kind == b"message_delta",
            Family::OpenAi | Family::Azure => choices == 0 || finished,
        };
        seen.observed.observe(u, final_chunk);
    }
    if let Some(u) = ev.message.as_ref().and_then(|m| m.usage.as_ref()) {
        seen.observed.observe(u, false);
    }
    if let Some(u) = ev.response.as_ref().and_then(|r| r.usage.as_ref()) {
        let last = matches!(
            kind,
            b"response.completed" | b"response.incomplete" | b"response.failed"
        );
        seen.observed.observe(u, last);
    }
    if !rewriting {
        return EventUse::Keep;
    }
    match (&ev.usage, ev.choices) {
        (Some(_), Some((0, _))) => EventUse::UsageOnly,
        (None, Some(_)) => match null_usage_span(data) {
            Some((a, b)) => EventUse::NullUsage(a, b),
            None => EventUse::Keep,
        },
        _ => EventUse::Keep,
    }
}

/// The byte range of the top-level `"usage":null` member and one adjacent
/// comma in an event's data (valid JSON). OpenAI puts it last, which a look
/// at the end finds; anywhere else takes the walk.
fn null_usage_span(data: &[u8]) -> Option<(usize, usize)> {
    trailing_null_usage(data).or_else(|| walked_null_usage(data))
}

/// `"usage":null` as the last member: the final `}` of valid JSON closes
/// the outermost object, so the member right before it is at the top level,
/// and a key's opening quote follows `,` or `{` (inside a string it would
/// follow a backslash).
fn trailing_null_usage(data: &[u8]) -> Option<(usize, usize)> {
    let ws = |b: u8| matches!(b, b' ' | b'\t' | b'\r' | b'\n');
    let back = |mut i: usize| {
        while i > 0 && ws(data[i - 1]) {
            i -= 1;
        }
        i
    };
    let close = back(data.len()).checked_sub(1)?;
    if data[close] != b'}' {
        return None;
    }
    let end = back(close);
    let null = end.checked_sub(4)?;
    if &data[null..end] != b"null" {
        return None;
    }
    let colon = back(null).checked_sub(1)?;
    if data[colon] != b':' {
        return None;
    }
    let key = b"\"usage\"";
    let pos = back(colon).checked_sub(key.len())?;
    if &data[pos..pos + key.len()] != key {
        return None;
    }
    let before = back(pos);
    match before.checked_sub(1).map(|i| data[i]) {
        Some(b',') => Some((before - 1, end)),
        Some(b'{') => Some((pos, end)),
        _ => None,
    }
}

/// Where `data` starts in `raw`, when it is a slice of it (an event of one
/// data line); a joined multi-line data is not.
fn data_offset(raw: &[u8], data: &[u8]) -> Option<usize> {
    let at = (data.as_ptr() as usize).checked_sub(raw.as_ptr() as usize)?;
    let end = at.checked_add(data.len())?;
    (raw.get(at..end) == Some(data)).then_some(at)
}

/// The same span found by walking the text from its first `{`, tracking
/// strings and nesting, looking only at keys one level deep: a
/// `"usage":null` inside a nested object (a tool's arguments, a provider's
/// extension) is the provider's and stays.
fn walked_null_usage(raw: &[u8]) -> Option<(usize, usize)> {
    let key = b"\"usage\"";
    let ws = |b: &u8| matches!(b, b' ' | b'\t' | b'\r' | b'\n');
    let pos = top_level_key(raw, key)?;
    let mut i = pos + key.len();
    while raw.get(i).is_some_and(ws) {
        i += 1;
    }
    if raw.get(i) != Some(&b':') {
        return None;
    }
    i += 1;
    while raw.get(i).is_some_and(ws) {
        i += 1;
    }
    if !raw.get(i..)?.starts_with(b"null") {
        return None;
    }
    let end = i + 4;
    let mut before = pos;
    while before > 0 && ws(&raw[before - 1]) {
        before -= 1;
    }
    if before > 0 && raw[before - 1] == b',' {
        return Some((before - 1, end));
    }
    let mut after = end;
    while raw.get(after).is_some_and(ws) {
        after += 1;
    }
    if raw.get(after) == Some(&b',') {
        return Some((pos, after + 1));
    }
    Some((pos, end))
}

/// Where the key `quoted` (quotes included) of a member of the outermost
/// object starts: depth one, outside any string, followed by `:`.
fn top_level_key(raw: &[u8], quoted: &[u8]) -> Option<usize> {
    let start = memchr::memchr(b'{', raw)?;
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for (i, &b) in raw.iter().enumerate().skip(start) {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => {
                let is_key = || {
                    let after = &raw[i + quoted.len()..];
                    after
                        .iter()
                        .find(|c| !matches!(c, b' ' | b'\t' | b'\r' | b'\n'))
                        == Some(&b':')
                };
                if depth == 1 && raw[i..].starts_with(quoted) && is_key() {
                    return Some(i);
                }
                in_string = true;
            }
            b'{' | b'[' => depth += 1,
            b'}' | b']' => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    return None;
                }
            }
            _ => {}
        }
    }
    None
}

fn without_null_usage(raw: &[u8]) -> Vec<u8> {
    match walked_null_usage(raw) {
        Some((a, b)) => [&raw[..a], &raw[b..]].concat(),
        None => raw.to_vec(),
    }
}

#[cfg(test)]
mod tests;
