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
use crate::config::ConfigError;
use std::collections::HashMap;
use std::hash::BuildHasher;

/// The registry's maps are looked up several times a request, by names of
/// 30 to 80 bytes: foldhash (hashbrown's default, seeded per process) hashes
/// them in a fraction of SipHash's time.
type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Labels the filters put in stat names; every Envoy YAML under `envoy/` needs
/// a `stats_tags` rule `(;label=([^;]*))` for each (a test checks).
pub const LABELS: &[&str] = &[
    "model",
    "consumer",
    "token_type",
    "usage_source",
    "detector",
    "action",
    "direction",
    "screen",
    "rule",
    "outcome",
];

/// The value a label takes when series are capped or the value is unknown.
pub const OTHER: &str = "other";
pub const UNKNOWN: &str = "unknown";

const MAX_LABEL_VALUE: usize = 96;

/// A label value safe to put in a stat name.
pub fn label_value(v: &str) -> String {
    let mut out = String::new();
    push_label_value(&mut out, v);
    out
}

fn push_label_value(out: &mut String, v: &str) {
    // The usual value (a model name, a consumer id) is short printable
    // ASCII with nothing to replace: copied whole, not char by char.
    let plain = |b: u8| {
        b.is_ascii_graphic() && !matches!(b, b';' | b'=' | b'"' | b'\\' | b',' | b'{' | b'}')
    };
    if !v.is_empty() && v.len() <= MAX_LABEL_VALUE && v.bytes().all(plain) {
        out.push_str(v);
        return;
    }
    push_label_chars(out, v);
}

fn push_label_chars(out: &mut String, v: &str) {
    let start = out.len();
    for c in v.chars().take(MAX_LABEL_VALUE) {
        out.push(match c {
            ';' | '=' | '"' | '\\' | ',' | '{' | '}' => '_',
            c if c.is_control() || c.is_whitespace() => '_',
            c => c,
        });
    }
    if out.len() == start {
        out.push_str(UNKNOWN);
    }
}

/// Stat name for a base name and labels.
pub fn stat_name(base: &str, labels: &[(&str, &str)]) -> String {
    let mut name = String::new();
    write_name(&mut name, base, labels);
    name
}

/// Writes the stat name into `name` (cleared first), so that a lookup of a
/// known series allocates nothing.
fn write_name(name: &mut String, base: &str, labels: &[(&str, &str)]) {
    name.clear();
    name.push_str(base);
    for (k, v) in labels {
        name.push(';');
        name.push_str(k);
        name.push('=');
        push_label_value(name, v);
    }
}

/// The `metrics_flush_ms` of a filter's configuration: how often counters
/// kept in VM memory reach Envoy (default 1000; `0`: on every request; at
/// most a minute).
pub fn flush_ms(configured: Option<u64>) -> Result<u64, ConfigError> {
    let ms = configured.unwrap_or(1000);
    if ms > 60_000 {
        return Err(ConfigError::new(
            "metrics_flush_ms",
            format!("{ms} is above 60000 (a minute)"),
        ));
    }
    Ok(ms)
}

/// The filter's timer: hands what a registry kept to Envoy. A filter's
/// `tick_ms` is its registry's [`Registry::period_ms`] (or shorter).
pub fn flush_timer(registry: &std::cell::RefCell<Registry>, host: &mut dyn Metrics) {
    if let Ok(mut r) = registry.try_borrow_mut() {
        r.flush(host);
    }
}

/// The period of a filter's registry, for its `tick_ms`.
pub fn timer_period(registry: &std::cell::RefCell<Registry>) -> Option<u64> {
    registry.try_borrow().ok()?.period_ms()
}

/// Metric ids by name, for one VM, with the series bound.
///
/// A buffered registry keeps counter increments in VM memory and hands them
/// to Envoy on [`Registry::flush`] (the filter's timer tick): one host call
/// per series per tick instead of one per counter per request. Histograms
/// are recorded as they come, since Envoy keeps their values, not a sum.
#[derive(Debug)]
pub struct Registry {
    counters: Map<String, u32>,
    histograms: Map<String, u32>,
    /// Per counter fed by [`Registry::add_fraction`]: what is left below a whole unit.
    remainders: Map<u32, u64>,
    max_series: usize,
    /// Increments not yet handed to Envoy, when buffered.
    pending: Option<Map<u32, u64>>,
    /// Where a name is composed for a lookup.
    scratch: String,
    /// Ids by the pieces their names were made from (kind, base, labels
    /// as given), so that a series seen before is found by one hash of the
    /// pieces, without its name being written out and hashed: a request
    /// through the bundle looks up some fourteen. Only series kept under
    /// their own name are here, so it holds at most `max_series` entries.
    seen: Map<u64, Pieces>,
    pieces_hasher: foldhash::fast::RandomState,
    /// The flush timer's period, for a registry made by [`Registry::flushed_every`].
    period_ms: Option<u64>,
}

