//! The model-router stage: which model and which backend serve a request,
//! and the rewrites that make Envoy's own router send it there.
//!
//! It decides once the request body is read (the model is in it), holding
//! the request headers meanwhile so they can still change. The decision
//! ([`Router::decide`]) is a pure function of the request's facts, in this
//! order, the first answer winning: the ordered `rules`, the `aliases`, the
//! `auto` model's complexity tiers, the `default_target`; a request that
//! names no model gets the `missing_model_target` or a 400, an unknown model
//! a 404 `model_not_found`.
//!
//! It does not proxy anything itself. The chosen target is written into a
//! request header (`x-aigw-target`) that the route table matches; Envoy
//! clears its route cache when a filter changes request headers, so its
//! router re-evaluates the route and picks that cluster, with the cluster's
//! retries, outlier detection and failover. That is why retries, circuit
//! breaking and fallback chains are Envoy configuration (see
//! `envoy/model-router.yaml`), not code here. What the target needs on the
//! wire is rewritten in place: the `model` member (a splice, the rest of the
//! body keeps its bytes), a capped `max_tokens`, the path (an OpenAI path to
//! an Azure deployment path with its `api-version`), the authority, and the
//! upstream's own key in place of the client's.
//!
//! The decision is published as one fact, `aigw.route` (target, reason,
//! model, provider, and for `auto` the tier and score), that the meter logs,
//! so the thresholds can be tuned from the access log.

pub mod body;
pub mod complexity;
pub mod config;
pub mod pattern;

use crate::config::ConfigError;
use crate::facts;
use crate::metrics::Registry;
use crate::presence::{Presence, Writer};
use crate::stage::{Chunk, Env, Filter, Headers, Reply, RequestBody, Stage, Step};
use crate::wire::api::{self, Api, Family, Operation};
use crate::wire::request::RequestFacts;
use crate::wire::sse::{self, Item};
use crate::wire::usage::estimate_tokens;
use body::Shape;
use config::{Choice, Compiled, NonJson, OverMax, ProviderKind, Rule, Sticky, Target};
use std::cell::{Cell, RefCell};
use std::rc::Rc;

/// The compiled configuration, shared by every request of a VM.
pub struct Router {
    c: Compiled,
    rules_need_shape: bool,
    /// Some rule matches on the consumer or splits by it: only then is it
    /// looked up (a filter-state read, a host call in the separate shape).
    rules_need_consumer: bool,
    /// Some rule splits, and a split is spread by the request id.
    rules_need_request_id: bool,
    /// Spreads splits when a request has neither an id nor a consumer.
    counter: Cell<u64>,
    registry: RefCell<Registry>,
    /// Whether filters before this one publish the request's facts and
    /// the consumer: looked for only once seen, or while probing.
    above: Presence,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("targets", &self.c.targets)
            .finish_non_exhaustive()
    }
}

/// Metric names (Prometheus: dots become underscores).
pub mod metric {
    /// Requests routed, by the model sent upstream.
    pub const ROUTED: &str = "aigw_route_requests_total";
    /// Requests the router answered itself (no model, unknown model, over the cap, bad body).
    pub const REJECTED: &str = "aigw_route_rejected_total";
    /// Complexity scores of `auto` requests.
    pub const SCORE: &str = "aigw_route_score";
}

/// What a decision looks at.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    pub model: Option<&'a str>,
    pub operation: Operation,
    pub consumer: Option<&'a str>,
    pub headers: &'a Headers,
    pub request_id: Option<&'a str>,
    /// Estimated prompt tokens; `None` when the body was not read.
    pub prompt_tokens: Option<u64>,
    pub stream: Option<bool>,
    pub shape: Option<&'a Shape>,
    /// The body was read as JSON: a model it lacks is missing, not unknown.
    pub body_read: bool,
}

/// Where a request goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub target: usize,
    /// The rule, alias, tier or default that chose it (`rule:<name>`,
    /// `alias:<name>`, `auto:<tier>`, `default`, `missing_model`).
    pub reason: String,
    /// The model name sent upstream; `None` leaves the request's as it is.
    pub upstream_model: Option<String>,
    pub tier: Option<String>,
    pub score: Option<u32>,
}

