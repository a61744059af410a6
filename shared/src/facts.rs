//! The per-request facts the filters share, and how each is stored.
//!
//! The five filters are separate wasm modules, so what one learns about a
//! request reaches the others through Envoy filter state: a filter calls
//! `set_property(["aigw.consumer"], ..)` and Envoy keeps it as
//! `wasm.aigw.consumer` for the rest of the request, readable by every other
//! filter and by the access log (`%FILTER_STATE(wasm.aigw.consumer:PLAIN)%`).
//! This module is the one list of those keys and their encodings; a fact is
//! computed once, by the first filter that needs it, and read after that.
//! Each read or write is a host call that Envoy answers through its attribute
//! machinery (about 12,000 instructions), so what one filter decides at one
//! time is one fact, however many fields it has. In the bundle, facts stay
//! in VM memory, and a JSON fact is kept as its value: the stage that reads
//! it gets the value back without parsing ([`FilterState::keep`]).
//!
//! | key | encoding | written by |
//! |---|---|---|
//! | `aigw.consumer` | UTF-8 id | the first filter that identifies the caller |
//! | `aigw.request` | JSON [`RequestFacts`] | the first filter that parses the request body |
//! | `aigw.model_requested` | UTF-8 | with `aigw.request` |
//! | `aigw.route` | JSON [`Route`]: target, reason, model, provider, tier, score, model_requested | model-router |
//! | `aigw.model_response` | UTF-8, the model the upstream answered with, when model-router maps it back to the client's name | model-router |
//! | `aigw.usage` | JSON [`Usage`] | token-meter |
//! | `aigw.cache` | `hit` `miss` `bypass` `stale` `off` | prompt-cache |
//! | `aigw.ratelimit` | `allow` `deny` `shadow_deny` `off` | rate-limit |
//! | `aigw.screen` | `pass` `redact` `block` `off` | content-screen |
//! | `aigw.access_log` | one JSON line | token-meter, in its log phase |

use crate::boundary::FilterState;
use crate::wire::request::RequestFacts;
use crate::wire::usage::Usage;

pub const CONSUMER: &str = "aigw.consumer";
pub const REQUEST: &str = "aigw.request";
pub const MODEL_REQUESTED: &str = "aigw.model_requested";
pub const ROUTE: &str = "aigw.route";
pub const MODEL_RESPONSE: &str = "aigw.model_response";
pub const USAGE: &str = "aigw.usage";
pub const CACHE: &str = "aigw.cache";
pub const RATELIMIT: &str = "aigw.ratelimit";
pub const SCREEN: &str = "aigw.screen";
pub const ACCESS_LOG: &str = "aigw.access_log";

/// Outcome values each filter may publish; anything else read back is ignored.
pub const CACHE_OUTCOMES: &[&str] = &["hit", "miss", "bypass", "stale", "off"];
pub const RATELIMIT_OUTCOMES: &[&str] = &["allow", "deny", "shadow_deny", "off"];
pub const SCREEN_OUTCOMES: &[&str] = &["pass", "redact", "block", "off"];

pub fn text(state: &dyn FilterState, key: &str) -> Option<String> {
    let v = state.get(key)?;
    if v.is_empty() {
        return None;
    }
    String::from_utf8(v).ok()
}

/// An outcome fact, if it holds one of the allowed values.
pub fn outcome(
    state: &dyn FilterState,
    key: &str,
    allowed: &'static [&'static str],
) -> Option<&'static str> {
    let v = state.get(key)?;
    allowed
        .iter()
        .find(|o| o.as_bytes() == v.as_slice())
        .copied()
}

/// Writes a JSON fact: kept as the value where facts stay in VM memory
/// (the bundle, where the next reader then parses nothing), else as bytes.
fn put_json<T: serde::Serialize + Clone + 'static>(state: &mut dyn FilterState, key: &str, v: &T) {
    if state.keeps_values() && state.keep(key, Box::new(v.clone())) {
        return;
    }
    put_bytes(state, key, v);
}

/// [`put_json`] for a value the writer is done with: kept without a copy.
fn put_owned<T: serde::Serialize + 'static>(state: &mut dyn FilterState, key: &str, v: T) {
    if state.keeps_values() {
        // Where facts stay in memory, keeping them is all there is to do.
        let _ = state.keep(key, Box::new(v));
        return;
    }
    put_bytes(state, key, &v);
}

fn put_bytes<T: serde::Serialize>(state: &mut dyn FilterState, key: &str, v: &T) {
    if let Ok(bytes) = serde_json::to_vec(v) {
        state.set(key, &bytes);
    }
}

