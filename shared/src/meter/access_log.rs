//! The access-log line: one JSON object per request.
//!
//! Envoy's `json_format` can only give filter-state values as strings, and an
//! unknown count must be `null`, not `"-"` or `0`. So the line is composed
//! here, typed, from the facts every filter published, and handed to Envoy as
//! one filter-state value (`wasm.aigw.access_log`) that the file logger writes
//! verbatim (`%FILTER_STATE(wasm.aigw.access_log:PLAIN)%`). The field list is
//! the interface DESIGN.md promises; fields are never dropped, only null.

use serde::Serialize;

/// One request's line. Field order is the order written.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
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

impl Line {
    pub fn to_json(&self) -> String {
        // Serialising plain data with string keys cannot fail; an empty line
        // would still be better than a trapped VM on the log path.
        serde_json::to_string(self).unwrap_or_default()
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
        let v: serde_json::Value = serde_json::from_str(&line.to_json()).unwrap();
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
}