const MAX_ECHO: usize = 128;

fn echo(s: &str) -> String {
    s.chars().take(MAX_ECHO).collect()
}

fn fnv1a(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.bytes().chain(std::iter::once(0)) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

impl Router {
    pub fn from_json(bytes: &[u8]) -> Result<Router, ConfigError> {
        let c = config::compile(crate::config::parse(bytes)?)?;
        Ok(Router {
            rules_need_shape: c.rules.iter().any(|r| r.when.needs_shape()),
            rules_need_consumer: c.rules.iter().any(|r| {
                !r.when.consumer.is_empty()
                    || matches!(
                        r.choice,
                        Choice::Split {
                            sticky: Sticky::Consumer,
                            ..
                        }
                    )
            }),
            rules_need_request_id: c
                .rules
                .iter()
                .any(|r| matches!(r.choice, Choice::Split { .. })),
            counter: Cell::new(0),
            registry: RefCell::new(Registry::flushed_every(c.metrics_flush_ms, 1024)),
            above: Presence::default(),
            c,
        })
    }

    pub fn target(&self, i: usize) -> Option<&Target> {
        self.c.targets.get(i)
    }

    pub fn is_auto(&self, model: Option<&str>) -> bool {
        matches!((&self.c.auto, model), (Some(a), Some(m)) if a.model == m)
    }

    /// Whether deciding this request needs the body's shape.
    fn needs_shape(&self, model: Option<&str>) -> bool {
        self.rules_need_shape || self.is_auto(model) || !self.c.max_tokens.is_empty()
    }

    /// The `max_tokens` cap of an upstream model.
    pub fn cap(&self, model: &str) -> Option<u64> {
        self.c
            .max_tokens
            .iter()
            .find(|(p, _)| p.matches(model))
            .map(|(_, c)| *c)
    }

    /// Whether `rule` matches; with a `provider` condition, also the model
    /// part of a `provider/model` name, which is what goes upstream.
    fn matches<'r>(&self, rule: &Rule, r: &Request<'r>) -> Option<Option<&'r str>> {
        let w = &rule.when;
        let mut model_part = None;
        if !w.provider.is_empty() {
            let (provider, model) = r.model?.split_once('/')?;
            if !w.provider.iter().any(|p| p == provider) {
                return None;
            }
            if !w.model.is_empty() && !w.model.iter().any(|p| p.matches(model)) {
                return None;
            }
            model_part = Some(model);
        } else if !w.model.is_empty() {
            let m = r.model?;
            if !w.model.iter().any(|p| p.matches(m)) {
                return None;
            }
        }
        if !w.consumer.is_empty() {
            let c = r.consumer?;
            if !w.consumer.iter().any(|p| p.matches(c)) {
                return None;
            }
        }
        for (name, p) in &w.headers {
            if !p.matches(r.headers.get(name)?) {
                return None;
            }
        }
        if !w.api.is_empty() && !w.api.contains(&r.operation) {
            return None;
        }
        if let Some(lo) = w.min_prompt_tokens {
            if r.prompt_tokens? < lo {
                return None;
            }
        }
        if let Some(hi) = w.max_prompt_tokens {
            if r.prompt_tokens? > hi {
                return None;
            }
        }
        if let Some(s) = w.stream {
            if r.stream? != s {
                return None;
            }
        }
        if let Some(t) = w.tools {
            if r.shape?.tools != t {
                return None;
            }
        }
        if let Some(i) = w.images {
            if r.shape?.images != i {
                return None;
            }
        }
        if let Some(re) = &w.last_user_message {
            if !re.is_match(&r.shape?.last_user) {
                return None;
            }
        }
        Some(model_part)
    }

    fn choose(&self, rule: &Rule, r: &Request<'_>) -> usize {
        match &rule.choice {
            Choice::One(t) => *t,
            Choice::Split {
                targets,
                total,
                sticky,
            } => {
                let key = match sticky {
                    Sticky::Request => r.request_id,
                    Sticky::Consumer => r.consumer.or(r.request_id),
                };
                let h = match key {
                    Some(k) => fnv1a(&[&rule.name, k]),
                    None => {
                        let n = self.counter.get().wrapping_add(1);
                        self.counter.set(n);
                        fnv1a(&[&rule.name, &n.to_string()])
                    }
                };
                let at = h % total;
                targets
                    .iter()
                    .find(|(_, cum)| at < *cum)
                    .map_or(0, |(t, _)| *t)
            }
        }
    }

    /// The upstream model: the target's own, else the model part of a
    /// `provider/model` name, else the model as asked.
    fn decision(&self, target: usize, reason: String, asked: Option<&str>) -> Decision {
        Decision {
            target,
            reason,
            upstream_model: self.c.targets[target]
                .model
                .clone()
                .or_else(|| asked.map(str::to_string)),
            tier: None,
            score: None,
        }
    }

    /// Where a request goes, or the error it gets.
    pub fn decide(&self, r: &Request<'_>) -> Result<Decision, Reply> {
        for rule in &self.c.rules {
            if let Some(model_part) = self.matches(rule, r) {
                let t = self.choose(rule, r);
                let asked = model_part.or(r.model);
                return Ok(self.decision(t, format!("rule:{}", rule.name), asked));
            }
        }
        let Some(model) = r.model else {
            // Routed on headers alone, the model may well be in the body:
            // the default target takes it then.
            let missing = self.c.missing_model_target.map(|t| (t, "missing_model"));
            let fallback = match r.body_read {
                true => missing,
                false => missing.or(self.c.default_target.map(|t| (t, "default"))),
            };
            return match fallback {
                Some((t, reason)) => Ok(self.decision(t, reason.into(), None)),
                None => Err(Reply::error(
                    400,
                    "invalid_request_error",
                    "missing_model",
                    "you must provide a model parameter: the request body has no \"model\" member",
                )),
            };
        };
        if let Some(&t) = self.c.aliases.get(model) {
            return Ok(self.decision(t, format!("alias:{model}"), Some(model)));
        }
        if let Some(auto) = self.c.auto.as_ref().filter(|a| a.model == model) {
            let empty = Shape::default();
            let s = complexity::score(
                &auto.score,
                r.prompt_tokens.unwrap_or(0),
                r.shape.unwrap_or(&empty),
            );
            let total = s.total();
            let tier = auto
                .tiers
                .iter()
                .find(|t| t.max_score.is_none_or(|m| total <= m))
                .or(auto.tiers.last());
            if let Some(tier) = tier {
                let mut d = self.decision(tier.target, format!("auto:{}", tier.name), Some(model));
                d.tier = Some(tier.name.clone());
                d.score = Some(total);
                return Ok(d);
            }
        }
        match self.c.default_target {
            Some(t) => Ok(self.decision(t, "default".into(), Some(model))),
            None => Err(Reply::error(
                404,
                "invalid_request_error",
                "model_not_found",
                &format!(
                    "The model `{}` does not exist or you do not have access to it.",
                    echo(model)
                ),
            )),
        }
    }
}