/// What a name in [`Registry::seen`] was made from, to tell it from another
/// whose pieces hash the same.
#[derive(Debug)]
struct Pieces {
    id: u32,
    kind: MetricKind,
    base: Box<str>,
    labels: Box<[(Box<str>, Box<str>)]>,
}

impl Pieces {
    fn are(&self, kind: MetricKind, base: &str, labels: &[(&str, &str)]) -> bool {
        self.kind == kind
            && *self.base == *base
            && self.labels.len() == labels.len()
            && self
                .labels
                .iter()
                .zip(labels)
                .all(|((k, v), (k2, v2))| **k == **k2 && **v == **v2)
    }
}

/// Labels whose values are free-form and are folded into `other` past the bound.
const FREE_FORM: &[&str] = &["model", "consumer"];

impl Registry {
    pub fn new(max_series: usize) -> Self {
        Registry {
            counters: Map::default(),
            histograms: Map::default(),
            remainders: Map::default(),
            max_series,
            pending: None,
            scratch: String::new(),
            seen: Map::default(),
            pieces_hasher: foldhash::fast::RandomState::default(),
            period_ms: None,
        }
    }

    /// A registry whose counters reach Envoy on [`Registry::flush`].
    pub fn buffered(max_series: usize) -> Self {
        Registry {
            pending: Some(Map::default()),
            ..Registry::new(max_series)
        }
    }

    /// The registry a filter's [`flush_ms`] asks for: buffered, unless
    /// counters are to reach Envoy on every request.
    pub fn flushed_every(flush_ms: u64, max_series: usize) -> Self {
        match flush_ms {
            0 => Registry::new(max_series),
            _ => Registry {
                period_ms: Some(flush_ms),
                ..Registry::buffered(max_series)
            },
        }
    }

    /// How often the filter's timer should call [`flush_timer`]; `None`
    /// when counters reach Envoy as they come.
    pub fn period_ms(&self) -> Option<u64> {
        self.period_ms
    }

    /// Hands the buffered counter increments to Envoy.
    pub fn flush(&mut self, host: &mut dyn Metrics) {
        if let Some(pending) = &mut self.pending {
            for (id, v) in pending.drain() {
                host.add(id, v);
            }
        }
    }

    fn count(&mut self, host: &mut dyn Metrics, id: u32, value: u64) {
        match &mut self.pending {
            Some(p) => *p.entry(id).or_insert(0) += value,
            None => host.add(id, value),
        }
    }

    fn id(
        &mut self,
        host: &mut dyn Metrics,
        kind: MetricKind,
        base: &str,
        labels: &[(&str, &str)],
    ) -> Option<u32> {
        // The same pieces always make the same name, so the same id.
        let hash = self.pieces_hasher.hash_one((kind, base, labels));
        if let Some(p) = self.seen.get(&hash) {
            if p.are(kind, base, labels) {
                return Some(p.id);
            }
        }
        let (id, own) = self.id_by_name(host, kind, base, labels)?;
        if own {
            // A hash already taken (another series' pieces) stays with its
            // first owner; this one is then found by its name each time.
            self.seen.entry(hash).or_insert_with(|| Pieces {
                id,
                kind,
                base: base.into(),
                labels: labels.iter().map(|&(k, v)| (k.into(), v.into())).collect(),
            });
        }
        Some(id)
    }

    /// The id of a series by its name; and whether the series has that
    /// name (`false`: past the bound, the one its labels are folded into).
    fn id_by_name(
        &mut self,
        host: &mut dyn Metrics,
        kind: MetricKind,
        base: &str,
        labels: &[(&str, &str)],
    ) -> Option<(u32, bool)> {
        write_name(&mut self.scratch, base, labels);
        let series = self.counters.len() + self.histograms.len();
        let ids = match kind {
            MetricKind::Counter => &mut self.counters,
            MetricKind::Histogram => &mut self.histograms,
        };
        if let Some(id) = ids.get(self.scratch.as_str()) {
            return Some((*id, true));
        }
        let name = self.scratch.clone();
        let own = series < self.max_series;
        let name = if !own {
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
            if let Some(id) = ids.get(&folded) {
                return Some((*id, false));
            }
            folded
        } else {
            name
        };
        let id = host.define(kind, &name)?;
        ids.insert(name, id);
        Some((id, own))
    }

    pub fn add(&mut self, host: &mut dyn Metrics, base: &str, labels: &[(&str, &str)], value: u64) {
        if let Some(id) = self.id(host, MetricKind::Counter, base, labels) {
            self.count(host, id, value);
        }
    }

