//! The rate-limit stage: who is calling, and are they within their limits.
//!
//! It decides once per request, after reading the body (the model and the
//! token estimate are in it): every rule that matches applies, and the first
//! limit that does not fit denies (a 429 that names the rule, with the
//! headers OpenAI clients read). Tokens are *reserved* before the request
//! goes upstream (the prompt estimate plus the request's `max_tokens`, or a
//! default) and *settled* in the log phase to the real usage the meter
//! published, refunding what was not used and charging any excess; so a
//! burst of concurrent or long streaming requests cannot overshoot a token
//! limit by more than the reservations allowed, which the anchors that
//! charge only after the answer (LiteLLM, Kong, Higress, APIM) cannot say. A
//! reservation is capped at the limit itself, so a small limit with a large
//! default never refuses a request that fits on its own.
//!
//! Counters live in Envoy shared data (`counters.rs`: one set for every
//! worker, compare-and-swap) or, with `counters: global`, in the rate limit
//! service every Envoy asks (`rls.rs`: Envoy's standard
//! `ShouldRateLimit` API, `hits_addend` for tokens). The service cannot
//! refund, so in global mode a request is charged its prompt estimate up
//! front and the rest (the output, any excess) when it settles.

pub mod config;
pub mod counters;
pub mod rls;
pub mod window;

#[cfg(test)]
mod tests;

use crate::boundary::GrpcCall;
use crate::config::{self as cfg, ConfigError};
use crate::facts;
use crate::metrics::Registry;
use crate::presence::Presence;
use crate::stage::{
    CalloutResponse, Env, Filter, Headers, LogInput, Reply, RequestBody, RootEnv, Stage, Step,
};
use crate::wire::push_decimal;
use crate::wire::request::RequestFacts;
use crate::wire::usage::estimate_tokens;
use config::{Compiled, FailureMode, Kind, Limit, RateLimitConfig, Rule, Service};
use counters::{Place, Refused};
use std::cell::RefCell;
use std::rc::Rc;
use window::openai_duration;

/// The compiled filter, shared by every request of a VM.
#[derive(Debug)]
pub struct RateLimit {
    c: Compiled,
    registry: RefCell<Registry>,
    /// When this VM last swept its counters.
    swept_ms: std::cell::Cell<u64>,
    /// Whether a filter before this one publishes the request's facts.
    above: Presence,
}

impl RateLimit {
    pub fn from_json(bytes: &[u8]) -> Result<RateLimit, ConfigError> {
        let c: RateLimitConfig = cfg::parse(bytes)?;
        let c = config::compile(c)?;
        Ok(RateLimit {
            registry: RefCell::new(Registry::flushed_every(
                c.metrics_flush_ms,
                c.max_metric_series,
            )),
            swept_ms: std::cell::Cell::new(0),
            above: Presence::default(),
            c,
        })
    }
}

impl RateLimit {
    /// The slot prefix of every rule with local counters, with the windows
    /// of its counters by tag (none in global mode).
    fn counter_prefixes(&self) -> Vec<(String, Vec<(u64, window::Window)>)> {
        if self.c.service.is_some() {
            return Vec::new();
        }
        self.c
            .rules
            .iter()
            .map(|rule| {
                let tags = rule.counters().into_iter().map(|(k, w)| (tag(k, w), w));
                (counters::prefix(&rule.name), tags.collect::<Vec<_>>())
            })
            .filter(|(_, tags)| !tags.is_empty())
            .collect()
    }
}

impl Filter for RateLimit {
    type Stage = RateLimitStage;
    const NAME: &'static str = "rate-limit";

    fn from_config(bytes: &[u8]) -> Result<Self, ConfigError> {
        RateLimit::from_json(bytes)
    }

    fn stage(filter: &Rc<Self>) -> RateLimitStage {
        RateLimitStage::new(Rc::clone(filter))
    }

    /// The metrics' flush, and for local counters the sweep: they clean
    /// themselves on every write, and the sweep frees the slots of
    /// consumers that stopped calling.
    fn tick_ms(&self) -> Option<u64> {
        let sweep = self.c.service.is_none().then_some(SWEEP_MS);
        let flush = crate::metrics::timer_period(&self.registry);
        sweep.into_iter().chain(flush).min()
    }