impl Filter for Router {
    type Stage = RouterStage;
    const NAME: &'static str = "model-router";

    fn from_config(bytes: &[u8]) -> Result<Self, ConfigError> {
        Router::from_json(bytes)
    }

    fn stage(router: &Rc<Self>) -> RouterStage {
        RouterStage::new(Rc::clone(router))
    }

    fn registry(&self) -> Option<&RefCell<Registry>> {
        Some(&self.registry)
    }
}

/// How the response is being rewritten (the model mapped back to the alias).
enum Rewriting {
    Nothing,
    Json,
    Sse(Box<sse::Parser>),
}

/// The router's work on one request.
pub struct RouterStage {
    router: Rc<Router>,
    api: Option<Api>,
    /// The model name to put back in the response (the client's), as JSON.
    map_back: Option<String>,
    response: Rewriting,
    model_response_seen: bool,
    /// The router set the target header for this request.
    routed: bool,
}

fn json_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// The path an operation has under `/v1/` (OpenAI and its copies) and under
/// an Azure deployment.
fn operation_path(op: Operation) -> &'static str {
    match op {
        Operation::Chat => "chat/completions",
        Operation::Completions => "completions",
        Operation::Responses => "responses",
        Operation::Embeddings => "embeddings",
        Operation::Messages => "messages",
    }
}

