//! The host as the core sees it: a handful of small traits.
//!
//! Everything a decision needs from Envoy that is not in the request itself —
//! the time, per-request filter state, metrics, VM-wide shared data — reaches
//! the core through these traits. `host.rs` implements them over proxy-wasm
//! (the only place, with the plugin shells, that names the proxy-wasm SDK); the
//! in-memory fakes below implement them for unit tests, so the core is tested
//! without a host and without scripting host calls one by one.

use std::cell::RefCell;
use std::collections::HashMap;

/// Wall-clock time in milliseconds since the Unix epoch.
pub trait Clock {
    fn now_ms(&self) -> u64;
}

/// Per-request key/value facts (Envoy filter state, `wasm.<key>`), readable by
/// every filter that handles the same request.
pub trait FilterState {
    fn get(&self, key: &str) -> Option<Vec<u8>>;
    fn set(&mut self, key: &str, value: &[u8]);
}

/// The kinds of metric the host can keep.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MetricKind {
    Counter,
    Histogram,
}

/// Metrics by full name (labels are encoded in the name, see `metrics.rs`).
pub trait Metrics {
    /// Returns a handle for the metric, defining it on first use.
    fn define(&mut self, kind: MetricKind, name: &str) -> Option<u32>;
    fn add(&mut self, id: u32, value: u64);
    fn record(&mut self, id: u32, value: u64);
}

/// Why a compare-and-swap write did not happen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CasError {
    /// Someone else wrote since the value was read; read again and retry.
    Mismatch,
    /// The host refused for another reason.
    Failed,
}

/// Data shared by every VM of a plugin in this Envoy (all workers), with
/// compare-and-swap so concurrent workers never lose an update.
pub trait SharedData {
    /// The value and its version (`cas`), or `None` if the key is unset.
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)>;
    /// Writes only if the stored version is still `cas` (`None`: unconditionally).
    fn set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), CasError>;
}

/// A clock whose time the test sets.
#[derive(Debug, Default)]
pub struct FakeClock {
    pub now: std::cell::Cell<u64>,
}

impl FakeClock {
    pub fn at(ms: u64) -> Self {
        FakeClock {
            now: std::cell::Cell::new(ms),
        }
    }
    pub fn advance(&self, ms: u64) {
        self.now.set(self.now.get() + ms);
    }
}

impl Clock for FakeClock {
    fn now_ms(&self) -> u64 {
        self.now.get()
    }
}

/// Filter state in a map.
#[derive(Debug, Default, Clone)]
pub struct FakeFilterState {
    pub values: HashMap<String, Vec<u8>>,
}

impl FakeFilterState {
    pub fn with(mut self, key: &str, value: &str) -> Self {
        self.values
            .insert(key.to_string(), value.as_bytes().to_vec());
        self
    }
    pub fn text(&self, key: &str) -> Option<&str> {
        self.values
            .get(key)
            .and_then(|v| std::str::from_utf8(v).ok())
    }
}

impl FilterState for FakeFilterState {
    fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.values.get(key).cloned()
    }
    fn set(&mut self, key: &str, value: &[u8]) {
        self.values.insert(key.to_string(), value.to_vec());
    }
}

/// Metrics in maps: counter totals and every recorded histogram value.
#[derive(Debug, Default)]
pub struct FakeMetrics {
    names: Vec<(MetricKind, String)>,
    pub counters: HashMap<String, u64>,
    pub histograms: HashMap<String, Vec<u64>>,
}

impl FakeMetrics {
    pub fn counter(&self, name: &str) -> u64 {
        self.counters.get(name).copied().unwrap_or(0)
    }
}

impl Metrics for FakeMetrics {
    fn define(&mut self, kind: MetricKind, name: &str) -> Option<u32> {
        if let Some(i) = self.names.iter().position(|(k, n)| *k == kind && n == name) {
            return u32::try_from(i).ok();
        }
        self.names.push((kind, name.to_string()));
        u32::try_from(self.names.len() - 1).ok()
    }
    fn add(&mut self, id: u32, value: u64) {
        if let Some((_, name)) = self.names.get(id as usize) {
            *self.counters.entry(name.clone()).or_default() += value;
        }
    }
    fn record(&mut self, id: u32, value: u64) {
        if let Some((_, name)) = self.names.get(id as usize) {
            self.histograms.entry(name.clone()).or_default().push(value);
        }
    }
}

/// Shared data in a map, with versions that move on every write.
#[derive(Debug, Default)]
pub struct FakeSharedData {
    values: RefCell<HashMap<String, (Vec<u8>, u32)>>,
}

impl SharedData for FakeSharedData {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        self.values.borrow().get(key).cloned()
    }
    fn set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), CasError> {
        let mut values = self.values.borrow_mut();
        let current = values.get(key).map(|(_, v)| *v).unwrap_or(0);
        if let Some(expected) = cas {
            if expected != current {
                return Err(CasError::Mismatch);
            }
        }
        values.insert(key.to_string(), (value.to_vec(), current.wrapping_add(1)));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_data_cas_rejects_stale_writes() {
        let mut data = FakeSharedData::default();
        data.set("k", b"1", None).unwrap();
        let (_, cas) = data.get("k").unwrap();
        data.set("k", b"2", Some(cas)).unwrap();
        assert_eq!(data.set("k", b"3", Some(cas)), Err(CasError::Mismatch));
        assert_eq!(data.get("k").unwrap().0, b"2");
    }

    #[test]
    fn fake_metrics_reuse_ids_per_name() {
        let mut m = FakeMetrics::default();
        let a = m.define(MetricKind::Counter, "a").unwrap();
        assert_eq!(m.define(MetricKind::Counter, "a"), Some(a));
        m.add(a, 2);
        m.add(a, 3);
        assert_eq!(m.counter("a"), 5);
    }
}
