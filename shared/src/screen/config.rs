//! The content-screen configuration as written, and its compiled form.

use super::detect::{Action, Allow, Detector, Kind, Scanner, PII, SECRETS};
use super::inject::Injection;
use super::moderation::{Moderation, ModerationConfig};
use crate::config::{self, ConfigError};
use regex::escape;
use serde::Deserialize;
use std::collections::BTreeMap;

/// An action as written: the three actions, or `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionConfig {
    Block,
    Redact,
    Log,
    Off,
}

impl ActionConfig {
    fn action(self) -> Option<Action> {
        match self {
            ActionConfig::Block => Some(Action::Block),
            ActionConfig::Redact => Some(Action::Redact),
            ActionConfig::Log => Some(Action::Log),
            ActionConfig::Off => None,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DetectorConfig {
    pub action: Option<ActionConfig>,
    /// Values let through: exact values, `@domain` for e-mail, `re:<regex>`.
    pub allow: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InjectionConfig {
    pub action: Option<ActionConfig>,
    pub threshold: Option<f64>,
    /// Roles scored (default user and tool: the system prompt is the operator's).
    pub roles: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DenyConfig {
    pub action: Option<ActionConfig>,
    pub terms: Vec<String>,
    pub patterns: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BudgetConfig {
    pub max_body_bytes: Option<usize>,
    pub max_messages: Option<usize>,
    pub max_prompt_tokens: Option<u64>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Redaction {
    /// `[EMAIL]`
    #[default]
    Typed,
    /// `[EMAIL_1f2e3d4c]`: the same value always gives the same token.
    Hash,
}

/// The content-screen configuration as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScreenConfig {
    /// Action of every PII detector (IP addresses only when named in `detectors`).
    pub pii: Option<ActionConfig>,
    /// Action of every secret detector.
    pub secrets: Option<ActionConfig>,
    /// Per-detector settings, by name; they override `pii` and `secrets`.
    pub detectors: BTreeMap<String, DetectorConfig>,
    pub injection: Option<InjectionConfig>,
    pub deny: Option<DenyConfig>,
    pub budget: BudgetConfig,
    /// Message roles whose text is screened (default user, system, tool).
    pub roles: Option<Vec<String>>,
    /// Screen responses too (default true).
    pub responses: Option<bool>,
    pub redaction: Redaction,
    /// Mixed into hash tokens, so that they cannot be looked up by guessing.
    pub hash_salt: Option<String>,
    /// Every action becomes `log`: see what would happen, change nothing.
    pub shadow: bool,
    /// Most bytes of a streamed answer held back while they could still
    /// start a match (default 8192).
    pub max_hold_bytes: Option<usize>,
    /// Distinct metric series per VM (default 1024).
    pub max_metric_series: Option<usize>,
    /// How often counters kept in VM memory are handed to Envoy, in ms
    /// (default 1000; 0: on every request).
    pub metrics_flush_ms: Option<u64>,
    /// Hold request headers while the body is read, so that a redaction can
    /// fix Content-Length (default true; needs Envoy's
    /// `allow_on_headers_stop_iteration`). False drops Content-Length up
    /// front and Envoy sends the body chunked: for hosts such as Istio.
    pub hold_request_headers: Option<bool>,
    /// An external moderation service asked about every prompt.
    pub moderation: Option<ModerationConfig>,
}

const ROLES: &[&str] = &["user", "system", "assistant", "tool", "developer"];

/// The compiled configuration.
#[derive(Debug)]
pub struct Compiled {
    pub scanner: Scanner,
    pub injection: Option<(Injection, Action, Vec<String>)>,
    pub roles: Vec<String>,
    pub responses: bool,
    pub redaction: Redaction,
    pub hash_salt: String,
    pub max_body_bytes: Option<usize>,
    pub max_messages: Option<usize>,
    pub max_prompt_tokens: Option<u64>,
    pub max_hold_bytes: usize,
    pub max_metric_series: usize,
    pub metrics_flush_ms: u64,
    pub hold_request_headers: bool,
    pub moderation: Option<Moderation>,
    pub shadow: bool,
}

fn roles(
    field: &str,
    v: Option<&Vec<String>>,
    default: &[&str],
) -> Result<Vec<String>, ConfigError> {
    let list: Vec<String> = match v {
        Some(v) => v.clone(),
        None => default.iter().map(|s| s.to_string()).collect(),
    };
    for (i, r) in list.iter().enumerate() {
        if !ROLES.contains(&r.as_str()) {
            return Err(ConfigError::new(
                format!("{field}[{i}]"),
                format!("unknown role {r:?} (one of {})", ROLES.join(", ")),
            ));
        }
    }
    Ok(list)
}

/// A deny term as a regex: normalised like the text, spaces matching the
/// one space a whitespace run folds to, ASCII word boundaries at ASCII word
/// edges (a term in a script without spaces matches anywhere).
fn term_pattern(term: &str) -> Option<String> {
    let n = super::text::Normalized::new(term.trim());
    let t = n.text.trim();
    if t.is_empty() {
        return None;
    }
    let word = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
    let mut p = String::new();
    if word(t.chars().next()) {
        p.push_str(r"(?-u:\b)");
    }
    p.push_str(&escape(t));
    if word(t.chars().next_back()) {
        p.push_str(r"(?-u:\b)");
    }
    Some(p)
}

impl Compiled {
    pub fn from_json(bytes: &[u8]) -> Result<Compiled, ConfigError> {
        Compiled::compile(config::parse(bytes)?)
    }

    pub fn compile(c: ScreenConfig) -> Result<Compiled, ConfigError> {
        let shadow = |a: Action| if c.shadow { Action::Log } else { a };
        for name in c.detectors.keys() {
            if Kind::from_name(name).is_none() {
                let known: Vec<&str> = PII.iter().chain(SECRETS).map(|k| k.name()).collect();
                return Err(ConfigError::new(
                    format!("detectors.{name}"),
                    format!("unknown detector (one of {})", known.join(", ")),
                ));
            }
        }
        let mut detectors = Vec::new();
        // Secrets first: a key inside an e-mail-like string is a key.
        for &kind in SECRETS.iter().chain(PII) {
            let own = c.detectors.get(kind.name());
            let group = if PII.contains(&kind) {
                c.pii
            } else {
                c.secrets
            };
            let group = if kind == Kind::IpAddress { None } else { group };
            let field = format!("detectors.{}.allow", kind.name());
            let allow = Allow::compile(&field, own.map_or(&[][..], |d| &d.allow))
                .map_err(|e| ConfigError::new(field.clone(), e))?;
            let action = own
                .and_then(|d| d.action)
                .or(group)
                .and_then(ActionConfig::action);
            let Some(action) = action else { continue };
            let d = Detector::builtin(kind, shadow(action), allow)
                .map_err(|e| ConfigError::new(format!("detectors.{}", kind.name()), e))?;
            detectors.push(d);
        }
        if let Some(deny) = &c.deny {
            let mut alts = Vec::new();
            for (i, t) in deny.terms.iter().enumerate() {
                match term_pattern(t) {
                    Some(p) => alts.push(p),
                    None => {
                        return Err(ConfigError::new(
                            format!("deny.terms[{i}]"),
                            "an empty term would match everywhere",
                        ))
                    }
                }
            }
            for (i, p) in deny.patterns.iter().enumerate() {
                if let Err(e) = regex::Regex::new(p) {
                    return Err(ConfigError::new(
                        format!("deny.patterns[{i}]"),
                        format!("bad regex: {e}"),
                    ));
                }
                if regex::Regex::new(p).is_ok_and(|r| r.is_match("")) {
                    return Err(ConfigError::new(
                        format!("deny.patterns[{i}]"),
                        "the pattern matches the empty string",
                    ));
                }
                alts.push(format!("(?:{p})"));
            }
            let action = deny.action.unwrap_or(ActionConfig::Block).action();
            if let (Some(action), false) = (action, alts.is_empty()) {
                let pattern = format!("(?i){}", alts.join("|"));
                let d = Detector::new(Kind::DenyList, shadow(action), &pattern, Allow::default())
                    .map_err(|e| ConfigError::new("deny", e))?;
                // The deny list is the operator's own word: it goes first.
                detectors.insert(0, d);
            }
        }
        let injection = match &c.injection {
            None => None,
            Some(i) => {
                let threshold = i.threshold.unwrap_or(1.0);
                if !(threshold.is_finite() && threshold > 0.0) {
                    return Err(ConfigError::new(
                        "injection.threshold",
                        format!("{threshold} is not a positive number"),
                    ));
                }
                let action = i.action.unwrap_or(ActionConfig::Block).action();
                match action {
                    None => None,
                    Some(a) => Some((
                        Injection::new(threshold).map_err(|e| ConfigError::new("injection", e))?,
                        shadow(a),
                        roles("injection.roles", i.roles.as_ref(), &["user", "tool"])?,
                    )),
                }
            }
        };
        let b = &c.budget;
        if b.max_body_bytes == Some(0) {
            return Err(ConfigError::new(
                "budget.max_body_bytes",
                "must be at least 1",
            ));
        }
        if let Some(n) = b.max_body_bytes {
            if n > 64 << 20 {
                return Err(ConfigError::new(
                    "budget.max_body_bytes",
                    format!("{n} is above 67108864"),
                ));
            }
        }
        if b.max_messages == Some(0) {
            return Err(ConfigError::new(
                "budget.max_messages",
                "must be at least 1",
            ));
        }
        if b.max_prompt_tokens == Some(0) {
            return Err(ConfigError::new(
                "budget.max_prompt_tokens",
                "must be at least 1",
            ));
        }
        let max_hold_bytes = c.max_hold_bytes.unwrap_or(8192);
        if !(64..=(1 << 20)).contains(&max_hold_bytes) {
            return Err(ConfigError::new(
                "max_hold_bytes",
                format!("{max_hold_bytes} is outside 64..=1048576"),
            ));
        }
        let max_metric_series = c.max_metric_series.unwrap_or(1024);
        if max_metric_series == 0 {
            return Err(ConfigError::new("max_metric_series", "must be at least 1"));
        }
        if c.redaction == Redaction::Typed && c.hash_salt.is_some() {
            return Err(ConfigError::new(
                "hash_salt",
                "only used with \"redaction\": \"hash\"",
            ));
        }
        Ok(Compiled {
            scanner: Scanner::new(detectors),
            injection,
            roles: roles("roles", c.roles.as_ref(), &["user", "system", "tool"])?,
            responses: c.responses.unwrap_or(true),
            redaction: c.redaction,
            hash_salt: c.hash_salt.unwrap_or_default(),
            max_body_bytes: b.max_body_bytes,
            max_messages: b.max_messages,
            max_prompt_tokens: b.max_prompt_tokens,
            max_hold_bytes,
            max_metric_series,
            metrics_flush_ms: crate::metrics::flush_ms(c.metrics_flush_ms)?,
            hold_request_headers: c.hold_request_headers.unwrap_or(true),
            shadow: c.shadow,
            moderation: c.moderation.map(Moderation::compile).transpose()?,
        })
    }
}
