//! External moderation: the prompt (already redacted) is sent to an
//! OpenAI-style `/v1/moderations` or an Azure AI Content Safety
//! `text:analyze` endpoint through an Envoy cluster, and the request waits
//! for the verdict. A service that is down, slow past `timeout_ms`, or
//! answers something unreadable is a failure, handled as `failure_mode`
//! says: `deny` (the default: a screen that cannot screen does not pass
//! traffic) answers 503, `allow` goes on and counts it.

use crate::boundary::HttpCall;
use crate::config::ConfigError;
use crate::stage::CalloutResponse;
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Provider {
    #[default]
    Openai,
    Azure,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureMode {
    Allow,
    #[default]
    Deny,
}

/// The `moderation` section as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModerationConfig {
    pub provider: Provider,
    /// The Envoy cluster of the service (required).
    pub cluster: String,
    /// `:authority` of the call (default: the cluster name).
    pub authority: Option<String>,
    /// Path (default `/v1/moderations`, or Azure's `text:analyze`).
    pub path: Option<String>,
    /// Extra request headers (`authorization`, `ocp-apim-subscription-key`).
    pub headers: BTreeMap<String, String>,
    /// OpenAI moderation model (default: the service's).
    pub model: Option<String>,
    pub timeout_ms: Option<u64>,
    pub failure_mode: FailureMode,
    /// Azure: the lowest severity that flags (default 4, of 0-7).
    pub severity_threshold: Option<u8>,
}

/// The compiled form.
#[derive(Debug)]
pub struct Moderation {
    provider: Provider,
    cluster: String,
    authority: String,
    path: String,
    headers: Vec<(String, String)>,
    model: Option<String>,
    timeout_ms: u64,
    pub failure_mode: FailureMode,
    severity_threshold: u8,
}

/// Largest text sent (Azure takes 10 000 characters; OpenAI more).
const MAX_TEXT: usize = 10_000;

/// What the service said.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Clean,
    /// Flagged, with the category names it gave.
    Flagged(Vec<String>),
    /// No usable answer (down, timed out, an error status, unreadable).
    Failed,
}

impl Moderation {
    pub fn compile(c: ModerationConfig) -> Result<Moderation, ConfigError> {
        if c.cluster.is_empty() {
            return Err(ConfigError::new(
                "moderation.cluster",
                "the Envoy cluster of the moderation service is required",
            ));
        }
        let timeout_ms = c.timeout_ms.unwrap_or(1000);
        if !(1..=30_000).contains(&timeout_ms) {
            return Err(ConfigError::new(
                "moderation.timeout_ms",
                format!("{timeout_ms} is outside 1..=30000"),
            ));
        }
        let severity_threshold = c.severity_threshold.unwrap_or(4);
        if severity_threshold > 7 {
            return Err(ConfigError::new(
                "moderation.severity_threshold",
                format!("{severity_threshold} is outside 0..=7"),
            ));
        }
        let mut headers = Vec::new();
        for (k, v) in &c.headers {
            let name = crate::config::header_name(&format!("moderation.headers.{k}"), k)?;
            headers.push((name, v.clone()));
        }
        let path = c.path.unwrap_or_else(|| {
            match c.provider {
                Provider::Openai => "/v1/moderations",
                Provider::Azure => "/contentsafety/text:analyze?api-version=2024-09-01",
            }
            .to_string()
        });
        if !path.starts_with('/') {
            return Err(ConfigError::new("moderation.path", "must start with /"));
        }
        Ok(Moderation {
            provider: c.provider,
            authority: c.authority.unwrap_or_else(|| c.cluster.clone()),
            cluster: c.cluster,
            path,
            headers,
            model: c.model,
            timeout_ms,
            failure_mode: c.failure_mode,
            severity_threshold,
        })
    }

    /// The callout that asks about `text`.
    pub fn call(&self, text: &str) -> HttpCall {
        let mut end = text.len().min(MAX_TEXT);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        let text = &text[..end];
        let body = match self.provider {
            Provider::Openai => {
                let mut b = serde_json::json!({ "input": text });
                if let Some(m) = &self.model {
                    b["model"] = Value::String(m.clone());
                }
                b
            }
            Provider::Azure => serde_json::json!({ "text": text }),
        };
        let mut headers = vec![
            (":method".to_string(), "POST".to_string()),
            (":path".to_string(), self.path.clone()),
            (":authority".to_string(), self.authority.clone()),
            ("content-type".to_string(), "application/json".to_string()),
        ];
        headers.extend(self.headers.iter().cloned());
        HttpCall {
            cluster: self.cluster.clone(),
            headers,
            body: body.to_string().into_bytes(),
            timeout_ms: self.timeout_ms,
        }
    }