/// Reads a JSON fact, from the kept value where there is one.
fn json<T: serde::de::DeserializeOwned + Clone + 'static>(
    state: &dyn FilterState,
    key: &str,
) -> Option<T> {
    if let Some(v) = state.kept(key) {
        return v.as_any().downcast_ref::<T>().cloned();
    }
    serde_json::from_slice(&state.get(key)?).ok()
}

pub fn put_request(state: &mut dyn FilterState, r: &RequestFacts) {
    put_json(state, REQUEST, r);
    if let Some(m) = &r.model {
        state.set(MODEL_REQUESTED, m.as_bytes());
    }
}

pub fn request(state: &dyn FilterState) -> Option<RequestFacts> {
    json(state, REQUEST)
}

/// What model-router decided for a request. Members it does not know
/// are left out of the JSON (a reader takes them as `None`): the fact is
/// written on every routed request, and its bytes are copied into Envoy.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Route {
    /// The target's name.
    pub target: String,
    /// What chose it: `rule:<name>`, `alias:<model>`, `auto:<tier>`,
    /// `default`, `missing_model`.
    pub reason: String,
    /// The model sent upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The target's provider, when its configuration names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// The tier of an `auto` request, and its complexity score.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<u32>,
    /// The model the client asked for, when the router read it somewhere
    /// other than the body (an Azure path, a header).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_requested: Option<String>,
}

pub fn put_route(state: &mut dyn FilterState, r: Route) {
    put_owned(state, ROUTE, r);
}

pub fn route(state: &dyn FilterState) -> Option<Route> {
    json(state, ROUTE)
}

pub fn put_usage(state: &mut dyn FilterState, u: &Usage) {
    put_json(state, USAGE, u);
}

pub fn usage(state: &dyn FilterState) -> Option<Usage> {
    json(state, USAGE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boundary::FakeFilterState;
    use crate::wire::usage::UsageSource;

    #[test]
    fn facts_round_trip() {
        let mut s = FakeFilterState::default();
        let r = RequestFacts {
            model: Some("gpt-4o".into()),
            stream: true,
            include_usage: false,
            has_stream_options: false,
            text_bytes: 42,
            output_cap: Some(256),
        };
        put_request(&mut s, &r);
        assert_eq!(request(&s), Some(r));
        assert_eq!(text(&s, MODEL_REQUESTED).as_deref(), Some("gpt-4o"));
        let u = Usage {
            input_tokens: Some(3),
            output_tokens: None,
            cached_input_tokens: Some(0),
            cache_write_input_tokens: Some(1),
            reasoning_tokens: None,
            source: UsageSource::Estimated,
        };
        let route = Route {
            target: "small".into(),
            reason: "auto:small".into(),
            model: Some("gpt-4o-mini".into()),
            tier: Some("small".into()),
            score: Some(12),
            ..Route::default()
        };
        put_route(&mut s, route.clone());
        assert_eq!(
            s.text(ROUTE),
            Some(
                r#"{"target":"small","reason":"auto:small","model":"gpt-4o-mini","tier":"small","score":12}"#
            ),
            "what the router does not know is left out"
        );
        assert_eq!(super::route(&s), Some(route));
        put_usage(&mut s, &u);
        assert_eq!(usage(&s), Some(u));
        assert_eq!(
            s.text(USAGE),
            Some(
                r#"{"input_tokens":3,"output_tokens":null,"cached_input_tokens":0,"cache_write_input_tokens":1,"reasoning_tokens":null,"source":"estimated"}"#
            )
        );
        // The JSON an older writer left, without cache_write_input_tokens, still reads.
        let old = FakeFilterState::default().with(
            USAGE,
            r#"{"input_tokens":3,"output_tokens":null,"cached_input_tokens":0,"reasoning_tokens":null,"source":"estimated"}"#,
        );
        assert_eq!(
            usage(&old),
            Some(Usage {
                cache_write_input_tokens: None,
                ..u
            })
        );
    }

    #[test]
    fn outcomes_accept_only_their_values() {
        let s = FakeFilterState::default()
            .with(CACHE, "hit")
            .with(RATELIMIT, "hit")
            .with(SCREEN, "");
        assert_eq!(outcome(&s, CACHE, CACHE_OUTCOMES), Some("hit"));
        assert_eq!(outcome(&s, RATELIMIT, RATELIMIT_OUTCOMES), None);
        assert_eq!(outcome(&s, SCREEN, SCREEN_OUTCOMES), None);
        assert_eq!(text(&s, SCREEN), None);
    }
}