/// A value as one path segment: unreserved characters as they are, every
/// other byte percent-encoded (so `/`, `?`, `#` and `..` tricks stay inside it).
fn segment(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'_' | b'~')
            || (b == b'.' && v != "." && v != "..")
        {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// What the body says, as far as routing goes.
struct Read {
    facts: Option<RequestFacts>,
    shape: Option<Shape>,
    /// The facts are another filter's `aigw.request`, whose writer wrote
    /// `aigw.model_requested` with it.
    published: bool,
}

impl RouterStage {
    pub fn new(router: Rc<Router>) -> Self {
        RouterStage {
            router,
            api: None,
            map_back: None,
            response: Rewriting::Nothing,
            model_response_seen: false,
            routed: false,
        }
    }

    fn reject(&self, env: &mut Env<'_>, reply: Reply) -> Step {
        if let Ok(mut reg) = self.router.registry.try_borrow_mut() {
            reg.add(env.metrics, metric::REJECTED, &[], 1);
        }
        Step::Reply(reply)
    }

    /// The path the target is sent, if it changes.
    fn path_for(
        target: &Target,
        api: &Api,
        upstream: Option<&str>,
    ) -> Result<Option<String>, Reply> {
        if let Some(p) = &target.path {
            return Ok(Some(p.clone()));
        }
        let op = operation_path(api.operation);
        match (target.provider, api.family) {
            (ProviderKind::Azure, _) => {
                let version = target.api_version.as_deref().unwrap_or_default();
                if api.operation == Operation::Responses {
                    return Ok(Some(format!("/openai/responses?api-version={version}")));
                }
                if api.operation == Operation::Messages {
                    return Err(Reply::error(
                        400,
                        "invalid_request_error",
                        "unsupported_api",
                        &format!(
                            "target {} (azure) does not serve the messages API",
                            target.name
                        ),
                    ));
                }
                // The deployment may come from the client's model name: it
                // is one path segment, whatever it holds.
                let deployment = segment(
                    target
                        .deployment
                        .as_deref()
                        .or(upstream)
                        .or(api.deployment.as_deref())
                        .unwrap_or_default(),
                );
                Ok(Some(format!(
                    "/openai/deployments/{deployment}/{op}?api-version={version}"
                )))
            }
            (_, Family::Azure) => Ok(Some(format!("/v1/{op}"))),
            _ => Ok(None),
        }
    }

    /// The body with the upstream model and the `max_tokens` cap, or the
    /// reply that refuses it. `None`: the body stays as it is.
    fn edit_body(
        &self,
        bytes: &[u8],
        read: &Read,
        target: &Target,
        upstream: Option<&str>,
        op: Operation,
    ) -> Result<Option<Vec<u8>>, Reply> {
        let Some(facts) = &read.facts else {
            return Ok(None);
        };
        let mut out: Option<Vec<u8>> = None;
        if let Some(up) = upstream {
            // An Azure target reads the deployment from the path; a body
            // without a model (from an Azure path) needs one anywhere else.
            let wants = facts.model.as_deref() != Some(up)
                && (facts.model.is_some() || target.provider != ProviderKind::Azure);
            if wants {
                out = body::set_member(bytes, "model", &json_string(up));
            }
        }
        let capped_model = upstream.or(target.deployment.as_deref());
        let cap = capped_model.and_then(|m| self.router.cap(m).map(|c| (m, c)));
        if let (Some((model, cap)), Some(shape)) = (cap, &read.shape) {
            if op == Operation::Embeddings {
                return Ok(out);
            }
            let field = shape.max_tokens_field.unwrap_or(match op {
                Operation::Responses => "max_output_tokens",
                _ => "max_tokens",
            });
            let over = shape.max_tokens.is_some_and(|m| m > cap);
            if over && self.router.c.over_max_tokens == OverMax::Reject {
                return Err(Reply::error(
                    400,
                    "invalid_request_error",
                    "max_tokens_exceeded",
                    &format!(
                        "{field} is {} but {} allows at most {cap}",
                        shape.max_tokens.unwrap_or(0),
                        echo(model)
                    ),
                ));
            }
            if over || shape.max_tokens.is_none() {
                let from = out.as_deref().unwrap_or(bytes);
                if let Some(b) = body::set_member(from, field, &cap.to_string()) {
                    out = Some(b);
                }
            }
        }
        Ok(out)
    }

    fn read_body(
        &self,
        env: &mut Env<'_>,
        body: &mut RequestBody,
        model_hint: Option<&str>,
        probing: bool,
    ) -> Read {
        let (facts, published) = body.shared_facts(&*env.state, &self.router.above, probing);
        let facts = facts.cloned();
        let model = facts
            .as_ref()
            .and_then(|f| f.model.as_deref())
            .or(model_hint);
        let shape = if facts.is_some() && self.router.needs_shape(model) {
            body::shape(body.bytes())
        } else {
            None
        };
        Read {
            facts,
            shape,
            published,
        }
    }

    /// Reads the body for routing, or the reply that refuses it.
    fn read_whole(
        &self,
        env: &mut Env<'_>,
        body: &mut RequestBody,
        hint: Option<&str>,
        probing: bool,
    ) -> Result<Read, Step> {
        let none = Read {
            facts: None,
            shape: None,
            published: false,
        };
        if body.is_truncated() {
            if self.router.c.non_json == NonJson::Reject {
                return Err(self.reject(
                    env,
                    Reply::error(
                        413,
                        "invalid_request_error",
                        "request_too_large",
                        &format!(
                            "the request body is larger than the {} bytes the router reads",
                            self.router.c.max_request_body_bytes
                        ),
                    ),
                ));
            }
            return Ok(none);
        }
        if body.bytes().is_empty() {
            return Ok(none);
        }
        let read = self.read_body(env, body, hint, probing);
        if read.facts.is_none() && self.router.c.non_json == NonJson::Reject {
            return Err(self.reject(
                env,
                Reply::error(
                    400,
                    "invalid_request_error",
                    "invalid_json",
                    "the request body is not a JSON object",
                ),
            ));
        }
        Ok(read)
    }

    fn publish(
        &self,
        env: &mut Env<'_>,
        asked: Option<&str>,
        written: bool,
        target: &Target,
        d: &Decision,
    ) {
        let route = facts::Route {
            target: target.name.clone(),
            reason: d.reason.clone(),
            model: d.upstream_model.as_deref().or(asked).map(str::to_string),
            provider: target
                .provider_named
                .then(|| target.provider.name().to_string()),
            tier: d.tier.clone(),
            score: d.score,
            model_requested: asked.filter(|_| !written).map(str::to_string),
        };
        facts::put_route(env.state, route);
        if let Ok(mut reg) = self.router.registry.try_borrow_mut() {
            let model = d.upstream_model.as_deref().or(asked).unwrap_or("unknown");
            reg.add(env.metrics, metric::ROUTED, &[("model", model)], 1);
            if let Some(s) = d.score {
                reg.record(env.metrics, metric::SCORE, &[], u64::from(s));
            }
        }
    }

    /// Routes the request; `body` is `None` when it is not read at all.
    fn route(
        &mut self,
        env: &mut Env<'_>,
        mut body: Option<&mut RequestBody>,
        headers: &mut Headers,
    ) -> Step {
        let Some(api) = self.api.clone() else {
            return Step::Continue;
        };
        let router = Rc::clone(&self.router);
        // Whether this request looks for facts of filters not seen before.
        let probing = router.above.begin();
        let header_model = router
            .c
            .model_header
            .as_deref()
            .and_then(|h| headers.get(h))
            .map(str::trim)
            .filter(|m| !m.is_empty())
            .map(str::to_string);
        let hint = api.deployment.clone().or(header_model);
        let no_read = Read {
            facts: None,
            shape: None,
            published: false,
        };
        let read = match body.as_deref_mut() {
            None => no_read,
            Some(body) => match self.read_whole(env, body, hint.as_deref(), probing) {
                Ok(read) => read,
                Err(step) => return step,
            },
        };
        let asked: Option<String> = read.facts.as_ref().and_then(|f| f.model.clone()).or(hint);
        let consumer = router
            .rules_need_consumer
            .then(|| {
                let published = router.above.look(Writer::Identity, probing, || {
                    facts::text(env.state, facts::CONSUMER)
                });
                published.or_else(|| {
                    headers
                        .get(&router.c.consumer_header)
                        .map(str::trim)
                        .filter(|c| !c.is_empty())
                        .map(str::to_string)
                })
            })
            .flatten();
        let request_id = router
            .rules_need_request_id
            .then(|| {
                headers.get("x-request-id").map(str::to_string).or_else(|| {
                    env.state
                        .attribute(&["request", "id"])
                        .and_then(|v| String::from_utf8(v).ok())
                })
            })
            .flatten();
        let request = Request {
            model: asked.as_deref(),
            operation: api.operation,
            consumer: consumer.as_deref(),
            headers,
            request_id: request_id.as_deref(),
            prompt_tokens: read.facts.as_ref().map(|f| estimate_tokens(f.text_bytes)),
            stream: read.facts.as_ref().map(|f| f.stream),
            shape: read.shape.as_ref(),
            body_read: read.facts.is_some(),
        };
        let decision = match router.decide(&request) {
            Ok(d) => d,
            Err(reply) => return self.reject(env, reply),
        };
        let Some(target) = router.target(decision.target) else {
            return Step::Continue;
        };
        let upstream = decision.upstream_model.as_deref();
        let path = match Self::path_for(target, &api, upstream) {
            Ok(p) => p,
            Err(reply) => return self.reject(env, reply),
        };
        let edited = match body.as_deref() {
            Some(b) => self.edit_body(b.bytes(), &read, target, upstream, api.operation),
            None => Ok(None),
        };
        match edited {
            Ok(Some(new)) => {
                let Some(body) = body else {
                    return Step::Continue;
                };
                // Content-Length is fixed by the shell: the headers are held.
                let facts = read.facts.clone();
                body.replace(new);
                if let Some(f) = facts {
                    body.set_facts(RequestFacts {
                        model: upstream.map(str::to_string).or(f.model.clone()),
                        ..f
                    });
                }
            }
            Ok(None) => {}
            Err(reply) => return self.reject(env, reply),
        }
        headers.set(&router.c.target_header, target.cluster.clone());
        self.routed = true;
        if let Some(p) = path {
            headers.set(":path", p);
        }
        if let Some(a) = &target.authority {
            headers.set(":authority", a.clone());
        }
        if let Some((name, value)) = &target.credential {
            for h in config::KEY_HEADERS {
                if headers.get(h).is_some() {
                    headers.remove(h);
                }
            }
            headers.set(name, value.clone());
        }
        // Whoever published the body's facts wrote the model it names.
        let written = read.published && read.facts.as_ref().is_some_and(|f| f.model.is_some());
        self.publish(env, asked.as_deref(), written, target, &decision);
        if router.c.map_response_model {
            if let (Some(a), Some(u)) = (asked.as_deref(), upstream) {
                if a != u {
                    self.map_back = Some(json_string(a));
                }
            }
        }
        Step::Continue
    }

    fn route_and_guard(
        &mut self,
        env: &mut Env<'_>,
        body: Option<&mut RequestBody>,
        headers: &mut Headers,
    ) -> Step {
        let step = self.route(env, body, headers);
        if step == Step::Continue {
            // Routed or not, the target header is the router's alone.
            let h = self.router.c.target_header.clone();
            if !self.routed && headers.get(&h).is_some() {
                headers.remove(&h);
            }
        }
        step
    }

    /// Puts the client's model name back in a piece of the response.
    fn map(&mut self, env: &mut Env<'_>, raw: &[u8]) -> Option<Vec<u8>> {
        let to = self.map_back.as_deref()?;
        let (out, was) = body::replace_model_values(raw, to)?;
        if !self.model_response_seen {
            self.model_response_seen = true;
            if let Ok(m) = serde_json::from_slice::<String>(&was) {
                env.state.set(facts::MODEL_RESPONSE, m.as_bytes());
            }
        }
        Some(out)
    }
}

impl Stage for RouterStage {
    fn request_headers(&mut self, env: &mut Env<'_>, headers: &mut Headers, _eos: bool) -> Step {
        self.api = api::classify(
            headers.get(":method").unwrap_or(""),
            headers.get(":path").unwrap_or(""),
        );
        if self.api.is_none() {
            // Only the router picks a target: a client's own header is not obeyed.
            let h = self.router.c.target_header.clone();
            if headers.get(&h).is_some() {
                headers.remove(&h);
            }
            return Step::Continue;
        }
        if !self.router.c.hold_request_headers {
            return self.route_and_guard(env, None, headers);
        }
        // The target is known only once the body is read, and the headers
        // must still change then.
        Step::ReadBody { hold_headers: true }
    }

    fn request_body(
        &mut self,
        env: &mut Env<'_>,
        body: &mut RequestBody,
        headers: &mut Headers,
    ) -> Step {
        self.route_and_guard(env, Some(body), headers)
    }

    fn response_headers(&mut self, _env: &mut Env<'_>, headers: &mut Headers, _eos: bool) -> Step {
        if self.map_back.is_none() {
            return Step::Continue;
        }
        let ok = headers
            .get(":status")
            .and_then(|s| s.parse::<u16>().ok())
            .is_some_and(|s| s < 400);
        let plain = headers
            .get("content-encoding")
            .is_none_or(|e| e.eq_ignore_ascii_case("identity"));
        if !ok || !plain {
            self.map_back = None;
            return Step::Continue;
        }
        let ct = headers
            .get("content-type")
            .unwrap_or("")
            .trim_start()
            .to_ascii_lowercase();
        if ct.starts_with("text/event-stream") {
            headers.remove("content-length");
            self.response =
                Rewriting::Sse(Box::new(sse::Parser::new(sse::Limits::default(), true)));
            Step::Continue
        } else if ct.starts_with("application/json") {
            self.response = Rewriting::Json;
            Step::ReadBody { hold_headers: true }
        } else {
            self.map_back = None;
            Step::Continue
        }
    }

    fn response_body(&mut self, env: &mut Env<'_>, chunk: &mut Chunk, end_of_stream: bool) -> Step {
        match std::mem::replace(&mut self.response, Rewriting::Nothing) {
            Rewriting::Nothing => {}
            Rewriting::Json => {
                if !chunk.is_truncated() {
                    if let Some(out) = self.map(env, chunk.bytes()) {
                        chunk.set(out);
                    }
                }
            }
            Rewriting::Sse(mut parser) => {
                let mut out = Vec::with_capacity(chunk.bytes().len());
                let mut pieces: Vec<(bool, Vec<u8>)> = Vec::new();
                parser.feed(chunk.bytes(), |item| match item {
                    Item::Event(e) => pieces.push((true, e.raw.to_vec())),
                    Item::Other { raw } | Item::Spill(raw) => pieces.push((false, raw.to_vec())),
                });
                if end_of_stream {
                    pieces.push((false, parser.take_pending_raw()));
                }
                for (event, raw) in pieces {
                    match event.then(|| self.map(env, &raw)).flatten() {
                        Some(new) => out.extend_from_slice(&new),
                        None => out.extend_from_slice(&raw),
                    }
                }
                chunk.set(out);
                if !end_of_stream {
                    self.response = Rewriting::Sse(parser);
                }
            }
        }
        Step::Continue
    }

    fn max_body(&self) -> usize {
        self.router.c.max_request_body_bytes
    }

    fn reads_response(&self) -> bool {
        // Only to map the model back; otherwise the answer is not the router's business.
        self.map_back.is_some()
    }

    fn logs(&self) -> bool {
        false
    }

    fn wants_response_body(&self) -> bool {
        matches!(self.response, Rewriting::Sse(_))
    }

    fn holding(&self) -> bool {
        matches!(&self.response, Rewriting::Sse(p) if p.held_bytes() > 0)
    }
}

#[cfg(test)]
mod tests;