    fn tick(&self, env: &mut RootEnv<'_>) {
        crate::metrics::flush_timer(&self.registry, env.metrics);
        if self.c.service.is_some() {
            return;
        }
        let now = env.clock.now_ms();
        // A host (the bundle) may tick more often than asked.
        if now.saturating_sub(self.swept_ms.get()) < SWEEP_MS {
            return;
        }
        self.swept_ms.set(now);
        for (prefix, tags) in self.counter_prefixes() {
            let current = |t: u64| {
                let (_, w) = tags.iter().find(|(tag, _)| *tag == t)?;
                Some(w.span(now).0)
            };
            counters::sweep(env.shared, &prefix, &current);
        }
    }

    fn start(&self, env: &mut RootEnv<'_>) {
        for (prefix, _) in self.counter_prefixes() {
            counters::create_slots(env.shared, &prefix);
        }
    }
}

/// What a request asks of the token limits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ask {
    pub input: u64,
    pub output: u64,
    /// The output is the configured default, not the request's own cap.
    pub guessed: bool,
}

impl Ask {
    /// The amount a limit of this kind reserves when `used` is counted.
    ///
    /// What the request states (its prompt, its own `max_tokens`) is
    /// reserved in full, capped at the limit, so a request that fits the
    /// limit alone is never refused forever; a guessed output (the default)
    /// takes at most what remains, so a large default never refuses a request
    /// a small limit still has room for. Tokens reserve at least one, so an
    /// exhausted limit refuses even an empty prompt.
    pub fn amount(&self, limit: &Limit, used: u64) -> u64 {
        let (stated, guess) = match limit.kind {
            Kind::Requests => return 1,
            Kind::InputTokens => (self.input, 0),
            Kind::OutputTokens if self.guessed => (0, self.output),
            Kind::OutputTokens => (self.output, 0),
            Kind::TotalTokens if self.guessed => (self.input, self.output),
            Kind::TotalTokens => (self.input.saturating_add(self.output), 0),
        };
        let room = limit.max.saturating_sub(used).saturating_sub(stated);
        stated.saturating_add(guess.min(room)).clamp(1, limit.max)
    }

    pub fn tokens(&self) -> u64 {
        self.input.saturating_add(self.output)
    }
}

/// One limit as it stood for this request, for the headers and the 429.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Standing {
    pub rule: String,
    pub kind: Kind,
    pub window: window::Window,
    pub max: u64,
    pub remaining: u64,
    pub reset_ms: u64,
}

/// A reservation held until the request settles.
#[derive(Clone, Debug)]
struct Held {
    rule: usize,
    limit: Limit,
    place: Option<Place>,
    window: u64,
    amount: u64,
}

/// Why a request was refused.
#[derive(Clone, Debug)]
struct Denial {
    rule: String,
    limit: Limit,
    used: u64,
    asked: u64,
    retry_ms: u64,
}

/// A rule's outcome for one request, for the metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RuleOutcome {
    Allow,
    Deny,
    ShadowDeny,
}

impl RuleOutcome {
    fn name(self) -> &'static str {
        match self {
            RuleOutcome::Allow => "allow",
            RuleOutcome::Deny => "deny",
            RuleOutcome::ShadowDeny => "shadow_deny",
        }
    }
}

/// A `ShouldRateLimit` call in flight: which limit it asks about.
#[derive(Clone, Debug)]
struct Asking {
    token: u32,
    rule: usize,
    limit: Limit,
    amount: u64,
}

pub struct RateLimitStage {
    f: Rc<RateLimit>,
    consumer: String,
    ask: Ask,
    matched: Vec<usize>,
    held: Vec<Held>,
    standings: Vec<Standing>,
    outcomes: Vec<(usize, RuleOutcome)>,
    denial: Option<Denial>,
    asking: Vec<Asking>,
    service_failed: bool,
    decided: bool,
}

