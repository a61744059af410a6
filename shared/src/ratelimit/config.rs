//! The rate-limit configuration: as written, then compiled into rules that
//! can only exist once every reference is checked (windows known, limits
//! positive, groups defined, every rule able to match someone).

use super::window::Window;
use crate::config::{self, ConfigError};
use crate::identity::{Identity, IdentityConfig};
use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    pub identity: IdentityConfig,
    pub rules: Vec<RuleConfig>,
    /// `local` (default: shared data, one set of counters per Envoy) or
    /// `global` (the rate limit service named in `service`).
    pub counters: Option<String>,
    pub service: Option<ServiceConfig>,
    /// Output tokens reserved for a request that names no
    /// `max_tokens` / `max_completion_tokens` / `max_output_tokens` (default 1024).
    pub default_max_tokens: Option<i64>,
    /// Put `x-ratelimit-remaining-*` headers on admitted answers too (default true).
    pub response_headers: Option<bool>,
    /// Distinct metric series per VM before consumer folds into `other` (default 4096).
    pub max_metric_series: Option<usize>,
    /// How often counters kept in VM memory are handed to Envoy, in ms
    /// (default 1000; 0: on every request).
    pub metrics_flush_ms: Option<u64>,
    /// Hold request headers while the body is read, so nothing reaches the
    /// upstream before the decision (default true; needs Envoy's
    /// `allow_on_headers_stop_iteration`). False lets the headers go on and
    /// a denial resets the upstream request: for hosts that cannot set that
    /// option, such as Istio's WasmPlugin.
    pub hold_request_headers: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuleConfig {
    pub name: String,
    #[serde(rename = "match")]
    pub matches: MatchConfig,
    pub limits: Vec<LimitConfig>,
    /// Token (or request) quotas per calendar day or month (UTC); exhausted,
    /// they answer `insufficient_quota`.
    pub budgets: Vec<LimitConfig>,
    /// Consumer → limits and budgets that replace the rule's for that consumer.
    pub overrides: BTreeMap<String, OverrideConfig>,
    /// Evaluate and report, never deny.
    pub shadow: bool,
    /// One set of counters for everyone the rule matches, instead of one per consumer.
    pub shared: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MatchConfig {
    pub consumers: Option<Vec<String>>,
    pub groups: Option<Vec<String>>,
    /// The model the request asked for.
    pub models: Option<Vec<String>>,
    /// The model a router before this filter chose (`aigw.model`).
    pub routed_models: Option<Vec<String>>,
    /// Request header → the exact value it must have.
    pub headers: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OverrideConfig {
    pub limits: Option<Vec<LimitConfig>>,
    pub budgets: Option<Vec<LimitConfig>>,
}

/// One limit: exactly one of the four amounts, per a window.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitConfig {
    pub requests: Option<i64>,
    pub input_tokens: Option<i64>,
    pub output_tokens: Option<i64>,
    pub total_tokens: Option<i64>,
    pub per: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceConfig {
    /// The Envoy cluster of the rate limit service (HTTP/2).
    pub cluster: String,
    /// The `domain` of every `ShouldRateLimit` request (default `aigw`).
    pub domain: Option<String>,
    pub timeout_ms: Option<u64>,
    /// `allow` (default) or `deny` when the service fails or is too slow.
    pub failure_mode: Option<String>,
}

/// What a limit counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Requests,
    InputTokens,
    OutputTokens,
    TotalTokens,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Requests => "requests",
            Kind::InputTokens => "input_tokens",
            Kind::OutputTokens => "output_tokens",
            Kind::TotalTokens => "total_tokens",
        }
    }
    pub fn is_tokens(self) -> bool {
        self != Kind::Requests
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limit {
    pub kind: Kind,
    pub window: Window,
    pub max: u64,
    /// A budget (quota): denial says `insufficient_quota`.
    pub budget: bool,
}

impl Limit {
    /// The counter's name within its rule: `total_tokens_per_minute`.
    pub fn key(&self) -> String {
        format!("{}_per_{}", self.kind.name(), self.window.name())
    }
}

#[derive(Clone, Debug, Default)]
pub struct Matcher {
    pub consumers: Option<Vec<String>>,
    pub groups: Option<Vec<String>>,
    pub models: Option<Vec<String>>,
    pub routed_models: Option<Vec<String>>,
    pub headers: Vec<(String, String)>,
}

#[derive(Clone, Debug)]
pub struct Rule {
    pub name: String,
    pub matcher: Matcher,
    pub limits: Vec<Limit>,
    pub overrides: BTreeMap<String, Vec<Limit>>,
    pub shadow: bool,
    pub shared: bool,
}

impl Rule {
    pub fn limits_for(&self, consumer: &str) -> &[Limit] {
        self.overrides.get(consumer).unwrap_or(&self.limits)
    }

    /// Every (kind, window) this rule counts, overrides included.
    pub fn counters(&self) -> Vec<(Kind, Window)> {
        let mut all: Vec<(Kind, Window)> = self
            .limits
            .iter()
            .chain(self.overrides.values().flatten())
            .map(|l| (l.kind, l.window))
            .collect();
        all.sort();
        all.dedup();
        all
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureMode {
    Allow,
    Deny,
}

#[derive(Clone, Debug)]
pub struct Service {
    pub cluster: String,
    pub domain: String,
    pub timeout_ms: u64,
    pub failure_mode: FailureMode,
}

#[derive(Debug)]
pub struct Compiled {
    pub identity: Identity,
    pub rules: Vec<Rule>,
    /// `None`: local counters.
    pub service: Option<Service>,
    pub default_max_tokens: u64,
    pub response_headers: bool,
    pub max_metric_series: usize,
    pub metrics_flush_ms: u64,
    pub hold_request_headers: bool,
}

/// Largest limit accepted: past this a counter means nothing.
const MAX_LIMIT: i64 = 1 << 50;

fn limit(field: &str, c: &LimitConfig, budget: bool) -> Result<Limit, ConfigError> {
    let amounts = [
        (Kind::Requests, c.requests),
        (Kind::InputTokens, c.input_tokens),
        (Kind::OutputTokens, c.output_tokens),
        (Kind::TotalTokens, c.total_tokens),
    ];
    let set: Vec<(Kind, i64)> = amounts
        .iter()
        .filter_map(|(k, v)| v.map(|v| (*k, v)))
        .collect();
    let [(kind, max)] = set[..] else {
        return Err(ConfigError::new(
            field,
            "a limit has exactly one of requests, input_tokens, output_tokens, total_tokens",
        ));
    };
    let f = format!("{field}.{}", kind.name());
    if max <= 0 {
        return Err(ConfigError::new(
            f,
            format!("{max} is not a positive limit"),
        ));
    }
    if max > MAX_LIMIT {
        return Err(ConfigError::new(
            f,
            format!("{max} is larger than {MAX_LIMIT}"),
        ));
    }
    let allowed: &[&str] = if budget {
        &["day", "month"]
    } else {
        &["second", "minute", "hour", "day"]
    };
    let window = Window::parse(&c.per)
        .filter(|w| allowed.contains(&w.name()))
        .ok_or_else(|| {
            ConfigError::new(
                format!("{field}.per"),
                format!("unknown window {:?} (one of {})", c.per, allowed.join(", ")),
            )
        })?;
    Ok(Limit {
        kind,
        window,
        max: max as u64,
        budget,
    })
}

fn limit_set(
    field: &str,
    limits: &[LimitConfig],
    budgets: &[LimitConfig],
) -> Result<Vec<Limit>, ConfigError> {
    let mut out = Vec::new();
    for (i, l) in limits.iter().enumerate() {
        out.push(limit(&format!("{field}limits[{i}]"), l, false)?);
    }
    for (i, b) in budgets.iter().enumerate() {
        out.push(limit(&format!("{field}budgets[{i}]"), b, true)?);
    }
    for (i, l) in out.iter().enumerate() {
        if out[..i]
            .iter()
            .any(|o| o.kind == l.kind && o.window == l.window)
        {
            return Err(ConfigError::new(
                format!("{field}limits"),
                format!("two limits of {} per {}", l.kind.name(), l.window),
            ));
        }
    }
    Ok(out)
}

fn non_empty_list(field: &str, list: &Option<Vec<String>>) -> Result<(), ConfigError> {
    match list {
        Some(l) if l.is_empty() => Err(ConfigError::new(
            field,
            "an empty list matches nothing: the rule can never match",
        )),
        _ => Ok(()),
    }
}

fn rule_name(field: &str, name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::new(
            field,
            format!("{name:?} is not a rule name (1 to 64 of A-Z a-z 0-9 - _ .)"),
        ))
    }
}

fn rule(i: usize, c: RuleConfig, identity: &Identity) -> Result<Rule, ConfigError> {
    let field = format!("rules[{i}]");
    rule_name(&format!("{field}.name"), &c.name)?;
    let m = &c.matches;
    non_empty_list(&format!("{field}.match.consumers"), &m.consumers)?;
    non_empty_list(&format!("{field}.match.groups"), &m.groups)?;
    non_empty_list(&format!("{field}.match.models"), &m.models)?;
    non_empty_list(&format!("{field}.match.routed_models"), &m.routed_models)?;
    for (j, g) in m.groups.iter().flatten().enumerate() {
        if !identity.has_group(g) {
            return Err(ConfigError::new(
                format!("{field}.match.groups[{j}]"),
                format!("no group {g:?} in identity.groups: the rule can never match"),
            ));
        }
    }
    for (j, c) in m.consumers.iter().flatten().enumerate() {
        if !identity.can_resolve(c) {
            return Err(ConfigError::new(
                format!("{field}.match.consumers[{j}]"),
                format!("no API key or default names consumer {c:?}: the rule can never match"),
            ));
        }
    }
    let mut headers = Vec::new();
    for (h, v) in &m.headers {
        headers.push((
            config::header_name(&format!("{field}.match.headers"), h)?,
            v.clone(),
        ));
    }
    let matcher = Matcher {
        consumers: m.consumers.clone(),
        groups: m.groups.clone(),
        models: m.models.clone(),
        routed_models: m.routed_models.clone(),
        headers,
    };
    let limits = limit_set(&format!("{field}."), &c.limits, &c.budgets)?;
    if limits.is_empty() {
        return Err(ConfigError::new(
            format!("{field}.limits"),
            "a rule needs at least one limit or budget",
        ));
    }
    let mut overrides = BTreeMap::new();
    for (consumer, o) in &c.overrides {
        let f = format!("{field}.overrides.{consumer}.");
        let could_match = matcher.consumers.as_ref().is_none_or(|cs| {
            cs.contains(consumer)
                || matcher
                    .groups
                    .iter()
                    .flatten()
                    .any(|g| identity.in_group(consumer, g))
        }) && identity.can_resolve(consumer);
        if !could_match {
            return Err(ConfigError::new(
                f.trim_end_matches('.'),
                format!("consumer {consumer:?} never matches this rule"),
            ));
        }
        let l = o.limits.as_deref().unwrap_or(&[]);
        let b = o.budgets.as_deref().unwrap_or(&[]);
        let mut set = limit_set(&f, l, b)?;
        // What the override does not restate, the rule's limits still say.
        if o.limits.is_none() {
            set.extend(limits.iter().filter(|x| !x.budget).cloned());
        }
        if o.budgets.is_none() {
            set.extend(limits.iter().filter(|x| x.budget).cloned());
        }
        overrides.insert(consumer.clone(), set);
    }
    Ok(Rule {
        name: c.name,
        matcher,
        limits,
        overrides,
        shadow: c.shadow,
        shared: c.shared,
    })
}

pub fn compile(c: RateLimitConfig) -> Result<Compiled, ConfigError> {
    let identity = Identity::compile(c.identity, "identity")?;
    let mut rules: Vec<Rule> = Vec::new();
    for (i, r) in c.rules.into_iter().enumerate() {
        let r = rule(i, r, &identity)?;
        if rules.iter().any(|o| o.name == r.name) {
            return Err(ConfigError::new(
                format!("rules[{i}].name"),
                format!("a second rule named {:?}", r.name),
            ));
        }
        rules.push(r);
    }
    let service = match c.counters.as_deref().unwrap_or("local") {
        "local" => {
            if c.service.is_some() {
                return Err(ConfigError::new(
                    "service",
                    "only used with \"counters\": \"global\"",
                ));
            }
            None
        }
        "global" => {
            let s = c.service.ok_or_else(|| {
                ConfigError::new("service", "\"counters\": \"global\" needs a service")
            })?;
            if s.cluster.is_empty() {
                return Err(ConfigError::new(
                    "service.cluster",
                    "must name an Envoy cluster",
                ));
            }
            let timeout_ms = s.timeout_ms.unwrap_or(100);
            if !(1..=60_000).contains(&timeout_ms) {
                return Err(ConfigError::new(
                    "service.timeout_ms",
                    format!("{timeout_ms} is outside 1..=60000"),
                ));
            }
            let failure_mode = match s.failure_mode.as_deref().unwrap_or("allow") {
                "allow" => FailureMode::Allow,
                "deny" => FailureMode::Deny,
                other => {
                    return Err(ConfigError::new(
                        "service.failure_mode",
                        format!("{other:?} is not allow or deny"),
                    ))
                }
            };
            let domain = s.domain.unwrap_or_else(|| "aigw".into());
            if domain.is_empty() {
                return Err(ConfigError::new("service.domain", "must not be empty"));
            }
            Some(Service {
                cluster: s.cluster,
                domain,
                timeout_ms,
                failure_mode,
            })
        }
        other => {
            return Err(ConfigError::new(
                "counters",
                format!("{other:?} is not local or global"),
            ))
        }
    };
    let default_max_tokens = c.default_max_tokens.unwrap_or(1024);
    if !(1..=MAX_LIMIT).contains(&default_max_tokens) {
        return Err(ConfigError::new(
            "default_max_tokens",
            format!("{default_max_tokens} is not a positive token count"),
        ));
    }
    let max_metric_series = c.max_metric_series.unwrap_or(4096);
    if max_metric_series == 0 {
        return Err(ConfigError::new("max_metric_series", "must be positive"));
    }
    Ok(Compiled {
        identity,
        rules,
        service,
        default_max_tokens: default_max_tokens as u64,
        response_headers: c.response_headers.unwrap_or(true),
        max_metric_series,
        metrics_flush_ms: crate::metrics::flush_ms(c.metrics_flush_ms)?,
        hold_request_headers: c.hold_request_headers.unwrap_or(true),
    })
}
