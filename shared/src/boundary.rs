//! The host as the core sees it: a handful of small traits.
//!
//! Everything a decision needs from Envoy that is not in the request itself —
//! the time, per-request filter state and attributes, metrics, VM-wide shared
//! data, HTTP and gRPC callouts — reaches
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
    /// An attribute of the request Envoy knows (`["source", "address"]`,
    /// `["request", "id"]`), as Envoy encodes it.
    fn attribute(&self, _path: &[&str]) -> Option<Vec<u8>> {
        None
    }
    /// A fact written with [`FilterState::keep`], where facts stay in VM
    /// memory (the bundle): read back without parsing.
    fn kept(&self, _key: &str) -> Option<&dyn FactValue> {
        None
    }
    /// Whether facts stay in VM memory here, so that [`FilterState::keep`]
    /// keeps them: asked first, so that a writer does not copy a value
    /// only to have it dropped.
    fn keeps_values(&self) -> bool {
        false
    }
    /// Keeps a fact as a value where facts stay in VM memory; its bytes are
    /// made only if something reads them. False where facts travel as bytes
    /// (Envoy filter state between modules): the caller then writes them.
    fn keep(&mut self, _key: &str, _value: Box<dyn FactValue>) -> bool {
        false
    }
}

/// A fact held as a value: the value, and the bytes it is written as.
pub trait FactValue: std::any::Any {
    fn as_any(&self) -> &dyn std::any::Any;
    fn to_bytes(&self) -> Vec<u8>;
}

/// A JSON-encoded fact (`aigw.route`, `aigw.usage`, `aigw.request`).
impl<T: serde::Serialize + 'static> FactValue for T {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
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

/// An HTTP callout to a cluster Envoy knows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HttpCall {
    pub cluster: String,
    /// Request headers, pseudo-headers included (`:method`, `:path`, `:authority`).
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub timeout_ms: u64,
}

/// A unary gRPC callout (`service`/`method`) to a cluster Envoy knows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GrpcCall {
    pub cluster: String,
    pub service: String,
    pub method: String,
    pub metadata: Vec<(String, Vec<u8>)>,
    /// The serialised request message.
    pub message: Vec<u8>,
    pub timeout_ms: u64,
}

/// A callout the host would not send (unknown cluster, bad arguments).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CalloutError(pub String);

/// HTTP and gRPC callouts. A callout made while a request waits is answered
/// through `Stage::on_callout` with its token; a detached one outlives the
/// request (a cache store, a usage report) and its answer is dropped.
pub trait Callouts {
    fn http(&mut self, call: &HttpCall) -> Result<u32, CalloutError>;
    fn grpc(&mut self, call: &GrpcCall) -> Result<u32, CalloutError>;
    fn http_detached(&mut self, call: &HttpCall) -> Result<(), CalloutError>;
    fn grpc_detached(&mut self, call: &GrpcCall) -> Result<(), CalloutError>;
}

/// A callout the fake recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sent {
    Http(HttpCall),
    Grpc(GrpcCall),
}

/// Callouts recorded in order, with the tokens handed out; detached ones
/// have no token. A test answers them by calling the stage's `on_callout`
/// (or lets `exchange` do it).
#[derive(Debug, Default)]
pub struct FakeCallouts {
    pub sent: Vec<(Option<u32>, Sent)>,
    /// When set, every callout is refused with this error.
    pub refuse: Option<String>,
    next: u32,
}

impl FakeCallouts {
    fn record(&mut self, sent: Sent, detached: bool) -> Result<Option<u32>, CalloutError> {
        if let Some(why) = &self.refuse {
            return Err(CalloutError(why.clone()));
        }
        let token = (!detached).then(|| {
            self.next += 1;
            self.next
        });
        self.sent.push((token, sent));
        Ok(token)
    }

    /// The callouts sent with a token and not yet taken.
    pub fn take_waiting(&mut self) -> Vec<(u32, Sent)> {
        let (waiting, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.sent)
            .into_iter()
            .partition(|(t, _)| t.is_some());
        self.sent = rest;
        waiting
            .into_iter()
            .filter_map(|(t, s)| Some((t?, s)))
            .collect()
    }
}

impl Callouts for FakeCallouts {
    fn http(&mut self, call: &HttpCall) -> Result<u32, CalloutError> {
        let t = self.record(Sent::Http(call.clone()), false)?;
        t.ok_or_else(|| CalloutError("no token".into()))
    }
    fn grpc(&mut self, call: &GrpcCall) -> Result<u32, CalloutError> {
        let t = self.record(Sent::Grpc(call.clone()), false)?;
        t.ok_or_else(|| CalloutError("no token".into()))
    }
    fn http_detached(&mut self, call: &HttpCall) -> Result<(), CalloutError> {
        self.record(Sent::Http(call.clone()), true).map(|_| ())
    }
    fn grpc_detached(&mut self, call: &GrpcCall) -> Result<(), CalloutError> {
        self.record(Sent::Grpc(call.clone()), true).map(|_| ())
    }
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

/// Filter state in a map, with attributes in another. Like Envoy's, a fact
/// once written is read-only: a second write of the same key is refused (and
/// counted in `refused`), so a test shows which filter writes a fact.
#[derive(Debug, Default, Clone)]
pub struct FakeFilterState {
    pub values: HashMap<String, Vec<u8>>,
    pub attributes: HashMap<String, Vec<u8>>,
    pub refused: Vec<String>,
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
    /// An attribute, by its path joined with `.` (`source.address`).
    pub fn with_attribute(mut self, path: &str, value: &[u8]) -> Self {
        self.attributes.insert(path.to_string(), value.to_vec());
        self
    }
}

/// Keys whose value may be written more than once (Envoy's `declare_property`
/// makes them mutable; the shells declare these).
pub const MUTABLE_KEYS: &[&str] = &[];

impl FilterState for FakeFilterState {
    fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.values.get(key).cloned()
    }
    fn set(&mut self, key: &str, value: &[u8]) {
        if self.values.contains_key(key) && !MUTABLE_KEYS.contains(&key) {
            self.refused.push(key.to_string());
            return;
        }
        self.values.insert(key.to_string(), value.to_vec());
    }
    fn attribute(&self, path: &[&str]) -> Option<Vec<u8>> {
        self.attributes.get(&path.join(".")).cloned()
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

/// Shared data in a map, with versions that move on every write. Like the
/// SDK over Envoy, it reads an empty value back as no value.
#[derive(Debug, Default)]
pub struct FakeSharedData {
    values: RefCell<HashMap<String, (Vec<u8>, u32)>>,
}

impl SharedData for FakeSharedData {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        self.values
            .borrow()
            .get(key)
            .filter(|(v, _)| !v.is_empty())
            .cloned()
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