const REQUESTS_TOTAL: &str = "aigw_ratelimit_requests_total";
const TOKENS_RESERVED_TOTAL: &str = "aigw_ratelimit_tokens_reserved_total";
const TOKENS_SETTLED_TOTAL: &str = "aigw_ratelimit_tokens_settled_total";
const SERVICE_ERRORS_TOTAL: &str = "aigw_ratelimit_service_errors_total";
/// How often each worker sweeps the local counters of past windows.
const SWEEP_MS: u64 = 60_000;

impl RateLimitStage {
    pub fn new(f: Rc<RateLimit>) -> Self {
        RateLimitStage {
            f,
            consumer: String::new(),
            ask: Ask::default(),
            matched: Vec::new(),
            held: Vec::new(),
            standings: Vec::new(),
            outcomes: Vec::new(),
            denial: None,
            asking: Vec::new(),
            service_failed: false,
            decided: false,
        }
    }

    fn matching(
        &self,
        env: &Env<'_>,
        headers: &Headers,
        facts: Option<&RequestFacts>,
    ) -> Vec<usize> {
        let identity = &self.f.c.identity;
        let consumer = self.consumer.as_str();
        let model = facts.and_then(|f| f.model.as_deref());
        // Only a rule on the routed model needs the router's fact (which in
        // DESIGN order is not there yet): no host call for it otherwise.
        let routed = if self
            .f
            .c
            .rules
            .iter()
            .any(|r| r.matcher.routed_models.is_some())
        {
            facts::route(env.state).and_then(|r| r.model)
        } else {
            None
        };
        self.f
            .c
            .rules
            .iter()
            .enumerate()
            .filter(|(_, r)| {
                let m = &r.matcher;
                let by_consumer = match (&m.consumers, &m.groups) {
                    (None, None) => true,
                    (cs, gs) => {
                        cs.iter().flatten().any(|c| c == consumer)
                            || gs.iter().flatten().any(|g| identity.in_group(consumer, g))
                    }
                };
                let in_list = |list: &Option<Vec<String>>, v: Option<&str>| match list {
                    None => true,
                    Some(l) => v.is_some_and(|v| l.iter().any(|x| x == v)),
                };
                by_consumer
                    && in_list(&m.models, model)
                    && in_list(&m.routed_models, routed.as_deref())
                    && m.headers
                        .iter()
                        .all(|(h, v)| headers.get(h) == Some(v.as_str()))
            })
            .map(|(i, _)| i)
            .collect()
    }

    fn subject(&self, rule: &Rule) -> String {
        if rule.shared {
            "*".to_string()
        } else {
            self.consumer.clone()
        }
    }

