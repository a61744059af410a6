//! Who is calling: the consumer, resolved once per request.
//!
//! Every filter keys something on the caller (limits, cache scope, routing
//! rules, the access log), so the answer is computed once, by the first filter
//! that needs it, and published as the `aigw.consumer` fact; a filter that
//! finds the fact already there uses it (one writer per fact).
//!
//! The sources, tried in this order, are the ones a platform team already
//! has: an API key (`Authorization: Bearer …`, `api-key`, `x-api-key`) looked
//! up in a table of SHA-256 digests, so the configuration never holds a
//! plaintext key; a request header that something trusted in front of Envoy
//! set (`jwt_authn`'s `claim_to_headers`, an auth service); the client
//! address. A caller none of them names gets the configured default
//! consumer, or a 401 in the OpenAI error shape.
//!
//! When the answer did not come from the consumer header itself, that header
//! is overwritten with it, so a client cannot spend another consumer's
//! budget by sending someone else's name, and the filters and upstreams
//! after this one read the same name.

use crate::config::{self, ConfigError};
use crate::facts;
use crate::presence::{Presence, Writer};
use crate::stage::{Env, Headers, Reply};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};

/// The identity configuration as written.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityConfig {
    /// SHA-256 hex digest of an API key → consumer name.
    pub api_keys: BTreeMap<String, String>,
    /// Take the consumer from this request header (a trusted one).
    pub header: Option<String>,
    /// Take the consumer from the client's address (no port).
    pub client_address: bool,
    /// The consumer of callers no source names; without it they get a 401.
    pub default_consumer: Option<String>,
    /// The header that carries the resolved consumer on (default
    /// `x-aigw-consumer`); whatever the client sent in it is overwritten.
    pub consumer_header: Option<String>,
    /// Group name → its consumers, for rules that match a group.
    pub groups: BTreeMap<String, Vec<String>>,
}

/// Where the consumer came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Another filter had already published it.
    Fact,
    ApiKey,
    Header,
    ClientAddress,
    Default,
}

/// The compiled identity rules.
#[derive(Debug, Clone)]
pub struct Identity {
    keys: HashMap<[u8; 32], String>,
    header: Option<String>,
    client_address: bool,
    default_consumer: Option<String>,
    consumer_header: String,
    groups: BTreeMap<String, Vec<String>>,
    /// Whether a filter before this one names the consumer (in DESIGN
    /// order none does: reading the fact anyway costs a host call a request).
    above: Presence,
}

pub const DEFAULT_CONSUMER_HEADER: &str = "x-aigw-consumer";
/// Longest consumer name taken from a request.
pub const MAX_CONSUMER: usize = 256;

