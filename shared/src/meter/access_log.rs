//! The access-log line: one JSON object per request.
//!
//! Envoy's `json_format` can only give filter-state values as strings, and an
//! unknown count must be `null`, not `"-"` or `0`. So the line is composed
//! here, typed, from the facts every filter published, and handed to Envoy as
//! one filter-state value (`wasm.aigw.access_log`) that the file logger writes
//! verbatim (`%FILTER_STATE(wasm.aigw.access_log:PLAIN)%`). The field list is
//! the interface DESIGN.md promises; fields are never dropped, only null.

use crate::wire::json_out::Object;

/// One request's line. Field order is the order written.
#[derive(Clone, Debug, Default, PartialEq)]
#[cfg_attr(test, derive(serde::Serialize))]
pub struct Line {
    pub request_id: Option<String>,
    pub consumer: Option<String>,
    pub provider: Option<String>,
    pub operation: Option<&'static str>,
    pub model_requested: Option<String>,
    pub model: Option<String>,
    pub route: Option<String>,
    /// What chose the route (model-router), and the complexity tier and
    /// score it gave an `auto` request.
    pub route_reason: Option<String>,
    pub route_tier: Option<String>,
    pub route_score: Option<u32>,
    pub status: Option<u16>,
    pub stream: Option<bool>,
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    pub total_tokens: Option<u64>,
    pub cached_input_tokens: Option<u64>,
    pub cache_write_input_tokens: Option<u64>,
    pub reasoning_tokens: Option<u64>,
    pub usage_source: &'static str,
    pub cost_usd: Option<f64>,
    pub cache: Option<&'static str>,
    pub ratelimit: Option<&'static str>,
    pub screen: Option<&'static str>,
    pub duration_ms: Option<u64>,
    pub ttft_ms: Option<u64>,
}

/// Bytes reserved for a line before it is written.
const LINE_CAPACITY: usize = 1024;

impl Line {
    /// The line's JSON bytes: the members in the struct's order, each
    /// written with its name as one constant (as serde's derive would
    /// write them; a test holds the two equal).
    pub fn to_json(&self) -> Vec<u8> {
        // Sized for a whole line (most are 400-700 bytes), so it is not
        // grown and copied from a small buffer up.
        let mut out = Vec::with_capacity(LINE_CAPACITY);
        let mut o = Object::new(&mut out);
        o.str("request_id", self.request_id.as_deref());
        o.str("consumer", self.consumer.as_deref());
        o.str("provider", self.provider.as_deref());
        o.str("operation", self.operation);
        o.str("model_requested", self.model_requested.as_deref());
        o.str("model", self.model.as_deref());
        o.str("route", self.route.as_deref());
        o.str("route_reason", self.route_reason.as_deref());
        o.str("route_tier", self.route_tier.as_deref());
        o.u64("route_score", self.route_score.map(u64::from));
        o.u64("status", self.status.map(u64::from));
        o.bool("stream", self.stream);
        o.u64("input_tokens", self.input_tokens);
        o.u64("output_tokens", self.output_tokens);
        o.u64("total_tokens", self.total_tokens);
        o.u64("cached_input_tokens", self.cached_input_tokens);
        o.u64("cache_write_input_tokens", self.cache_write_input_tokens);
        o.u64("reasoning_tokens", self.reasoning_tokens);
        o.str("usage_source", Some(self.usage_source));
        o.f64("cost_usd", self.cost_usd);
        o.str("cache", self.cache);
        o.str("ratelimit", self.ratelimit);
        o.str("screen", self.screen);
        o.u64("duration_ms", self.duration_ms);
        o.u64("ttft_ms", self.ttft_ms);
        o.end();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_values_are_null() {
        let line = Line {
            usage_source: "none",
            ..Line::default()
        };
        let v: serde_json::Value = serde_json::from_slice(&line.to_json()).unwrap();
        let o = v.as_object().unwrap();
        for field in [
            "request_id",
            "consumer",
            "provider",
            "model_requested",
            "model",
            "route",
            "route_reason",
            "route_tier",
            "route_score",
            "status",
            "stream",
            "input_tokens",
            "output_tokens",
            "total_tokens",
            "cached_input_tokens",
            "cache_write_input_tokens",
            "reasoning_tokens",
            "cost_usd",
            "cache",
            "ratelimit",
            "screen",
            "duration_ms",
            "ttft_ms",
        ] {
            assert_eq!(o.get(field), Some(&serde_json::Value::Null), "{field}");
        }
        assert_eq!(o["usage_source"], "none");
    }

    fn full(text: &str, n: u64, f: f64) -> Line {
        Line {
            request_id: Some(text.to_string()),
            consumer: Some(format!("{text}-c")),
            provider: Some("openai".into()),
            operation: Some("chat"),
            model_requested: Some(text.to_string()),
            model: Some("gpt-4o".into()),
            route: Some(text.to_string()),
            route_reason: Some("alias".into()),
            route_tier: Some(text.to_string()),
            route_score: u32::try_from(n % (1 << 32)).ok(),
            status: u16::try_from(n % 600).ok(),
            stream: Some(n % 2 == 0),
            input_tokens: Some(n),
            output_tokens: Some(n / 3),
            total_tokens: Some(u64::MAX),
            cached_input_tokens: Some(0),
            cache_write_input_tokens: None,
            reasoning_tokens: Some(n / 7),
            usage_source: "reported",
            cost_usd: Some(f),
            cache: Some("miss"),
            ratelimit: Some("allowed"),
            screen: Some("redacted"),
            duration_ms: Some(n / 11),
            ttft_ms: None,
        }
    }

    #[test]
    fn lines_are_written_as_serde_writes_them() {
        let all: String = (0u8..0x80).map(char::from).collect();
        let lines = [
            Line::default(),
            full("req-1", 212, 0.000_425),
            full(&all, 0, 0.0),
            full("é \"x\" \\ 😀", u64::MAX, f64::NAN),
            full("", 1, 1e-9),
        ];
        for line in lines {
            assert_eq!(
                String::from_utf8(line.to_json()).unwrap(),
                serde_json::to_string(&line).unwrap()
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn any_line_is_written_as_serde_writes_it(
            text in "\\PC*|[\\x00-\\x7f]{0,40}",
            n in proptest::num::u64::ANY,
            f in proptest::num::f64::ANY,
        ) {
            let line = full(&text, n, f);
            let json = line.to_json();
            proptest::prop_assert_eq!(
                String::from_utf8(json.clone()).unwrap(),
                serde_json::to_string(&line).unwrap()
            );
            let _: serde_json::Value = serde_json::from_slice(&json).unwrap();
        }
    }
}