    /// Every matching limit against the local counters, in rule order; the
    /// first that does not fit denies, and what was reserved before it is
    /// given back.
    fn decide_local(&mut self, env: &mut Env<'_>) {
        let now = env.clock.now_ms();
        let f = Rc::clone(&self.f);
        'rules: for &ri in &self.matched.clone() {
            let rule = &f.c.rules[ri];
            let subject = self.subject(rule);
            let mut outcome = RuleOutcome::Allow;
            let limits = rule.limits_for(&self.consumer);
            let ask = self.ask;
            let amounts: Vec<_> = limits
                .iter()
                .map(|limit| move |used: u64| ask.amount(limit, used))
                .collect();
            let spans: Vec<(u64, u64)> = limits.iter().map(|l| l.window.span(now)).collect();
            let asks: Vec<counters::Ask<'_>> = limits
                .iter()
                .zip(&amounts)
                .zip(&spans)
                .map(|((limit, amount), &(start, _))| counters::Ask {
                    tag: tag(limit.kind, limit.window),
                    window: start,
                    max: limit.max,
                    amount,
                })
                .collect();
            // One read and one write for all the rule's limits.
            let slot = counters::place_of(&rule.name, 0, &subject);
            let (reserved, written) =
                counters::reserve_all(env.shared, &slot.key, slot.subject, &asks, !rule.shadow);
            for (((limit, part), &(_, end)), reserved) in
                limits.iter().zip(&asks).zip(&spans).zip(reserved)
            {
                let standing = |used: u64| Standing {
                    rule: rule.name.clone(),
                    kind: limit.kind,
                    window: limit.window,
                    max: limit.max,
                    remaining: limit.max.saturating_sub(used),
                    reset_ms: end - now,
                };
                match reserved {
                    Ok((amount, n)) => {
                        self.standings.push(standing(n));
                        if written {
                            self.held.push(Held {
                                rule: ri,
                                limit: limit.clone(),
                                place: Some(Place {
                                    key: slot.key.clone(),
                                    subject: slot.subject,
                                    tag: part.tag,
                                }),
                                window: part.window,
                                amount,
                            });
                        }
                    }
                    Err(Refused::Full(used)) => {
                        self.standings.push(standing(used));
                        if rule.shadow {
                            outcome = RuleOutcome::ShadowDeny;
                            continue;
                        }
                        self.outcomes.push((ri, RuleOutcome::Deny));
                        self.denial = Some(Denial {
                            rule: rule.name.clone(),
                            limit: limit.clone(),
                            used,
                            asked: ask.amount(limit, used),
                            retry_ms: end - now,
                        });
                        break 'rules;
                    }
                    // The store failed under us: counting nothing beats
                    // refusing everyone (and is what a lost counter means).
                    Err(Refused::Store) => {}
                }
            }
            self.outcomes.push((ri, outcome));
        }
        if self.denial.is_some() {
            for h in std::mem::take(&mut self.held) {
                if let Some(p) = &h.place {
                    let _ = counters::change(
                        env.shared,
                        p,
                        h.window,
                        h.window,
                        -(h.amount as i64),
                        None,
                    );
                }
            }
        }
    }

    /// One `ShouldRateLimit` call per matching limit, all in flight at once.
    fn ask_service(&mut self, env: &mut Env<'_>, service: &Service) -> bool {
        let f = Rc::clone(&self.f);
        for &ri in &self.matched {
            let rule = &f.c.rules[ri];
            let subject = self.subject(rule);
            for limit in rule.limits_for(&self.consumer) {
                // The service cannot refund: charge the prompt now, the output when it is known.
                let amount = match limit.kind {
                    Kind::Requests => 1,
                    Kind::OutputTokens => 1,
                    _ => self.ask.amount(limit, 0).min(self.ask.input).max(1),
                };
                let call = service_call(service, rule, limit, &subject, amount);
                match env.callouts.grpc(&call) {
                    Ok(token) => self.asking.push(Asking {
                        token,
                        rule: ri,
                        limit: limit.clone(),
                        amount,
                    }),
                    Err(_) => {
                        self.service_failed = true;
                    }
                }
            }
        }
        !self.asking.is_empty()
    }

    fn verdict(&mut self, env: &mut Env<'_>) -> Step {
        self.decided = true;
        let f = Rc::clone(&self.f);
        if self.service_failed {
            if let Ok(mut reg) = f.registry.try_borrow_mut() {
                reg.add(env.metrics, SERVICE_ERRORS_TOTAL, &[], 1);
            }
            if let Some(s) = &f.c.service {
                if s.failure_mode == FailureMode::Deny {
                    env.state.set(facts::RATELIMIT, b"deny");
                    self.count_requests(env);
                    return Step::Reply(Reply::error(
                        503,
                        "service_unavailable",
                        "rate_limit_service_unavailable",
                        "The rate limit service did not answer; try again shortly.",
                    ));
                }
            }
        }
        let outcome = if self.matched.is_empty() {
            "off"
        } else if self.denial.is_some() {
            "deny"
        } else if self
            .outcomes
            .iter()
            .any(|(_, o)| *o == RuleOutcome::ShadowDeny)
        {
            "shadow_deny"
        } else {
            "allow"
        };
        env.state.set(facts::RATELIMIT, outcome.as_bytes());
        self.count_requests(env);
        let Some(d) = self.denial.clone() else {
            return Step::Continue;
        };
        let retry_s = d.retry_ms.div_ceil(1000).max(1);
        let what = format!(
            "consumer {} by rule {} on {} per {}: limit {}, used {}, requested {}",
            self.consumer,
            d.rule,
            d.limit.kind.name(),
            d.limit.window,
            d.limit.max,
            d.used,
            d.asked,
        );
        let when = openai_duration(d.retry_ms);
        let message = if d.limit.budget {
            format!("You exceeded your current quota: {what}. It renews in {when}.")
        } else {
            format!("Rate limit reached for {what}. Please try again in {when}.")
        };
        let (kind, code) = match (d.limit.budget, d.limit.kind) {
            (true, _) => ("insufficient_quota", "insufficient_quota"),
            (false, Kind::Requests) => ("requests", "rate_limit_exceeded"),
            (false, _) => ("tokens", "rate_limit_exceeded"),
        };
        let mut reply =
            Reply::error(429, kind, code, &message).with_header("retry-after", retry_s.to_string());
        for (k, v) in headers_for(&self.standings, true) {
            reply = reply.with_header(k, v);
        }
        Step::Reply(reply)
    }

    fn labels<'a>(&'a self, rule: &'a str) -> [(&'a str, &'a str); 2] {
        [("rule", rule), ("consumer", self.consumer.as_str())]
    }

    fn count_requests(&self, env: &mut Env<'_>) {
        let Ok(mut reg) = self.f.registry.try_borrow_mut() else {
            return;
        };
        for (ri, o) in &self.outcomes {
            let rule = &self.f.c.rules[*ri];
            let [r, c] = self.labels(&rule.name);
            reg.add(
                env.metrics,
                REQUESTS_TOTAL,
                &[r, c, ("outcome", o.name())],
                1,
            );
            if *o != RuleOutcome::Deny
                && rule
                    .limits_for(&self.consumer)
                    .iter()
                    .any(|l| l.kind.is_tokens())
            {
                reg.add(
                    env.metrics,
                    TOKENS_RESERVED_TOTAL,
                    &[r, c],
                    self.ask.tokens(),
                );
            }
        }
    }

    fn on_service_answer(&mut self, token: u32, response: &CalloutResponse) {
        let Some(i) = self.asking.iter().position(|a| a.token == token) else {
            return;
        };
        let a = self.asking.remove(i);
        let f = Rc::clone(&self.f);
        let rule = &f.c.rules[a.rule];
        let answer = match response {
            CalloutResponse::Grpc { status: 0, message } => rls::decode_response(message),
            _ => None,
        };
        let Some(answer) = answer else {
            self.service_failed = true;
            return;
        };
        let status = answer.statuses.first().cloned().unwrap_or_default();
        let standing = Standing {
            rule: rule.name.clone(),
            kind: a.limit.kind,
            window: a.limit.window,
            max: status.limit.unwrap_or(a.limit.max),
            remaining: status.remaining,
            reset_ms: status.reset_ms.unwrap_or(0),
        };
        self.standings.push(standing.clone());
        let over = answer.overall == rls::Code::OverLimit;
        let o = match (over, rule.shadow) {
            (false, _) => RuleOutcome::Allow,
            (true, true) => RuleOutcome::ShadowDeny,
            (true, false) => RuleOutcome::Deny,
        };
        match self.outcomes.iter_mut().find(|(r, _)| *r == a.rule) {
            Some((_, prev)) => {
                if o != RuleOutcome::Allow && *prev != RuleOutcome::Deny {
                    *prev = o;
                }
            }
            None => self.outcomes.push((a.rule, o)),
        }
        if o == RuleOutcome::Deny && self.denial.is_none() {
            self.denial = Some(Denial {
                rule: rule.name.clone(),
                limit: a.limit.clone(),
                used: standing.max.saturating_sub(standing.remaining),
                asked: a.amount,
                retry_ms: standing.reset_ms,
            });
        }
        if o != RuleOutcome::Deny {
            self.held.push(Held {
                rule: a.rule,
                limit: a.limit,
                place: None,
                window: 0,
                amount: a.amount,
            });
        }
    }

    /// Settles every reservation to the usage the meter published.
    fn settle(&mut self, env: &mut Env<'_>) {
        if self.held.is_empty() {
            return;
        }
        // No usage fact means no meter in the chain: keep what was reserved
        // (charging the estimate beats letting the request go free).
        let Some(usage) = facts::usage(env.state) else {
            return;
        };
        let input = usage.input_tokens.unwrap_or(0);
        let output = usage.output_tokens.unwrap_or(0);
        let used = Ask {
            input,
            output,
            guessed: false,
        };
        let now = env.clock.now_ms();
        let f = Rc::clone(&self.f);
        let mut settled_rules: Vec<usize> = Vec::new();
        for h in std::mem::take(&mut self.held) {
            if !h.limit.kind.is_tokens() {
                continue;
            }
            let actual = match h.limit.kind {
                Kind::InputTokens => used.input,
                Kind::OutputTokens => used.output,
                _ => used.tokens(),
            };
            match (&h.place, &f.c.service) {
                (Some(place), _) => {
                    let (current, _) = h.limit.window.span(now);
                    if actual < h.amount {
                        let _ = counters::change(
                            env.shared,
                            place,
                            h.window,
                            current,
                            -((h.amount - actual) as i64),
                            None,
                        );
                    } else if actual > h.amount {
                        // Excess is charged to the window it was used in.
                        let _ = counters::change(
                            env.shared,
                            place,
                            current,
                            current,
                            (actual - h.amount) as i64,
                            None,
                        );
                    }
                }
                (None, Some(service)) if actual > h.amount => {
                    let rule = &f.c.rules[h.rule];
                    let extra = actual - h.amount;
                    let call = service_call(service, rule, &h.limit, &self.subject(rule), extra);
                    let _ = env.callouts.grpc_detached(&call);
                }
                _ => {}
            }
            if !settled_rules.contains(&h.rule) {
                settled_rules.push(h.rule);
            }
        }
        if let Ok(mut reg) = self.f.registry.try_borrow_mut() {
            for ri in settled_rules {
                let [r, c] = self.labels(&f.c.rules[ri].name);
                reg.add(env.metrics, TOKENS_SETTLED_TOTAL, &[r, c], used.tokens());
            }
        }
    }
}

