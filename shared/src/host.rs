//! The proxy-wasm host: the one place in the core that names `proxy_wasm`.
//!
//! It implements the boundary traits over host calls and provides
//! [`StageHttp`], the HTTP context that runs a [`Stage`]: it reads from the
//! host (all headers in one call, a body only when the stage asked for it),
//! hands plain data to the stage, and applies what the stage answers. It has
//! no logic of its own beyond that translation, so the plugin crates are a
//! root context that compiles its configuration and nothing more.

use crate::boundary::{CasError, Clock, FilterState, MetricKind, Metrics, SharedData};
use crate::stage::{Body, Env, Flow, HeaderEdits, Headers, LogInput, Stage};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, LogLevel, MapType, MetricType, Status};
use std::time::UNIX_EPOCH;

pub struct HostClock;

impl Clock for HostClock {
    fn now_ms(&self) -> u64 {
        hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as u64)
    }
}

/// Filter state of the current request (`wasm.<key>` in Envoy).
pub struct HostFilterState;

impl FilterState for HostFilterState {
    fn get(&self, key: &str) -> Option<Vec<u8>> {
        hostcalls::get_property(vec![key]).ok().flatten()
    }
    fn set(&mut self, key: &str, value: &[u8]) {
        if hostcalls::set_property(vec![key], Some(value)).is_err() {
            log(LogLevel::Warn, &format!("could not set filter state {key}"));
        }
    }
}

pub struct HostMetrics;

impl Metrics for HostMetrics {
    fn define(&mut self, kind: MetricKind, name: &str) -> Option<u32> {
        let kind = match kind {
            MetricKind::Counter => MetricType::Counter,
            MetricKind::Histogram => MetricType::Histogram,
        };
        hostcalls::define_metric(kind, name).ok()
    }
    fn add(&mut self, id: u32, value: u64) {
        let _ = hostcalls::increment_metric(id, i64::try_from(value).unwrap_or(i64::MAX));
    }
    fn record(&mut self, id: u32, value: u64) {
        let _ = hostcalls::record_metric(id, value);
    }
}

/// Envoy's shared data: one store per plugin `vm_id`, shared by all workers.
pub struct HostSharedData;

impl SharedData for HostSharedData {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        match hostcalls::get_shared_data(key) {
            Ok((Some(v), cas)) => Some((v, cas.unwrap_or(0))),
            _ => None,
        }
    }
    fn set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), CasError> {
        match hostcalls::set_shared_data(key, Some(value), cas) {
            Ok(()) => Ok(()),
            Err(Status::CasMismatch) => Err(CasError::Mismatch),
            Err(_) => Err(CasError::Failed),
        }
    }
}

pub fn log(level: LogLevel, message: &str) {
    let _ = hostcalls::log(level, message);
}

/// Sets the log level and routes panics to Envoy's log before the VM aborts
/// (FAIL_RELOAD then replaces the VM).
pub fn init() {
    proxy_wasm::set_log_level(LogLevel::Info);
    std::panic::set_hook(Box::new(|info| {
        log(LogLevel::Critical, &format!("aigw: panic: {info}"));
    }));
}

/// Reads a property holding a little-endian integer (Envoy's encoding of
/// `response.code` and `request.duration`).
fn int_property(path: Vec<&str>) -> Option<i64> {
    let bytes = hostcalls::get_property(path).ok().flatten()?;
    let arr: [u8; 8] = bytes.get(..8)?.try_into().ok()?;
    Some(i64::from_le_bytes(arr))
}

fn text_property(path: Vec<&str>) -> Option<String> {
    let bytes = hostcalls::get_property(path).ok().flatten()?;
    String::from_utf8(bytes).ok().filter(|s| !s.is_empty())
}

/// An HTTP context that runs one stage.
pub struct StageHttp<S: Stage> {
    stage: S,
    reading_request_body: bool,
    clock: HostClock,
    state: HostFilterState,
    metrics: HostMetrics,
}

impl<S: Stage> StageHttp<S> {
    pub fn new(stage: S) -> Self {
        StageHttp {
            stage,
            reading_request_body: false,
            clock: HostClock,
            state: HostFilterState,
            metrics: HostMetrics,
        }
    }
}

macro_rules! env {
    ($self:ident) => {
        Env {
            clock: &$self.clock,
            state: &mut $self.state,
            metrics: &mut $self.metrics,
        }
    };
}

fn apply(map: MapType, edits: &HeaderEdits) {
    for name in &edits.remove {
        let _ = hostcalls::set_map_value(map, name, None);
    }
    for (name, value) in &edits.set {
        let _ = hostcalls::set_map_value(map, name, Some(value));
    }
}

