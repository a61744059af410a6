//! The model-router configuration: as written (serde, `deny_unknown_fields`),
//! then compiled into [`Router`](super::Router) with every reference
//! resolved, every pattern and regex compiled, and every value checked, so
//! that the request path only looks things up.

use super::complexity::{ScoreConfig, Weights};
use super::pattern::Pattern;
use crate::config::{self, ConfigError};
use serde::{Deserialize, Deserializer};
use std::collections::BTreeMap;
use std::fmt;

/// The model-router configuration as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouterConfig {
    /// Request header the route table matches to pick a cluster (default `x-aigw-target`).
    pub target_header: Option<String>,
    /// Request header naming the consumer, when no filter published one (default `x-aigw-consumer`).
    pub consumer_header: Option<String>,
    /// Request header the requested model is read from when neither the
    /// body nor an Azure path names one.
    pub model_header: Option<String>,
    /// Where requests can go, by name.
    pub targets: BTreeMap<String, TargetConfig>,
    /// Model names that stand for a target (`"fast": "mini"`).
    pub aliases: BTreeMap<String, String>,
    /// Ordered rules; the first that matches picks the target.
    pub rules: Vec<RuleConfig>,
    /// The model name that routes by complexity, and its tiers.
    pub auto: Option<AutoConfig>,
    /// Target for a model no rule, alias or tier names (else 404 `model_not_found`).
    pub default_target: Option<String>,
    /// Target for a request that names no model (else 400 `missing_model`).
    pub missing_model_target: Option<String>,
    /// A body that is not JSON: `headers` (route by headers alone) or `reject` (400).
    pub non_json: Option<NonJson>,
    /// Largest `max_tokens` per upstream model (patterns as in rules).
    pub max_tokens: BTreeMap<String, u64>,
    /// A request over its model's cap: `cap` (rewrite it down) or `reject` (400).
    pub over_max_tokens: Option<OverMax>,
    /// Rewrite the response's `model` back to the name the client asked for.
    pub map_response_model: Option<bool>,
    /// Largest request body read (default 8 MiB).
    pub max_request_body_bytes: Option<usize>,
    /// Hold request headers while the body is read (default true; needs
    /// Envoy's `allow_on_headers_stop_iteration`). False routes on the
    /// request headers alone (model from an Azure path or `model_header`,
    /// no body rewrite): for hosts that cannot hold them, such as Istio's
    /// WasmPlugin.
    pub hold_request_headers: Option<bool>,
    /// How often counters kept in VM memory are handed to Envoy, in ms
    /// (default 1000; 0: on every request).
    pub metrics_flush_ms: Option<u64>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NonJson {
    #[default]
    Headers,
    Reject,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OverMax {
    #[default]
    Cap,
    Reject,
}

/// The wire dialect a target speaks; it decides the path and the key header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProviderKind {
    Openai,
    Azure,
    Anthropic,
    #[default]
    OpenaiCompatible,
}

