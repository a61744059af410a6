//! Metric names, labels, and a bound on how many series a VM creates.
//!
//! Envoy stats have names, not labels. A wasm filter defines a stat whose name
//! carries its labels (`aigw_tokens_total;model=gpt-4o;consumer=alice`), and
//! the `stats_tags` rules in `envoy/gateway.yaml` cut each `;label=value`
//! out of the name into a Prometheus label. `;` and `=` therefore may not
//! appear in values, and are replaced.
//!
//! Label values come from requests (model names, consumer ids), so an
//! unbounded number of series is one loop of curl away. Each VM keeps at most
//! `max_series` distinct names; past that, the free-form labels (`model`,
//! `consumer`) read `other`, and the totals stay right.

use crate::boundary::{MetricKind, Metrics};
use std::collections::HashMap;

/// Labels the filters put in stat names; every Envoy YAML under `envoy/` needs
/// a `stats_tags` rule `(;label=([^;]*))` for each (a test checks).
pub const LABELS: &[&str] = &[
    "model",
    "consumer",
    "token_type",
    "usage_source",
    "rule",
    "outcome",
];

/// The value a label takes when series are capped or the value is unknown.
pub const OTHER: &str = "other";
pub const UNKNOWN: &str = "unknown";

const MAX_LABEL_VALUE: usize = 96;

/// A label value safe to put in a stat name.
pub fn label_value(v: &str) -> String {
    let v: String = v
        .chars()
        .take(MAX_LABEL_VALUE)
        .map(|c| match c {
            ';' | '=' | '"' | '\\' | ',' | '{' | '}' => '_',
            c if c.is_control() || c.is_whitespace() => '_',
            c => c,
        })
        .collect();
    if v.is_empty() {
        UNKNOWN.to_string()
    } else {
        v
    }
}

/// Stat name for a base name and labels.
pub fn stat_name(base: &str, labels: &[(&str, &str)]) -> String {
    let mut name = base.to_string();
    for (k, v) in labels {
        name.push(';');
        name.push_str(k);
        name.push('=');
        name.push_str(&label_value(v));
    }
    name
}

/// Metric ids by name, for one VM, with the series bound.
#[derive(Debug)]
pub struct Registry {
    ids: HashMap<(MetricKind, String), u32>,
    max_series: usize,
}

/// Labels whose values are free-form and are folded into `other` past the bound.
const FREE_FORM: &[&str] = &["model", "consumer"];

impl Registry {
    pub fn new(max_series: usize) -> Self {
        Registry {
            ids: HashMap::new(),
            max_series,
        }
    }

    fn id(
        &mut self,
        host: &mut dyn Metrics,
        kind: MetricKind,
        base: &str,
        labels: &[(&str, &str)],
    ) -> Option<u32> {
        let name = stat_name(base, labels);
        if let Some(id) = self.ids.get(&(kind, name.clone())) {
            return Some(*id);
        }
        let name = if self.ids.len() >= self.max_series {
            let folded: Vec<(&str, &str)> = labels
                .iter()
                .map(|&(k, v)| {
                    if FREE_FORM.contains(&k) {
                        (k, OTHER)
                    } else {
                        (k, v)
                    }
                })
                .collect();
            let folded = stat_name(base, &folded);
            if let Some(id) = self.ids.get(&(kind, folded.clone())) {
                return Some(*id);
            }
            folded
        } else {
            name
        };
        let id = host.define(kind, &name)?;
        self.ids.insert((kind, name), id);
        Some(id)
    }

    pub fn add(&mut self, host: &mut dyn Metrics, base: &str, labels: &[(&str, &str)], value: u64) {
        if let Some(id) = self.id(host, MetricKind::Counter, base, labels) {
            host.add(id, value);
        }
    }

    pub fn record(
        &mut self,
        host: &mut dyn Metrics,
        base: &str,
        labels: &[(&str, &str)],
        value: u64,
    ) {
        if let Some(id) = self.id(host, MetricKind::Histogram, base, labels) {
            host.record(id, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boundary::FakeMetrics;

    #[test]
    fn label_values_cannot_break_the_name() {
        let cases = [
            ("gpt-4o", "gpt-4o"),
            ("llama-3.1-8b", "llama-3.1-8b"),
            ("a;b=c", "a_b_c"),
            ("", "unknown"),
            ("new\nline \"q\"", "new_line__q_"),
        ];
        for (v, want) in cases {
            assert_eq!(label_value(v), want);
        }
        assert_eq!(label_value(&"x".repeat(500)).len(), MAX_LABEL_VALUE);
        assert_eq!(
            stat_name("aigw_tokens_total", &[("model", "m"), ("consumer", "c")]),
            "aigw_tokens_total;model=m;consumer=c"
        );
    }

    #[test]
    fn series_past_the_bound_fold_into_other() {
        let mut host = FakeMetrics::default();
        let mut reg = Registry::new(2);
        for model in ["a", "b", "c", "d"] {
            reg.add(
                &mut host,
                "t",
                &[("model", model), ("token_type", "input")],
                1,
            );
        }
        reg.add(
            &mut host,
            "t",
            &[("model", "a"), ("token_type", "input")],
            1,
        );
        assert_eq!(host.counter("t;model=a;token_type=input"), 2);
        assert_eq!(host.counter("t;model=b;token_type=input"), 1);
        assert_eq!(host.counter("t;model=other;token_type=input"), 2);
        assert_eq!(host.counter("t;model=c;token_type=input"), 0);
    }
}