fn service_call(
    service: &Service,
    rule: &Rule,
    limit: &Limit,
    subject: &str,
    hits: u64,
) -> GrpcCall {
    let key = limit.key();
    let descriptor = vec![
        ("rule", rule.name.as_str()),
        ("consumer", subject),
        ("limit", key.as_str()),
    ];
    GrpcCall {
        cluster: service.cluster.clone(),
        service: rls::SERVICE.into(),
        method: rls::METHOD.into(),
        metadata: Vec::new(),
        message: rls::encode_request(
            &service.domain,
            &[descriptor],
            u32::try_from(hits).unwrap_or(u32::MAX),
        ),
        timeout_ms: service.timeout_ms,
    }
}

/// The rate limit headers for a set of standings: OpenAI's
/// `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` from the tightest
/// limit of each kind, and the IETF `RateLimit-Policy` / `RateLimit` lists
/// with every limit. `all` false gives the remaining-* headers only.
pub fn headers_for(standings: &[Standing], all: bool) -> Vec<(&'static str, String)> {
    let mut out = Vec::with_capacity(8);
    for tokens in [false, true] {
        let tightest = standings
            .iter()
            .filter(|s| s.kind.is_tokens() == tokens)
            .min_by_key(|s| (s.remaining, std::cmp::Reverse(s.reset_ms)));
        let Some(s) = tightest else { continue };
        let [limit, remaining, reset] = if tokens {
            [
                "x-ratelimit-limit-tokens",
                "x-ratelimit-remaining-tokens",
                "x-ratelimit-reset-tokens",
            ]
        } else {
            [
                "x-ratelimit-limit-requests",
                "x-ratelimit-remaining-requests",
                "x-ratelimit-reset-requests",
            ]
        };
        if all {
            out.push((limit, number(s.max)));
        }
        out.push((remaining, number(s.remaining)));
        if all {
            out.push((reset, openai_duration(s.reset_ms)));
        }
    }
    if !standings.is_empty() {
        // Written piece by piece: this runs on every answer, and the
        // formatting machinery costs more than the text.
        let (mut policy, mut now) = (String::with_capacity(128), String::with_capacity(128));
        for (i, s) in standings.iter().enumerate() {
            for (text, a, av, b, bv) in [
                (&mut policy, ";q=", s.max, ";w=", s.window.nominal_secs()),
                (
                    &mut now,
                    ";r=",
                    s.remaining,
                    ";t=",
                    s.reset_ms.div_ceil(1000),
                ),
            ] {
                if i > 0 {
                    text.push_str(", ");
                }
                text.push('"');
                text.push_str(&s.rule);
                text.push('.');
                text.push_str(s.kind.name());
                text.push_str("_per_");
                text.push_str(s.window.name());
                text.push('"');
                text.push_str(a);
                push_decimal(text, av);
                text.push_str(b);
                push_decimal(text, bv);
            }
        }
        out.push(("ratelimit-policy", policy));
        out.push(("ratelimit", now));
    }
    out
}