impl ProviderKind {
    pub fn name(self) -> &'static str {
        match self {
            ProviderKind::Openai => "openai",
            ProviderKind::Azure => "azure",
            ProviderKind::Anthropic => "anthropic",
            ProviderKind::OpenaiCompatible => "openai-compatible",
        }
    }

    /// The header each provider reads its key from.
    fn key_header(self) -> KeyHeader {
        match self {
            ProviderKind::Openai | ProviderKind::OpenaiCompatible => KeyHeader::Authorization,
            ProviderKind::Azure => KeyHeader::ApiKey,
            ProviderKind::Anthropic => KeyHeader::XApiKey,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum KeyHeader {
    #[serde(rename = "authorization")]
    Authorization,
    #[serde(rename = "api-key")]
    ApiKey,
    #[serde(rename = "x-api-key")]
    XApiKey,
}

impl KeyHeader {
    pub fn name(self) -> &'static str {
        match self {
            KeyHeader::Authorization => "authorization",
            KeyHeader::ApiKey => "api-key",
            KeyHeader::XApiKey => "x-api-key",
        }
    }
}

/// Every header a client may carry its own key in: all are removed when a
/// target brings its own.
pub const KEY_HEADERS: &[&str] = &["authorization", "api-key", "x-api-key"];

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TargetConfig {
    /// Value of the target header, which the route table maps to a cluster (default: the target's name).
    pub cluster: Option<String>,
    pub provider: Option<ProviderKind>,
    /// Model name sent upstream (default: the model as asked).
    pub model: Option<String>,
    /// Azure: the deployment (default: the upstream model).
    pub deployment: Option<String>,
    /// Azure: the `api-version` query parameter (required for azure).
    pub api_version: Option<String>,
    /// Path sent upstream, replacing the client's (query included).
    pub path: Option<String>,
    /// `:authority` sent upstream.
    pub authority: Option<String>,
    /// The upstream's key, replacing whatever key the client sent.
    pub api_key: Option<String>,
    /// Header the key goes in (default by provider: `authorization` as
    /// `Bearer <key>` for openai and openai-compatible, `api-key` for azure,
    /// `x-api-key` for anthropic).
    pub api_key_header: Option<KeyHeader>,
}

impl fmt::Debug for TargetConfig {
    // The key never reaches a log, not even a debug print of the config.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TargetConfig")
            .field("cluster", &self.cluster)
            .field("provider", &self.provider)
            .field("model", &self.model)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuleConfig {
    /// Shown in the `route` fact and the access log (default `rule-<n>`).
    pub name: Option<String>,
    #[serde(rename = "match")]
    pub matches: MatchConfig,
    pub target: Option<String>,
    /// A weighted split instead of one target.
    pub split: Vec<SplitConfig>,
    /// What keeps a split's choice: `request` (the request id) or `consumer`.
    pub sticky: Option<Sticky>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sticky {
    #[default]
    Request,
    Consumer,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitConfig {
    pub target: String,
    pub weight: u32,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MatchConfig {
    #[serde(deserialize_with = "one_or_many")]
    pub model: Vec<String>,
    #[serde(deserialize_with = "one_or_many")]
    pub provider: Vec<String>,
    #[serde(deserialize_with = "one_or_many")]
    pub consumer: Vec<String>,
    pub headers: BTreeMap<String, String>,
    #[serde(deserialize_with = "one_or_many")]
    pub api: Vec<String>,
    pub min_prompt_tokens: Option<u64>,
    pub max_prompt_tokens: Option<u64>,
    pub tools: Option<bool>,
    pub images: Option<bool>,
    pub stream: Option<bool>,
    /// A regex over the text of the last user message.
    pub last_user_message: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AutoConfig {
    /// The model name that asks for routing by complexity (default `auto`).
    pub model: Option<String>,
    /// Tiers in ascending order of `max_score`; the last has none.
    pub tiers: Vec<TierConfig>,
    pub weights: Weights,
    /// Words and phrases that signal a request for reasoning.
    pub reasoning_cues: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierConfig {
    pub name: String,
    /// The highest score this tier takes; absent on the last tier.
    #[serde(default)]
    pub max_score: Option<u32>,
    pub target: String,
}

fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

// ---------------------------------------------------------------------------
// The compiled form.

/// Where a request goes and what is rewritten on the way.
pub struct Target {
    pub name: String,
    pub cluster: String,
    /// How the target is spoken to (openai-compatible unless configured).
    pub provider: ProviderKind,
    /// Published as the `provider` fact only when configured; otherwise the
    /// meter names the provider from the API the request speaks.
    pub provider_named: bool,
    pub model: Option<String>,
    pub deployment: Option<String>,
    pub api_version: Option<String>,
    pub path: Option<String>,
    pub authority: Option<String>,
    /// Header name and the value as sent (`Bearer ...` for authorization).
    pub credential: Option<(&'static str, String)>,
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Target")
            .field("name", &self.name)
            .field("cluster", &self.cluster)
            .field("provider", &self.provider)
            .field("model", &self.model)
            .field(
                "credential",
                &self.credential.as_ref().map(|(h, _)| (h, "<redacted>")),
            )
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
pub enum Choice {
    One(usize),
    /// Targets with cumulative weights, and what keeps the choice.
    Split {
        targets: Vec<(usize, u64)>,
        total: u64,
        sticky: Sticky,
    },
}

#[derive(Debug)]
pub struct Rule {
    pub name: String,
    pub when: Match,
    pub choice: Choice,
}

#[derive(Debug, Default)]
pub struct Match {
    pub model: Vec<Pattern>,
    pub provider: Vec<String>,
    pub consumer: Vec<Pattern>,
    pub headers: Vec<(String, Pattern)>,
    pub api: Vec<crate::wire::api::Operation>,
    pub min_prompt_tokens: Option<u64>,
    pub max_prompt_tokens: Option<u64>,
    pub tools: Option<bool>,
    pub images: Option<bool>,
    pub stream: Option<bool>,
    pub last_user_message: Option<regex::Regex>,
}

impl Match {
    /// Whether matching needs the body's shape (messages, tools, images).
    pub fn needs_shape(&self) -> bool {
        self.tools.is_some() || self.images.is_some() || self.last_user_message.is_some()
    }
}

#[derive(Debug)]
pub struct Tier {
    pub name: String,
    pub max_score: Option<u32>,
    pub target: usize,
}

#[derive(Debug)]
pub struct Auto {
    pub model: String,
    pub tiers: Vec<Tier>,
    pub score: ScoreConfig,
}

pub const DEFAULT_TARGET_HEADER: &str = "x-aigw-target";
pub const DEFAULT_AUTO_MODEL: &str = "auto";

/// Compiles everything but the VM-wide state.
pub struct Compiled {
    pub target_header: String,
    pub consumer_header: String,
    pub model_header: Option<String>,
    pub targets: Vec<Target>,
    pub aliases: BTreeMap<String, usize>,
    pub rules: Vec<Rule>,
    pub auto: Option<Auto>,
    pub default_target: Option<usize>,
    pub missing_model_target: Option<usize>,
    pub non_json: NonJson,
    pub max_tokens: Vec<(Pattern, u64)>,
    pub over_max_tokens: OverMax,
    pub map_response_model: bool,
    pub max_request_body_bytes: usize,
    pub hold_request_headers: bool,
    pub metrics_flush_ms: u64,
}

fn err(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::new(field, reason)
}

fn lookup(names: &BTreeMap<String, usize>, field: &str, name: &str) -> Result<usize, ConfigError> {
    names
        .get(name)
        .copied()
        .ok_or_else(|| err(field, format!("no target named {name:?} in targets")))
}

fn non_empty(field: &str, v: &str, max: usize) -> Result<(), ConfigError> {
    if v.is_empty() || v.len() > max {
        return Err(err(field, format!("must be 1 to {max} characters")));
    }
    if v.chars().any(char::is_control) {
        return Err(err(field, "must not contain control characters"));
    }
    Ok(())
}

fn target(name: &str, t: TargetConfig) -> Result<Target, ConfigError> {
    let at = |f: &str| format!("targets.{name}.{f}");
    let provider = t.provider.unwrap_or_default();
    let cluster = t.cluster.unwrap_or_else(|| name.to_string());
    non_empty(&at("cluster"), &cluster, 128)?;
    for (f, v) in [
        ("model", &t.model),
        ("deployment", &t.deployment),
        ("api_version", &t.api_version),
        ("authority", &t.authority),
    ] {
        if let Some(v) = v {
            non_empty(&at(f), v, 256)?;
            if v.contains(['/', '?', '#', ' ']) && f != "model" {
                return Err(err(
                    at(f),
                    format!("{v:?} may not contain '/', '?', '#' or spaces"),
                ));
            }
        }
    }
    if let Some(p) = &t.path {
        non_empty(&at("path"), p, 1024)?;
        if !p.starts_with('/') || p.contains(' ') {
            return Err(err(
                at("path"),
                format!("{p:?} must start with '/' and have no spaces"),
            ));
        }
    }
    if provider == ProviderKind::Azure && t.api_version.is_none() && t.path.is_none() {
        return Err(err(
            at("api_version"),
            "an azure target needs its api-version (for example \"2024-10-21\")",
        ));
    }
    if provider != ProviderKind::Azure && (t.deployment.is_some() || t.api_version.is_some()) {
        return Err(err(
            at("provider"),
            "deployment and api_version apply to azure targets only",
        ));
    }
    let credential = match t.api_key {
        Some(key) => {
            if key.is_empty() || key.bytes().any(|b| b.is_ascii_control() || b == b' ') {
                // The key itself is never repeated in an error.
                return Err(err(
                    at("api_key"),
                    "must be non-empty, without spaces or control characters",
                ));
            }
            let header = t.api_key_header.unwrap_or(provider.key_header());
            let value = match header {
                KeyHeader::Authorization => format!("Bearer {key}"),
                _ => key,
            };
            Some((header.name(), value))
        }
        None => {
            if t.api_key_header.is_some() {
                return Err(err(at("api_key_header"), "set without api_key"));
            }
            None
        }
    };
    Ok(Target {
        name: name.to_string(),
        cluster,
        provider,
        provider_named: t.provider.is_some(),
        model: t.model,
        deployment: t.deployment,
        api_version: t.api_version,
        path: t.path,
        authority: t.authority,
        credential,
    })
}

fn operation(field: &str, name: &str) -> Result<crate::wire::api::Operation, ConfigError> {
    use crate::wire::api::Operation::*;
    Ok(match name {
        "chat" => Chat,
        "completions" => Completions,
        "responses" => Responses,
        "embeddings" => Embeddings,
        "messages" => Messages,
        other => {
            return Err(err(
                field,
                format!(
                    "{other:?} is not one of chat, completions, responses, embeddings, messages"
                ),
            ))
        }
    })
}

fn matcher(field: &str, m: MatchConfig) -> Result<Match, ConfigError> {
    let at = |f: &str| format!("{field}.{f}");
    let patterns = |f: &str, v: Vec<String>| -> Result<Vec<Pattern>, ConfigError> {
        v.iter().map(|p| Pattern::compile(&at(f), p)).collect()
    };
    let mut headers = Vec::new();
    for (name, value) in m.headers {
        let name = config::header_name(&at("headers"), &name)?;
        let p = Pattern::compile(&at(&format!("headers.{name}")), &value)?;
        headers.push((name, p));
    }
    let api = m
        .api
        .iter()
        .map(|a| operation(&at("api"), a))
        .collect::<Result<Vec<_>, _>>()?;
    if let (Some(lo), Some(hi)) = (m.min_prompt_tokens, m.max_prompt_tokens) {
        if lo > hi {
            return Err(err(
                at("min_prompt_tokens"),
                format!("{lo} is above max_prompt_tokens {hi}"),
            ));
        }
    }
    let last_user_message = match m.last_user_message {
        Some(re) => Some(
            regex::RegexBuilder::new(&re)
                .size_limit(1 << 20)
                .build()
                .map_err(|e| err(at("last_user_message"), format!("not a valid regex: {e}")))?,
        ),
        None => None,
    };
    for p in &m.provider {
        non_empty(&at("provider"), p, 64)?;
    }
    Ok(Match {
        model: patterns("model", m.model)?,
        provider: m.provider,
        consumer: patterns("consumer", m.consumer)?,
        headers,
        api,
        min_prompt_tokens: m.min_prompt_tokens,
        max_prompt_tokens: m.max_prompt_tokens,
        tools: m.tools,
        images: m.images,
        stream: m.stream,
        last_user_message,
    })
}

fn rule(i: usize, r: RuleConfig, names: &BTreeMap<String, usize>) -> Result<Rule, ConfigError> {
    let field = format!("rules[{i}]");
    let name = r.name.unwrap_or_else(|| format!("rule-{i}"));
    non_empty(&format!("{field}.name"), &name, 64)?;
    let when = matcher(&format!("{field}.match"), r.matches)?;
    let choice = match (r.target, r.split.is_empty()) {
        (Some(t), true) => {
            if r.sticky.is_some() {
                return Err(err(format!("{field}.sticky"), "applies to a split only"));
            }
            Choice::One(lookup(names, &format!("{field}.target"), &t)?)
        }
        (None, false) => {
            let mut targets = Vec::new();
            let mut total = 0u64;
            for (j, s) in r.split.iter().enumerate() {
                let t = lookup(names, &format!("{field}.split[{j}].target"), &s.target)?;
                if s.weight == 0 {
                    continue;
                }
                total += u64::from(s.weight);
                targets.push((t, total));
            }
            if total == 0 {
                return Err(err(format!("{field}.split"), "needs a weight above 0"));
            }
            Choice::Split {
                targets,
                total,
                sticky: r.sticky.unwrap_or_default(),
            }
        }
        (Some(_), false) => {
            return Err(err(field, "has both target and split; give one"));
        }
        (None, true) => return Err(err(field, "needs a target or a split")),
    };
    Ok(Rule { name, when, choice })
}

fn auto(a: AutoConfig, names: &BTreeMap<String, usize>) -> Result<Auto, ConfigError> {
    let model = a.model.unwrap_or_else(|| DEFAULT_AUTO_MODEL.to_string());
    non_empty("auto.model", &model, 256)?;
    if a.tiers.is_empty() {
        return Err(err("auto.tiers", "needs at least one tier"));
    }
    let n = a.tiers.len();
    let mut tiers = Vec::new();
    let mut last: Option<u32> = None;
    for (i, t) in a.tiers.into_iter().enumerate() {
        let field = format!("auto.tiers[{i}]");
        non_empty(&format!("{field}.name"), &t.name, 32)?;
        match (t.max_score, i + 1 == n) {
            (Some(_), true) => {
                return Err(err(
                    format!("{field}.max_score"),
                    "the last tier takes every score above the others: leave max_score out",
                ))
            }
            (None, false) => {
                return Err(err(
                    format!("{field}.max_score"),
                    "needed on every tier but the last",
                ))
            }
            (Some(s), false) => {
                if last.is_some_and(|l| s <= l) {
                    return Err(err(
                        format!("{field}.max_score"),
                        "tiers go in ascending order of max_score",
                    ));
                }
                last = Some(s);
            }
            (None, true) => {}
        }
        let target = lookup(names, &format!("{field}.target"), &t.target)?;
        tiers.push(Tier {
            name: t.name,
            max_score: t.max_score,
            target,
        });
    }
    let score = ScoreConfig::compile(a.weights, a.reasoning_cues)?;
    Ok(Auto {
        model,
        tiers,
        score,
    })
}

pub fn compile(c: RouterConfig) -> Result<Compiled, ConfigError> {
    let target_header = config::header_name(
        "target_header",
        c.target_header.as_deref().unwrap_or(DEFAULT_TARGET_HEADER),
    )?;
    let consumer_header = config::header_name(
        "consumer_header",
        c.consumer_header
            .as_deref()
            .unwrap_or(crate::meter::DEFAULT_CONSUMER_HEADER),
    )?;
    let model_header = c
        .model_header
        .as_deref()
        .map(|h| config::header_name("model_header", h))
        .transpose()?;
    if c.targets.is_empty() {
        return Err(err("targets", "needs at least one target"));
    }
    let mut names = BTreeMap::new();
    let mut targets = Vec::new();
    for (name, t) in c.targets {
        non_empty("targets", &name, 64)?;
        names.insert(name.clone(), targets.len());
        targets.push(target(&name, t)?);
    }
    let mut aliases = BTreeMap::new();
    for (alias, t) in &c.aliases {
        non_empty("aliases", alias, 256)?;
        aliases.insert(
            alias.clone(),
            lookup(&names, &format!("aliases.{alias}"), t)?,
        );
    }
    let rules = c
        .rules
        .into_iter()
        .enumerate()
        .map(|(i, r)| rule(i, r, &names))
        .collect::<Result<Vec<_>, _>>()?;
    let auto = c.auto.map(|a| auto(a, &names)).transpose()?;
    if let Some(a) = &auto {
        if aliases.contains_key(&a.model) {
            return Err(err(
                format!("aliases.{}", a.model),
                "is the auto model's name too",
            ));
        }
    }
    let default_target = c
        .default_target
        .as_deref()
        .map(|t| lookup(&names, "default_target", t))
        .transpose()?;
    let missing_model_target = c
        .missing_model_target
        .as_deref()
        .map(|t| lookup(&names, "missing_model_target", t))
        .transpose()?;
    let mut max_tokens = Vec::new();
    for (model, cap) in c.max_tokens {
        let field = format!("max_tokens.{model}");
        if cap == 0 {
            return Err(err(field, "must be at least 1"));
        }
        max_tokens.push((Pattern::compile(&field, &model)?, cap));
    }
    // Exact names first, so `gpt-4o` is not capped by a broader `gpt-4o*`.
    max_tokens.sort_by_key(|(p, _)| !matches!(p, Pattern::Exact(_)));
    let max_request_body_bytes = c.max_request_body_bytes.unwrap_or(8 << 20);
    if !(1024..=(64 << 20)).contains(&max_request_body_bytes) {
        return Err(err(
            "max_request_body_bytes",
            format!("{max_request_body_bytes} is outside 1024..=67108864"),
        ));
    }
    Ok(Compiled {
        target_header,
        consumer_header,
        model_header,
        targets,
        aliases,
        rules,
        auto,
        default_target,
        missing_model_target,
        non_json: c.non_json.unwrap_or_default(),
        max_tokens,
        over_max_tokens: c.over_max_tokens.unwrap_or_default(),
        map_response_model: c.map_response_model.unwrap_or(false),
        max_request_body_bytes,
        hold_request_headers: c.hold_request_headers.unwrap_or(true),
        metrics_flush_ms: crate::metrics::flush_ms(c.metrics_flush_ms)?,
    })
}