    /// Adds `parts / per` to a counter of whole units, carrying the part
    /// below a unit to the next add, so that many small amounts (a request
    /// that costs 3.3 micro-dollars) sum exactly instead of each rounding.
    /// The carry lives in this VM's memory: each worker VM's counter is
    /// exact to less than one unit.
    pub fn add_fraction(
        &mut self,
        host: &mut dyn Metrics,
        base: &str,
        labels: &[(&str, &str)],
        parts: u64,
        per: u64,
    ) {
        let Some(id) = self.id(host, MetricKind::Counter, base, labels) else {
            return;
        };
        let per = per.max(1);
        let carry = self.remainders.entry(id).or_insert(0);
        let total = carry.saturating_add(parts);
        *carry = total % per;
        if total / per > 0 {
            self.count(host, id, total / per);
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
        // The whole-copy path writes what the char-by-char one writes.
        let mut values: Vec<String> = (0u8..128).map(|b| format!("a{}b", b as char)).collect();
        values.extend([
            "é-model".to_string(),
            "x".repeat(96),
            "x".repeat(97),
            String::new(),
        ]);
        for v in values {
            let (mut fast, mut slow) = (String::new(), String::new());
            push_label_value(&mut fast, &v);
            push_label_chars(&mut slow, &v);
            assert_eq!(fast, slow, "{v:?}");
        }
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

    #[test]
    fn a_series_seen_before_is_the_one_its_name_makes() {
        let mut host = FakeMetrics::default();
        let mut reg = Registry::new(8);
        // Pieces that would spell another series' name, pieces whose names
        // are made the same, and the same name as a histogram: each step is
        // taken twice, so the second look goes by the pieces.
        let steps: &[&[(&str, &str)]] = &[
            &[("model", "a"), ("consumer", "b")],
            &[("model", "a;consumer=b")],
            &[("model", "a;b")],
            &[("model", "a_b")],
            &[("model", "")],
            &[("model", "unknown")],
        ];
        for labels in steps {
            for _ in 0..2 {
                reg.add(&mut host, "t", labels, 1);
                reg.record(&mut host, "t", labels, 7);
            }
        }
        assert_eq!(host.counter("t;model=a;consumer=b"), 2);
        assert_eq!(host.counter("t;model=a_consumer_b"), 2);
        assert_eq!(host.counter("t;model=a_b"), 4);
        assert_eq!(host.counter("t;model=unknown"), 4);
        assert_eq!(reg.counters.len(), 4);
        assert_eq!(reg.histograms.len(), 4);
        for labels in steps {
            let id = reg.id(&mut host, MetricKind::Counter, "t", labels);
            assert_eq!(
                id,
                reg.id_by_name(&mut host, MetricKind::Counter, "t", labels)
                    .map(|(id, _)| id)
            );
            assert_ne!(id, reg.id(&mut host, MetricKind::Histogram, "t", labels));
        }
    }

    #[test]
    fn pieces_past_the_bound_are_not_kept() {
        let mut host = FakeMetrics::default();
        let mut reg = Registry::new(3);
        for i in 0..100 {
            let model = format!("m{i}");
            for _ in 0..2 {
                reg.add(&mut host, "t", &[("model", &model)], 1);
            }
        }
        assert_eq!(host.counter("t;model=m0"), 2);
        assert_eq!(host.counter("t;model=m2"), 2);
        assert_eq!(host.counter("t;model=other"), 194);
        assert_eq!(reg.seen.len(), 3);
    }

    #[test]
    fn fractions_carry_to_the_next_add() {
        let mut host = FakeMetrics::default();
        let mut reg = Registry::new(1);
        // (parts of 1/100 added, counter after); past the bound "b" folds into "other".
        let cases: &[(&str, u64, &str, u64)] = &[
            ("a", 33, "c;model=a", 0),
            ("a", 33, "c;model=a", 0),
            ("a", 33, "c;model=a", 0),
            ("a", 33, "c;model=a", 1),
            ("a", 250, "c;model=a", 3),
            ("b", 99, "c;model=other", 0),
            ("b", 1, "c;model=other", 1),
            ("a", 18, "c;model=a", 4),
        ];
        for (i, &(model, parts, series, want)) in cases.iter().enumerate() {
            reg.add_fraction(&mut host, "c", &[("model", model)], parts, 100);
            assert_eq!(host.counter(series), want, "step {i}");
        }
    }

    #[test]
    fn buffered_counters_reach_the_host_on_flush_summed() {
        let mut host = FakeMetrics::default();
        let mut reg = Registry::buffered(16);
        for _ in 0..3 {
            reg.add(&mut host, "t", &[("model", "a")], 2);
        }
        reg.add_fraction(&mut host, "c", &[("model", "a")], 15, 10);
        reg.add_fraction(&mut host, "c", &[("model", "a")], 15, 10);
        assert_eq!(host.counter("t;model=a"), 0, "nothing before the flush");
        reg.flush(&mut host);
        assert_eq!(host.counter("t;model=a"), 6);
        assert_eq!(host.counter("c;model=a"), 3);
        reg.flush(&mut host);
        assert_eq!(
            host.counter("t;model=a"),
            6,
            "a flush hands each increment once"
        );
        // Histograms are not buffered.
        reg.record(&mut host, "h", &[("model", "a")], 7);
        assert_eq!(host.histograms["h;model=a"], vec![7]);
    }
}