    /// Reads the service's answer.
    pub fn verdict(&self, r: &CalloutResponse) -> Verdict {
        let CalloutResponse::Http { status, body, .. } = r else {
            return Verdict::Failed;
        };
        if !(200..300).contains(status) {
            return Verdict::Failed;
        }
        let Ok(v) = serde_json::from_slice::<Value>(body) else {
            return Verdict::Failed;
        };
        match self.provider {
            Provider::Openai => {
                let Some(results) = v.get("results").and_then(Value::as_array) else {
                    return Verdict::Failed;
                };
                let mut cats = Vec::new();
                let mut flagged = false;
                for r in results {
                    flagged |= r.get("flagged").and_then(Value::as_bool) == Some(true);
                    if let Some(c) = r.get("categories").and_then(Value::as_object) {
                        cats.extend(
                            c.iter()
                                .filter(|(_, v)| v.as_bool() == Some(true))
                                .map(|(k, _)| k.clone()),
                        );
                    }
                }
                if flagged {
                    Verdict::Flagged(cats)
                } else {
                    Verdict::Clean
                }
            }
            Provider::Azure => {
                let Some(items) = v.get("categoriesAnalysis").and_then(Value::as_array) else {
                    return Verdict::Failed;
                };
                let cats: Vec<String> = items
                    .iter()
                    .filter(|i| {
                        i.get("severity").and_then(Value::as_u64).unwrap_or(0)
                            >= u64::from(self.severity_threshold)
                    })
                    .filter_map(|i| i.get("category").and_then(Value::as_str))
                    .map(str::to_string)
                    .collect();
                if cats.is_empty() {
                    Verdict::Clean
                } else {
                    Verdict::Flagged(cats)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(status: u16, body: &str) -> CalloutResponse {
        CalloutResponse::Http {
            status,
            headers: vec![],
            body: body.as_bytes().to_vec(),
        }
    }

    #[test]
    fn reads_both_providers_and_fails_on_the_rest() {
        let o = Moderation::compile(ModerationConfig {
            cluster: "m".into(),
            ..Default::default()
        })
        .unwrap();
        let a = Moderation::compile(ModerationConfig {
            cluster: "m".into(),
            provider: Provider::Azure,
            ..Default::default()
        })
        .unwrap();
        let cases: &[(&Moderation, CalloutResponse, Verdict)] = &[
            (
                &o,
                http(
                    200,
                    r#"{"results":[{"flagged":true,"categories":{"violence":true,"hate":false}}]}"#,
                ),
                Verdict::Flagged(vec!["violence".into()]),
            ),
            (
                &o,
                http(200, r#"{"results":[{"flagged":false}]}"#),
                Verdict::Clean,
            ),
            (&o, http(200, r#"{"nope":1}"#), Verdict::Failed),
            (&o, http(500, r#"{"results":[]}"#), Verdict::Failed),
            (&o, CalloutResponse::Failed, Verdict::Failed),
            (
                &a,
                http(
                    200,
                    r#"{"categoriesAnalysis":[{"category":"Hate","severity":2},{"category":"Violence","severity":4}]}"#,
                ),
                Verdict::Flagged(vec!["Violence".into()]),
            ),
            (
                &a,
                http(
                    200,
                    r#"{"categoriesAnalysis":[{"category":"Hate","severity":2}]}"#,
                ),
                Verdict::Clean,
            ),
        ];
        for (m, r, want) in cases {
            assert_eq!(&m.verdict(r), want, "{r:?}");
        }
        let call = a.call(&"é".repeat(6000));
        assert_eq!(call.cluster, "m");
        let body: Value = serde_json::from_slice(&call.body).unwrap();
        assert!(body["text"].as_str().unwrap().len() <= MAX_TEXT);
        assert!(call
            .headers
            .iter()
            .any(|(k, v)| k == ":path" && v.starts_with("/contentsafety/text:analyze")));
    }
}