/// The SHA-256 digest of an API key, as the configuration holds it (lower-case hex).
pub fn key_digest(key: &str) -> String {
    hex(&Sha256::digest(key.trim().as_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn consumer_name(field: &str, name: &str) -> Result<String, ConfigError> {
    if name.is_empty() || name.len() > MAX_CONSUMER || name.chars().any(char::is_control) {
        return Err(ConfigError::new(
            field,
            format!("{name:?} is not a consumer name (1 to {MAX_CONSUMER} printable characters)"),
        ));
    }
    Ok(name.to_string())
}

impl Identity {
    pub fn compile(c: IdentityConfig, field: &str) -> Result<Identity, ConfigError> {
        let mut keys = HashMap::new();
        for (digest, consumer) in &c.api_keys {
            let f = format!("{field}.api_keys.{digest}");
            let d = unhex(&digest.to_ascii_lowercase()).ok_or_else(|| {
                ConfigError::new(
                    &f,
                    "not a SHA-256 hex digest (64 hex digits; print one with `aigw-key-digest <key>`)",
                )
            })?;
            keys.insert(d, consumer_name(&f, consumer)?);
        }
        let header = c
            .header
            .as_deref()
            .map(|h| config::header_name(&format!("{field}.header"), h))
            .transpose()?;
        let consumer_header = config::header_name(
            &format!("{field}.consumer_header"),
            c.consumer_header
                .as_deref()
                .or(header.as_deref())
                .unwrap_or(DEFAULT_CONSUMER_HEADER),
        )?;
        let default_consumer = c
            .default_consumer
            .as_deref()
            .map(|d| consumer_name(&format!("{field}.default_consumer"), d))
            .transpose()?;
        // No source at all: the consumer header is the client's word, as the
        // meter reads it (a gateway behind an auth proxy that sets it).
        let header = if keys.is_empty() && header.is_none() && !c.client_address {
            Some(consumer_header.clone())
        } else {
            header
        };
        for (group, members) in &c.groups {
            let f = format!("{field}.groups.{group}");
            if members.is_empty() {
                return Err(ConfigError::new(&f, "a group needs at least one consumer"));
            }
            for m in members {
                consumer_name(&f, m)?;
            }
        }
        Ok(Identity {
            keys,
            header,
            client_address: c.client_address,
            default_consumer,
            consumer_header,
            groups: c.groups,
            above: Presence::default(),
        })
    }

    /// Whether a consumer of this name can ever be resolved (for rules that
    /// name one): with only a key table and no other source, only its names
    /// and the default can.
    pub fn can_resolve(&self, consumer: &str) -> bool {
        self.header.is_some()
            || self.client_address
            || self.default_consumer.as_deref() == Some(consumer)
            || self.keys.values().any(|c| c == consumer)
    }

    pub fn has_group(&self, group: &str) -> bool {
        self.groups.contains_key(group)
    }

    pub fn in_group(&self, consumer: &str, group: &str) -> bool {
        self.groups
            .get(group)
            .is_some_and(|m| m.iter().any(|c| c == consumer))
    }

    /// The consumer of this request, published as the `aigw.consumer` fact;
    /// or the 401 to answer with.
    pub fn resolve(
        &self,
        env: &mut Env<'_>,
        headers: &mut Headers,
    ) -> Result<(String, Source), Reply> {
        let probing = self.above.begin();
        let published = self.above.look(Writer::Identity, probing, || {
            facts::text(env.state, facts::CONSUMER)
        });
        if let Some(c) = published {
            return Ok((c, Source::Fact));
        }
        let (consumer, source) = self.lookup(env, headers)?;
        if source != Source::Header || self.header.as_deref() != Some(&self.consumer_header) {
            headers.set(&self.consumer_header, consumer.clone());
        }
        env.state.set(facts::CONSUMER, consumer.as_bytes());
        Ok((consumer, source))
    }

    fn lookup(&self, env: &Env<'_>, headers: &Headers) -> Result<(String, Source), Reply> {
        let mut presented_key = false;
        if !self.keys.is_empty() {
            if let Some(key) = api_key(headers) {
                presented_key = true;
                let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
                if let Some(c) = self.keys.get(&digest) {
                    return Ok((c.clone(), Source::ApiKey));
                }
            }
        }
        if let Some(h) = &self.header {
            if let Some(v) = headers.get(h).map(str::trim).filter(|v| !v.is_empty()) {
                return Ok((v.chars().take(MAX_CONSUMER).collect(), Source::Header));
            }
        }
        if self.client_address {
            if let Some(a) = env.state.attribute(&["source", "address"]) {
                if let Some(ip) = strip_port(&String::from_utf8_lossy(&a)) {
                    return Ok((ip, Source::ClientAddress));
                }
            }
        }
        if let Some(d) = &self.default_consumer {
            return Ok((d.clone(), Source::Default));
        }
        let message = if presented_key {
            "Incorrect API key provided."
        } else {
            "No API key provided (Authorization: Bearer <key>)."
        };
        Err(Reply::error(
            401,
            "invalid_request_error",
            "invalid_api_key",
            message,
        ))
    }
}

/// The API key a client presented, from the headers OpenAI, Azure and
/// Anthropic clients send it in.
fn api_key(headers: &Headers) -> Option<&str> {
    let bearer = headers.get("authorization").and_then(|v| {
        let v = v.trim();
        let (scheme, rest) = v.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
    });
    bearer
        .or_else(|| headers.get("api-key").map(str::trim))
        .or_else(|| headers.get("x-api-key").map(str::trim))
        .filter(|k| !k.is_empty())
}

/// `10.0.0.1:5000` → `10.0.0.1`, `[::1]:5000` → `::1`; a bare address as it is.
fn strip_port(addr: &str) -> Option<String> {
    let addr = addr.trim();
    if addr.is_empty() {
        return None;
    }
    if let Some(rest) = addr.strip_prefix('[') {
        return rest.split_once(']').map(|(ip, _)| ip.to_string());
    }
    match addr.matches(':').count() {
        1 => addr.split_once(':').map(|(ip, _)| ip.to_string()),
        _ => Some(addr.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boundary::{FakeCallouts, FakeClock, FakeFilterState, FakeMetrics, FakeSharedData};

    fn identity(json: &str) -> Identity {
        let c: IdentityConfig = config::parse(json.as_bytes()).unwrap();
        Identity::compile(c, "identity").unwrap()
    }

    fn resolve(
        id: &Identity,
        state: &mut FakeFilterState,
        headers: &[(&str, &str)],
    ) -> (Result<(String, Source), Reply>, Headers) {
        let mut h = Headers::new(
            headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        let clock = FakeClock::at(0);
        let mut env = Env {
            clock: &clock,
            state,
            metrics: &mut FakeMetrics::default(),
            shared: &mut FakeSharedData::default(),
            callouts: &mut FakeCallouts::default(),
        };
        let r = id.resolve(&mut env, &mut h);
        (r, h)
    }

    #[test]
    fn digests_are_sha256_hex() {
        assert_eq!(key_digest("sk-alice"), hex(&Sha256::digest(b"sk-alice")),);
        assert_eq!(
            key_digest("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    #[allow(clippy::type_complexity)] // a table of cases reads best inline
    fn consumers_resolve_from_each_source_in_order() {
        let alice = key_digest("sk-alice");
        let keys = format!(r#""api_keys": {{"{alice}": "alice"}}"#);
        let cases: Vec<(
            String,
            Vec<(&str, &str)>,
            Option<&str>,
            Result<(&str, Source), u16>,
        )> = vec![
            (
                format!("{{{keys}}}"),
                vec![("authorization", "Bearer sk-alice")],
                None,
                Ok(("alice", Source::ApiKey)),
            ),
            (
                format!("{{{keys}}}"),
                vec![("api-key", "sk-alice")],
                None,
                Ok(("alice", Source::ApiKey)),
            ),
            (
                format!("{{{keys}}}"),
                vec![("x-api-key", " sk-alice ")],
                None,
                Ok(("alice", Source::ApiKey)),
            ),
            (
                format!("{{{keys}}}"),
                vec![("authorization", "Bearer sk-mallory")],
                None,
                Err(401),
            ),
            (
                format!("{{{keys}}}"),
                vec![("x-aigw-consumer", "alice")],
                None,
                Err(401),
            ),
            (
                format!(r#"{{{keys}, "default_consumer": "guest"}}"#),
                vec![("x-aigw-consumer", "alice")],
                None,
                Ok(("guest", Source::Default)),
            ),
            (
                format!(r#"{{{keys}, "header": "x-team"}}"#),
                vec![("x-team", "blue")],
                None,
                Ok(("blue", Source::Header)),
            ),
            (
                format!(r#"{{{keys}, "header": "x-team"}}"#),
                vec![("x-team", "blue"), ("api-key", "sk-alice")],
                None,
                Ok(("alice", Source::ApiKey)),
            ),
            (
                "{}".into(),
                vec![("x-aigw-consumer", "bob")],
                None,
                Ok(("bob", Source::Header)),
            ),
            ("{}".into(), vec![], None, Err(401)),
            (
                r#"{"client_address": true}"#.into(),
                vec![("x-aigw-consumer", "bob")],
                Some("10.1.2.3:5555"),
                Ok(("10.1.2.3", Source::ClientAddress)),
            ),
            (
                r#"{"client_address": true}"#.into(),
                vec![],
                Some("[::1]:5555"),
                Ok(("::1", Source::ClientAddress)),
            ),
            (
                r#"{"client_address": true, "default_consumer": "x"}"#.into(),
                vec![],
                None,
                Ok(("x", Source::Default)),
            ),
        ];
        for (json, headers, addr, want) in cases {
            let id = identity(&json);
            let mut state = FakeFilterState::default();
            if let Some(a) = addr {
                state = state.with_attribute("source.address", a.as_bytes());
            }
            let (got, h) = resolve(&id, &mut state, &headers);
            match (got, want) {
                (Ok((c, s)), Ok((wc, ws))) => {
                    assert_eq!((c.as_str(), s), (wc, ws), "{json} {headers:?}");
                    assert_eq!(state.text(facts::CONSUMER), Some(wc), "{json}");
                    assert_eq!(
                        h.get("x-aigw-consumer").or(h.get("x-team")),
                        Some(wc),
                        "{json}"
                    );
                }
                (Err(r), Err(status)) => {
                    assert_eq!(r.status, status, "{json} {headers:?}");
                    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
                    assert_eq!(v["error"]["code"], "invalid_api_key");
                    assert_eq!(state.text(facts::CONSUMER), None);
                }
                (got, want) => panic!("{json} {headers:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn a_spoofed_consumer_header_is_overwritten_by_the_key() {
        let id = identity(&format!(
            r#"{{"api_keys": {{"{}": "alice"}}}}"#,
            key_digest("k1")
        ));
        let mut state = FakeFilterState::default();
        let (r, h) = resolve(
            &id,
            &mut state,
            &[("x-aigw-consumer", "bob"), ("authorization", "Bearer k1")],
        );
        assert_eq!(r.unwrap().0, "alice");
        assert_eq!(h.get("x-aigw-consumer"), Some("alice"));
    }

    #[test]
    fn a_published_consumer_is_used_not_rewritten() {
        let id = identity("{}");
        let mut state = FakeFilterState::default().with(facts::CONSUMER, "carol");
        let (r, h) = resolve(&id, &mut state, &[("x-aigw-consumer", "bob")]);
        assert_eq!(r.unwrap(), ("carol".to_string(), Source::Fact));
        assert!(state.refused.is_empty());
        assert!(h.edits().is_empty());
    }

    #[test]
    fn a_consumer_published_after_learning_is_found_by_a_probe() {
        use crate::presence::{LEARN, PROBE_EVERY};
        let id = identity(r#"{"header": "x-aigw-consumer"}"#);
        for _ in 0..LEARN {
            let (r, _) = resolve(
                &id,
                &mut FakeFilterState::default(),
                &[("x-aigw-consumer", "bob")],
            );
            assert_eq!(r.unwrap().1, Source::Header);
        }
        // A filter that names the consumer is added before this one: within
        // one probe interval its word is taken, and from then on always.
        let published = || FakeFilterState::default().with(facts::CONSUMER, "carol");
        let found = (0..PROBE_EVERY).position(|_| {
            resolve(&id, &mut published(), &[])
                .0
                .is_ok_and(|r| r.1 == Source::Fact)
        });
        assert!(found.is_some(), "not found within {PROBE_EVERY} requests");
        for _ in 0..3 * PROBE_EVERY {
            let (r, _) = resolve(&id, &mut published(), &[]);
            assert_eq!(r.unwrap(), ("carol".to_string(), Source::Fact));
        }
    }

    #[test]
    fn bad_identity_config_names_the_field() {
        let cases = [
            (r#"{"api_keys": {"abc": "alice"}}"#, "identity.api_keys.abc"),
            (
                &*format!(r#"{{"api_keys": {{"{}": ""}}}}"#, key_digest("k")),
                "identity.api_keys.",
            ),
            (r#"{"header": "X-Team"}"#, "identity.header"),
            (r#"{"groups": {"g": []}}"#, "identity.groups.g"),
            (r#"{"default_consumer": ""}"#, "identity.default_consumer"),
        ];
        for (json, field) in cases {
            let c: IdentityConfig = config::parse(json.as_bytes()).unwrap();
            let e = Identity::compile(c, "identity").unwrap_err();
            assert!(e.field.starts_with(field), "{json}: {e}");
        }
    }

    #[test]
    fn ports_are_stripped() {
        for (a, want) in [
            ("1.2.3.4:80", Some("1.2.3.4")),
            ("[fe80::1]:80", Some("fe80::1")),
            ("fe80::1", Some("fe80::1")),
            ("1.2.3.4", Some("1.2.3.4")),
            ("", None),
        ] {
            assert_eq!(strip_port(a).as_deref(), want, "{a}");
        }
    }
}