impl<S: Stage> Context for StageHttp<S> {}

impl<S: Stage> HttpContext for StageHttp<S> {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let headers = Headers::new(self.get_http_request_headers());
        let mut edits = HeaderEdits::default();
        let flow = self
            .stage
            .request_headers(&mut env!(self), &headers, &mut edits, end_of_stream);
        apply(MapType::HttpRequestHeaders, &edits);
        match flow {
            Flow::Continue => Action::Continue,
            Flow::ReadBody { hold_headers } => {
                self.reading_request_body = true;
                // Holding headers needs `allow_on_headers_stop_iteration: true`
                // in the filter config; without it Envoy stops the whole
                // request and the body callback never runs.
                if hold_headers {
                    Action::Pause
                } else {
                    Action::Continue
                }
            }
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if !self.reading_request_body {
            return Action::Continue;
        }
        let limit = self.stage.max_request_body();
        let truncated = body_size > limit;
        if !end_of_stream && !truncated {
            // Pause in a body callback is StopIterationAndBuffer: Envoy keeps
            // the pieces and calls again with all of them.
            return Action::Pause;
        }
        self.reading_request_body = false;
        // A body past the limit is not read at all: the stage only learns it was there.
        let body = if truncated {
            Vec::new()
        } else {
            self.get_http_request_body(0, body_size).unwrap_or_default()
        };
        let mut edits = HeaderEdits::default();
        let out = self
            .stage
            .request_body(&mut env!(self), &body, truncated, &mut edits);
        if let Body::Replace(new) = out {
            self.set_http_request_body(0, body_size, &new);
        }
        apply(MapType::HttpRequestHeaders, &edits);
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let headers = Headers::new(self.get_http_response_headers());
        let mut edits = HeaderEdits::default();
        self.stage
            .response_headers(&mut env!(self), &headers, &mut edits);
        apply(MapType::HttpResponseHeaders, &edits);
        if end_of_stream {
            self.stage.response_chunk(&mut env!(self), &[], true);
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let chunk = if body_size > 0 && self.stage.wants_response_body() {
            self.get_http_response_body(0, body_size)
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        if let Body::Replace(new) =
            self.stage
                .response_chunk(&mut env!(self), &chunk, end_of_stream)
        {
            self.set_http_response_body(0, body_size, &new);
        }
        Action::Continue
    }

    fn on_http_response_trailers(&mut self, _num_trailers: usize) -> Action {
        // A response that ends with trailers never has an end-of-stream body
        // callback; it is complete all the same. Nothing can be added to the
        // body from here, so a rewrite has nothing left to flush.
        self.stage.response_chunk(&mut env!(self), &[], true);
        Action::Continue
    }

    fn on_log(&mut self) {
        let input = LogInput {
            request_id: text_property(vec!["request", "id"]),
            status: int_property(vec!["response", "code"])
                .and_then(|c| u16::try_from(c).ok())
                .filter(|c| *c != 0),
            duration_ms: int_property(vec!["request", "duration"])
                .and_then(|ns| u64::try_from(ns / 1_000_000).ok()),
            route_name: text_property(vec!["xds", "route_name"]),
        };
        self.stage.log(&mut env!(self), &input);
    }
}

/// An HTTP context that does nothing: every callback is the SDK's default
/// `Continue`, so no header map or body is copied into the VM.
pub struct Idle;

impl Context for Idle {}
impl HttpContext for Idle {}

/// The whole shell of a filter that is not built yet: it accepts only an
/// empty configuration and passes every request through untouched.
#[macro_export]
macro_rules! passthrough_plugin {
    ($name:literal) => {
        use proxy_wasm::traits::{Context, HttpContext, RootContext};
        use proxy_wasm::types::{ContextType, LogLevel};
        use $crate::host::{self, Idle};

        proxy_wasm::main! {{
            host::init();
            proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root) });
        }}

        struct Root;

        impl Context for Root {}

        impl RootContext for Root {
            fn on_configure(&mut self, _size: usize) -> bool {
                let config = self.get_plugin_configuration().unwrap_or_default();
                match $crate::config::parse::<$crate::config::Empty>(&config) {
                    Ok(_) => true,
                    Err(e) => {
                        host::log(
                            LogLevel::Error,
                            &format!("{}: invalid configuration: {e}", $name),
                        );
                        false
                    }
                }
            }

            fn get_type(&self) -> Option<ContextType> {
                Some(ContextType::HttpContext)
            }

            fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
                Some(Box::new(Idle))
            }
        }
    };
}