fn number(n: u64) -> String {
    let mut s = String::with_capacity(20);
    push_decimal(&mut s, n);
    s
}

/// A limit's tag in its rule's counter slots: its kind and window.
fn tag(kind: Kind, window: window::Window) -> u64 {
    ((window as u64) << 8) | kind as u64
}

impl Stage for RateLimitStage {
    fn request_headers(
        &mut self,
        env: &mut Env<'_>,
        headers: &mut Headers,
        _end_of_stream: bool,
    ) -> Step {
        match self.f.c.identity.resolve(env, headers) {
            Ok((consumer, _)) => self.consumer = consumer,
            Err(reply) => {
                self.decided = true;
                return Step::Reply(reply);
            }
        }
        if self.f.c.rules.is_empty() {
            self.decided = true;
            env.state.set(facts::RATELIMIT, b"off");
            return Step::Continue;
        }
        Step::ReadBody {
            hold_headers: self.f.c.hold_request_headers,
        }
    }

    fn request_body(
        &mut self,
        env: &mut Env<'_>,
        body: &mut RequestBody,
        headers: &mut Headers,
    ) -> Step {
        let probing = self.f.above.begin();
        let facts = body
            .shared_facts(&*env.state, &self.f.above, probing)
            .0
            .cloned();
        self.matched = self.matching(env, headers, facts.as_ref());
        let needs_tokens = self.matched.iter().any(|&ri| {
            self.f.c.rules[ri]
                .limits_for(&self.consumer)
                .iter()
                .any(|l| l.kind.is_tokens())
        });
        if needs_tokens {
            let input = match &facts {
                Some(f) => estimate_tokens(f.text_bytes),
                // Not JSON (or too large to read): the size still says something.
                None => estimate_tokens(
                    headers
                        .get("content-length")
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(body.bytes().len() as u64),
                ),
            };
            // Read with the facts, in the same pass over the body.
            let cap = facts.as_ref().and_then(|f| f.output_cap);
            self.ask = Ask {
                input,
                output: cap.unwrap_or(self.f.c.default_max_tokens),
                guessed: cap.is_none(),
            };
        }
        if self.matched.is_empty() {
            return self.verdict(env);
        }
        let f = Rc::clone(&self.f);
        match &f.c.service {
            None => {
                self.decide_local(env);
                self.verdict(env)
            }
            Some(service) => {
                if self.ask_service(env, service) {
                    Step::Wait
                } else {
                    self.verdict(env)
                }
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
        self.on_service_answer(token, response);
        if self.asking.is_empty() {
            self.verdict(env)
        } else {
            Step::Wait
        }
    }

    fn response_headers(
        &mut self,
        _env: &mut Env<'_>,
        headers: &mut Headers,
        _end_of_stream: bool,
    ) -> Step {
        if self.f.c.response_headers && self.denial.is_none() {
            for (k, v) in headers_for(&self.standings, true) {
                headers.set(k, v);
            }
        }
        Step::Continue
    }

    fn log(&mut self, env: &mut Env<'_>, _input: &dyn LogInput) {
        if !self.decided {
            // The client left before the body was read: nothing was reserved.
            return;
        }
        self.settle(env);
    }
}
