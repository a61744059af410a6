//! The proxy-wasm host: the one place in the core that names `proxy_wasm`.
//!
//! It implements the boundary traits over host calls and provides the two
//! contexts every filter needs: [`StageRoot`], which compiles a [`Filter`]'s
//! configuration and runs its timer, and [`StageHttp`], which runs one
//! [`Stage`] per request. `StageHttp` reads from the host (all headers in one
//! call, a body only when the stage asked for it), hands plain data to the
//! stage, and applies what the stage answers: header and body changes in one
//! go, a local reply, a pause until a callout's answer. It has no logic of its
//! own beyond that translation, so a plugin crate is one line:
//! [`plugin!`](crate::plugin).

use crate::boundary::{
    CalloutError, Callouts, CasError, Clock, FilterState, GrpcCall, HttpCall, MetricKind, Metrics,
    SharedData,
};
use crate::stage::{
    CalloutResponse, Chunk, Edit, Env, Filter, Headers, LogInput, Reply, RequestBody, RootEnv,
    Stage, Step,
};
pub use aigw_alloc::Cached as Allocator;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType, Status};
use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

pub struct HostClock;

impl Clock for HostClock {
    fn now_ms(&self) -> u64 {
        hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as u64)
    }
}

/// Filter state of the current request (`wasm.<key>` in Envoy), and its attributes.
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
    fn attribute(&self, path: &[&str]) -> Option<Vec<u8>> {
        hostcalls::get_property(path.to_vec()).ok().flatten()
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
        if value > 0 {
            let _ = hostcalls::increment_metric(id, i64::try_from(value).unwrap_or(i64::MAX));
        }
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

thread_local! {
    /// The root context of this VM: detached callouts are made on its behalf,
    /// since Envoy cancels a request's callouts when the request ends.
    static ROOT_CONTEXT: Cell<u32> = const { Cell::new(0) };
}

/// Callouts on behalf of a context (an HTTP context, or the root).
pub struct HostCallouts {
    context_id: u32,
}

fn pairs(v: &[(String, String)]) -> Vec<(&str, &str)> {
    v.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

fn dispatch_http(call: &HttpCall) -> Result<u32, CalloutError> {
    hostcalls::dispatch_http_call(
        &call.cluster,
        pairs(&call.headers),
        (!call.body.is_empty()).then_some(call.body.as_slice()),
        vec![],
        Duration::from_millis(call.timeout_ms),
    )
    .map_err(|s| CalloutError(format!("http callout to {} refused: {s:?}", call.cluster)))
}

fn dispatch_grpc(call: &GrpcCall) -> Result<u32, CalloutError> {
    let metadata: Vec<(&str, &[u8])> = call
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_slice()))
        .collect();
    hostcalls::dispatch_grpc_call(
        &call.cluster,
        &call.service,
        &call.method,
        metadata,
        Some(&call.message),
        Duration::from_millis(call.timeout_ms),
    )
    .map_err(|s| CalloutError(format!("grpc callout to {} refused: {s:?}", call.cluster)))
}

impl HostCallouts {
    /// Runs `f` with the root as the effective context, so the callout it
    /// makes belongs to the root and is not cancelled when the request ends.
    /// Its answer is routed back to this context if it still exists, which
    /// ignores tokens it does not wait for.
    fn as_root<T>(&self, f: impl FnOnce() -> T) -> T {
        let root = ROOT_CONTEXT.with(Cell::get);
        let switched =
            root != 0 && root != self.context_id && hostcalls::set_effective_context(root).is_ok();
        let out = f();
        if switched {
            let _ = hostcalls::set_effective_context(self.context_id);
        }
        out
    }
}

impl Callouts for HostCallouts {
    fn http(&mut self, call: &HttpCall) -> Result<u32, CalloutError> {
        dispatch_http(call)
    }
    fn grpc(&mut self, call: &GrpcCall) -> Result<u32, CalloutError> {
        dispatch_grpc(call)
    }
    fn http_detached(&mut self, call: &HttpCall) -> Result<(), CalloutError> {
        self.as_root(|| dispatch_http(call)).map(|_| ())
    }
    fn grpc_detached(&mut self, call: &GrpcCall) -> Result<(), CalloutError> {
        self.as_root(|| dispatch_grpc(call)).map(|_| ())
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

/// From this many edits on, the edits reach Envoy as one replaced map
/// instead of a host call each (an admitted answer's eight rate-limit
/// headers). Replacing costs Envoy about as much as seven edits, since it
/// removes and adds back every header. Measured with the floor
/// (`./scripts/bench.sh --floor --rows "floor calls-edit,floor io"
/// --instructions 100`): over `floor body`, 50 edits cost 278.8k
/// instructions one by one and 124.8k as one map; `floor io`'s nine
/// response edits, 393.6k → 385.7k. Solved for the parts, an edit's host
/// call is about 3.6k, a replaced map about 24k, a stage's `set` 2k.
const REPLACE_MAP_AT: usize = 8;

/// Hands a stage's header changes to Envoy. `current` says the copy is the
/// map as Envoy holds it now (read in this callback, or held since), so that
/// many edits can go as one replaced map; a copy of headers already passed on
/// could be stale, and only its edits are sent.
fn apply(map: MapType, headers: &mut Headers, current: bool) {
    let edits = headers.take_edits();
    if current && headers.is_whole() && edits.len() >= REPLACE_MAP_AT {
        let _ = hostcalls::set_map(map, headers.iter().collect());
        return;
    }
    for edit in edits {
        let _ = match edit {
            Edit::Set(name, value) => hostcalls::set_map_value(map, &name, Some(&value)),
            Edit::Remove(name) => hostcalls::set_map_value(map, &name, None),
        };
    }
}

/// A header map as the host holds it. HTTP lets a value carry bytes that
/// are not UTF-8 (obs-text); the SDK's `get_map` panics on one, which would
/// take the VM down with the request. Such a value is read lossily instead.
fn header_pairs(map: MapType) -> (Vec<(String, String)>, bool) {
    let mut exact = true;
    let pairs = hostcalls::get_map_bytes(map)
        .unwrap_or_default()
        .into_iter()
        .map(|(name, value)| {
            let value = String::from_utf8(value).unwrap_or_else(|e| {
                exact = false;
                String::from_utf8_lossy(e.as_bytes()).into_owned()
            });
            (name, value)
        })
        .collect();
    (pairs, exact)
}

/// The request's or the response's headers, for a stage.
fn headers(map: MapType) -> Headers {
    match header_pairs(map) {
        (pairs, true) => Headers::new(pairs),
        (pairs, false) => Headers::lossy(pairs),
    }
}

fn send_reply(reply: &Reply) {
    let headers = pairs(&reply.headers);
    if let Err(e) =
        hostcalls::send_http_response(u32::from(reply.status), headers, Some(&reply.body))
    {
        log(
            LogLevel::Error,
            &format!("could not send a local reply: {e:?}"),
        );
    }
}

/// The root context of a filter: compiles the configuration (refusing a bad
/// one, which makes Envoy reject it) and runs the filter's timer.
pub struct StageRoot<F: Filter> {
    filter: Option<Rc<F>>,
}

impl<F: Filter> StageRoot<F> {
    pub fn new(context_id: u32) -> Self {
        ROOT_CONTEXT.with(|r| r.set(context_id));
        StageRoot { filter: None }
    }
}

impl<F: Filter> Context for StageRoot<F> {}

impl<F: Filter> RootContext for StageRoot<F> {
    fn on_configure(&mut self, _size: usize) -> bool {
        let config = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)
            .ok()
            .flatten()
            .unwrap_or_default();
        match F::from_config(&config) {
            Ok(filter) => {
                if let Some(ms) = filter.tick_ms() {
                    let _ = hostcalls::set_tick_period(Duration::from_millis(ms));
                }
                let root = ROOT_CONTEXT.with(Cell::get);
                filter.start(&mut RootEnv {
                    clock: &HostClock,
                    metrics: &mut HostMetrics,
                    shared: &mut HostSharedData,
                    callouts: &mut HostCallouts { context_id: root },
                });
                self.filter = Some(Rc::new(filter));
                true
            }
            Err(e) => {
                log(
                    LogLevel::Error,
                    &format!("{}: invalid configuration: {e}", F::NAME),
                );
                false
            }
        }
    }

    fn on_tick(&mut self) {
        if let Some(f) = &self.filter {
            let root = ROOT_CONTEXT.with(Cell::get);
            let mut env = RootEnv {
                clock: &HostClock,
                metrics: &mut HostMetrics,
                shared: &mut HostSharedData,
                callouts: &mut HostCallouts { context_id: root },
            };
            f.tick(&mut env);
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        // Envoy creates no stream before a configuration loads; if it ever
        // did, passing the request through beats trapping the VM.
        Some(match &self.filter {
            Some(f) => Box::new(StageHttp::new(F::stage(f), context_id)),
            None => Box::new(Idle),
        })
    }
}

/// Where a paused request waits for its callouts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Waiting {
    RequestHeaders,
    RequestBody,
    ResponseHeaders,
}

/// An HTTP context that runs one stage.
pub struct StageHttp<S: Stage> {
    stage: S,
    context_id: u32,
    request_headers: Option<Headers>,
    response_headers: Option<Headers>,
    request_headers_held: bool,
    response_headers_held: bool,
    reading_request_body: bool,
    reading_response_body: bool,
    waiting: Option<Waiting>,
    pending: Vec<u32>,
    /// The stage answered the request itself: its own reply is not its to read.
    replied: bool,
    /// The stage does not read this response: it passes untouched.
    passing_response: bool,
    /// Output of the last response callback, kept in Envoy's buffer (paused)
    /// because the stage still held bytes then.
    paused_output: Option<Vec<u8>>,
}

macro_rules! env {
    ($self:ident) => {
        &mut Env {
            clock: &HostClock,
            state: &mut HostFilterState,
            metrics: &mut HostMetrics,
            shared: &mut HostSharedData,
            callouts: &mut HostCallouts {
                context_id: $self.context_id,
            },
        }
    };
}

impl<S: Stage> StageHttp<S> {
    pub fn new(stage: S, context_id: u32) -> Self {
        StageHttp {
            stage,
            context_id,
            request_headers: None,
            response_headers: None,
            request_headers_held: false,
            response_headers_held: false,
            reading_request_body: false,
            reading_response_body: false,
            waiting: None,
            pending: Vec::new(),
            replied: false,
            passing_response: false,
            paused_output: None,
        }
    }

    /// Tokens of the callouts dispatched during the last step, which the
    /// stage now waits for. The SDK hands them out in order; the host calls
    /// record them here through `on_callout_dispatched`.
    fn wait(&mut self, at: Waiting, tokens: Vec<u32>) -> Action {
        if tokens.is_empty() {
            log(
                LogLevel::Error,
                "a stage waits without a callout in flight; going on",
            );
            return Action::Continue;
        }
        self.pending = tokens;
        self.waiting = Some(at);
        Action::Pause
    }

    /// Runs one step of the stage, noting the tokens of the callouts it
    /// makes (the ones the request then waits for).
    fn recorded<R>(&mut self, step: impl FnOnce(&mut S, &mut Env<'_>) -> R) -> (R, Vec<u32>) {
        let mut tokens = Vec::new();
        let out = {
            let mut calls = Recording::new(self.context_id, &mut tokens);
            let env = &mut Env {
                clock: &HostClock,
                state: &mut HostFilterState,
                metrics: &mut HostMetrics,
                shared: &mut HostSharedData,
                callouts: &mut calls,
            };
            step(&mut self.stage, env)
        };
        (out, tokens)
    }

    fn reply(&mut self, reply: &Reply) -> Action {
        self.replied = true;
        send_reply(reply);
        Action::Pause
    }

    fn write_request_body(&mut self, size: usize, body: &RequestBody) {
        if !body.is_changed() {
            return;
        }
        let _ = hostcalls::set_buffer(BufferType::HttpRequestBody, 0, size, body.bytes());
        if self.request_headers_held {
            if let Some(h) = &mut self.request_headers {
                // The body changed length: a stale Content-Length would cut it upstream.
                h.set("content-length", body.bytes().len().to_string());
            }
        }
    }

    fn flush_request_headers(&mut self, current: bool) {
        if let Some(h) = &mut self.request_headers {
            apply(MapType::HttpRequestHeaders, h, current);
        }
    }

    /// Hands a response read whole (after `Step::ReadBody`) to the stage
    /// and applies what it changed: body, Content-Length, status.
    fn read_whole_response(
        &mut self,
        body_size: usize,
        truncated: bool,
        end_of_stream: bool,
        trailers: bool,
    ) -> Action {
        let mut chunk = if truncated {
            Chunk::truncated()
        } else {
            Chunk::new(
                hostcalls::get_buffer(BufferType::HttpResponseBody, 0, body_size)
                    .ok()
                    .flatten()
                    .unwrap_or_default(),
            )
        };
        self.stage
            .response_body(env!(self), &mut chunk, end_of_stream);
        if chunk.is_changed() {
            let _ =
                hostcalls::set_buffer(BufferType::HttpResponseBody, 0, body_size, chunk.bytes());
            if self.response_headers_held {
                if let Some(h) = &mut self.response_headers {
                    // Trailers need a chunked answer: no length then.
                    if trailers {
                        h.remove("content-length");
                    } else {
                        h.set("content-length", chunk.bytes().len().to_string());
                    }
                }
            }
        }
        if let (true, Some(status)) = (self.response_headers_held, self.stage.response_status()) {
            if let Some(h) = &mut self.response_headers {
                h.set(":status", status.to_string());
            }
        }
        self.flush_response_headers(self.response_headers_held);
        self.response_headers_held = false;
        Action::Continue
    }

    fn flush_response_headers(&mut self, current: bool) {
        if let Some(h) = &mut self.response_headers {
            apply(MapType::HttpResponseHeaders, h, current);
        }
    }

    /// Runs `request_body` and applies what it says.
    fn run_request_body(&mut self, mut body: RequestBody, size: usize) -> Action {
        let mut headers = self.request_headers.take().unwrap_or_default();
        let (step, tokens) =
            self.recorded(|stage, env| stage.request_body(env, &mut body, &mut headers));
        self.request_headers = Some(headers);
        self.write_request_body(size, &body);
        self.flush_request_headers(self.request_headers_held);
        match step {
            Step::Reply(r) => self.reply(&r),
            Step::Wait => self.wait(Waiting::RequestBody, tokens),
            Step::Continue | Step::ReadBody { .. } => Action::Continue,
        }
    }

    fn response_headers_step(
        &mut self,
        step: Step,
        tokens: Vec<u32>,
        end_of_stream: bool,
    ) -> Action {
        match step {
            Step::Continue => {
                self.response_headers_held = false;
                if end_of_stream {
                    self.stage
                        .response_body(env!(self), &mut Chunk::default(), true);
                }
                Action::Continue
            }
            Step::ReadBody { hold_headers } => {
                self.response_headers_held = hold_headers;
                self.reading_response_body = true;
                if end_of_stream {
                    self.stage
                        .response_body(env!(self), &mut Chunk::default(), true);
                    self.reading_response_body = false;
                    return Action::Continue;
                }
                if hold_headers {
                    Action::Pause
                } else {
                    Action::Continue
                }
            }
            Step::Reply(r) => self.reply(&r),
            Step::Wait => self.wait(Waiting::ResponseHeaders, tokens),
        }
    }

    fn answer(&mut self, token: u32, response: CalloutResponse) {
        let Some(at) = self.waiting else {
            return;
        };
        if !self.pending.contains(&token) {
            return;
        }
        self.pending.retain(|t| *t != token);
        let mut headers = match at {
            Waiting::ResponseHeaders => self.response_headers.take(),
            _ => self.request_headers.take(),
        }
        .unwrap_or_default();
        let (step, tokens) =
            self.recorded(|stage, env| stage.on_callout(env, token, &response, &mut headers));
        self.pending.extend(tokens);
        match at {
            Waiting::ResponseHeaders => {
                self.response_headers = Some(headers);
                self.flush_response_headers(true);
            }
            _ => {
                self.request_headers = Some(headers);
                self.flush_request_headers(
                    at == Waiting::RequestHeaders || self.request_headers_held,
                );
            }
        }
        let resume = |at: Waiting| {
            let _ = match at {
                Waiting::ResponseHeaders => hostcalls::resume_http_response(),
                _ => hostcalls::resume_http_request(),
            };
        };
        match step {
            Step::Wait if !self.pending.is_empty() => {}
            Step::Reply(r) => {
                self.waiting = None;
                self.reply(&r);
            }
            Step::ReadBody { hold_headers } if at == Waiting::RequestHeaders => {
                self.waiting = None;
                self.reading_request_body = true;
                self.request_headers_held = hold_headers;
                if !hold_headers {
                    resume(at);
                }
            }
            _ => {
                self.waiting = None;
                if at == Waiting::ResponseHeaders {
                    self.response_headers_held = false;
                }
                resume(at);
            }
        }
    }
}

/// Callouts that also note the tokens they were given, so the context knows
/// what it waits for.
struct Recording<'a> {
    inner: HostCallouts,
    tokens: &'a mut Vec<u32>,
}

impl<'a> Recording<'a> {
    fn new(context_id: u32, tokens: &'a mut Vec<u32>) -> Self {
        Recording {
            inner: HostCallouts { context_id },
            tokens,
        }
    }
}

impl Callouts for Recording<'_> {
    fn http(&mut self, call: &HttpCall) -> Result<u32, CalloutError> {
        let t = self.inner.http(call)?;
        self.tokens.push(t);
        Ok(t)
    }
    fn grpc(&mut self, call: &GrpcCall) -> Result<u32, CalloutError> {
        let t = self.inner.grpc(call)?;
        self.tokens.push(t);
        Ok(t)
    }
    fn http_detached(&mut self, call: &HttpCall) -> Result<(), CalloutError> {
        self.inner.http_detached(call)
    }
    fn grpc_detached(&mut self, call: &GrpcCall) -> Result<(), CalloutError> {
        self.inner.grpc_detached(call)
    }
}

impl<S: Stage> Context for StageHttp<S> {
    fn on_http_call_response(
        &mut self,
        token: u32,
        num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        let response = if num_headers == 0 {
            CalloutResponse::Failed
        } else {
            let (headers, _) = header_pairs(MapType::HttpCallResponseHeaders);
            let status = headers
                .iter()
                .find(|(k, _)| k == ":status")
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(0);
            let body = hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
                .ok()
                .flatten()
                .unwrap_or_default();
            CalloutResponse::Http {
                status,
                headers,
                body,
            }
        };
        self.answer(token, response);
    }

    fn on_grpc_call_response(&mut self, token: u32, status_code: u32, response_size: usize) {
        let message = if status_code == 0 {
            hostcalls::get_buffer(BufferType::GrpcReceiveBuffer, 0, response_size)
                .ok()
                .flatten()
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        self.answer(
            token,
            CalloutResponse::Grpc {
                status: status_code,
                message,
            },
        );
    }
}

impl<S: Stage> HttpContext for StageHttp<S> {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let mut headers = headers(MapType::HttpRequestHeaders);
        let (step, tokens) =
            self.recorded(|stage, env| stage.request_headers(env, &mut headers, end_of_stream));
        self.request_headers = Some(headers);
        self.flush_request_headers(true);
        match step {
            Step::Continue => Action::Continue,
            Step::ReadBody { hold_headers } => {
                if end_of_stream {
                    // No body will come: the stage reads an empty one now.
                    self.request_headers_held = true;
                    let action = self.run_request_body(RequestBody::new(Vec::new()), 0);
                    self.request_headers_held = false;
                    return action;
                }
                self.reading_request_body = true;
                // Holding headers needs `allow_on_headers_stop_iteration: true`
                // in the filter config; without it Envoy stops the whole
                // request and the body callback never runs.
                self.request_headers_held = hold_headers;
                if hold_headers {
                    Action::Pause
                } else {
                    Action::Continue
                }
            }
            Step::Reply(r) => self.reply(&r),
            Step::Wait => self.wait(Waiting::RequestHeaders, tokens),
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if self.waiting.is_some() {
            // Envoy buffers what arrives while a callout is out.
            return Action::Pause;
        }
        if !self.reading_request_body {
            return Action::Continue;
        }
        let truncated = body_size > self.stage.max_body();
        if !end_of_stream && !truncated {
            // Pause in a body callback is StopIterationAndBuffer: Envoy keeps
            // the pieces and calls again with all of them.
            return Action::Pause;
        }
        self.reading_request_body = false;
        // A body past the limit is not read at all: the stage only learns it was there.
        let body = if truncated {
            RequestBody::truncated()
        } else {
            RequestBody::new(
                hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size)
                    .ok()
                    .flatten()
                    .unwrap_or_default(),
            )
        };
        let action = self.run_request_body(body, body_size);
        self.request_headers_held = false;
        action
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        // Envoy runs a filter's response callbacks for its own local reply too.
        if self.replied && !self.stage.reads_own_reply() {
            return Action::Continue;
        }
        if !self.stage.reads_response() {
            self.passing_response = true;
            return Action::Continue;
        }
        let mut headers = headers(MapType::HttpResponseHeaders);
        let (step, tokens) =
            self.recorded(|stage, env| stage.response_headers(env, &mut headers, end_of_stream));
        self.response_headers = Some(headers);
        self.flush_response_headers(true);
        self.response_headers_step(step, tokens, end_of_stream)
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if (self.replied && !self.stage.reads_own_reply()) || self.passing_response {
            return Action::Continue;
        }
        if self.waiting.is_some() {
            return Action::Pause;
        }
        if self.reading_response_body {
            let truncated = body_size > self.stage.max_body();
            if !end_of_stream && !truncated {
                return Action::Pause;
            }
            self.reading_response_body = false;
            return self.read_whole_response(body_size, truncated, end_of_stream, false);
        }

        // Streaming. After a pause the buffer starts with what was already
        // decided; only the rest is new.
        let kept = self.paused_output.take();
        let offset = kept.as_ref().map_or(0, Vec::len).min(body_size);
        let new_len = body_size - offset;
        let wants = self.stage.wants_response_body();
        let mut chunk = if new_len > 0 && wants {
            Chunk::new(
                hostcalls::get_buffer(BufferType::HttpResponseBody, offset, new_len)
                    .ok()
                    .flatten()
                    .unwrap_or_default(),
            )
        } else {
            Chunk::default()
        };
        self.stage
            .response_body(env!(self), &mut chunk, end_of_stream);
        let changed = chunk.is_changed();
        let hold = !end_of_stream && wants && offset == 0 && self.stage.holding();
        if !changed && !hold {
            // The common case: nothing to write, nothing to keep.
            return Action::Continue;
        }
        let out = match kept {
            Some(mut kept) => {
                kept.extend_from_slice(chunk.bytes());
                kept
            }
            None => chunk.into_bytes(),
        };
        if changed {
            let _ = hostcalls::set_buffer(BufferType::HttpResponseBody, 0, body_size, &out);
        }
        // The stage still holds bytes: keep this piece in Envoy's buffer for
        // one callback, so that trailers (after which no body callback comes)
        // find a buffer to flush into. Never twice in a row, so a stream
        // whose pieces never end on an event boundary is delayed by at most
        // one piece.
        if hold {
            self.paused_output = Some(out);
            return Action::Pause;
        }
        Action::Continue
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        // A request that ends with trailers has no end-of-stream body
        // callback: the body the stage waits for is all there now.
        if !self.reading_request_body || self.waiting.is_some() {
            return Action::Continue;
        }
        self.reading_request_body = false;
        let body = hostcalls::get_buffer(BufferType::HttpRequestBody, 0, usize::MAX)
            .ok()
            .flatten()
            .unwrap_or_default();
        let size = body.len();
        let body = if size > self.stage.max_body() {
            RequestBody::truncated()
        } else {
            RequestBody::new(body)
        };
        let action = self.run_request_body(body, size);
        self.request_headers_held = false;
        action
    }

    fn on_http_response_trailers(&mut self, _num_trailers: usize) -> Action {
        if (self.replied && !self.stage.reads_own_reply()) || self.passing_response {
            return Action::Continue;
        }
        if self.reading_response_body {
            // The answer the stage waits to read whole ends with trailers:
            // it is all in Envoy's buffer now. (Letting it go unread would
            // pass an answer unscreened.)
            self.reading_response_body = false;
            let size = hostcalls::get_buffer(BufferType::HttpResponseBody, 0, usize::MAX)
                .ok()
                .flatten()
                .map_or(0, |b| b.len());
            let truncated = size > self.stage.max_body();
            return self.read_whole_response(size, truncated, true, true);
        }
        // A response that ends with trailers never has an end-of-stream body
        // callback; it is complete all the same. What the stage still holds
        // goes into the buffer it paused on.
        let mut chunk = Chunk::default();
        self.stage.response_body(env!(self), &mut chunk, true);
        if chunk.is_changed() {
            match self.paused_output.take() {
                Some(mut out) => {
                    let size = out.len();
                    out.extend_from_slice(chunk.bytes());
                    let _ = hostcalls::set_buffer(BufferType::HttpResponseBody, 0, size, &out);
                }
                None => log(
                    LogLevel::Warn,
                    &format!(
                        "{} held response bytes lost to trailers",
                        chunk.bytes().len()
                    ),
                ),
            }
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        if !self.stage.logs() {
            return;
        }
        self.stage.log(env!(self), &HostLog);
    }
}

/// The request's end as Envoy's properties tell it, each read when asked.
struct HostLog;

impl LogInput for HostLog {
    fn request_id(&self) -> Option<String> {
        text_property(vec!["request", "id"])
    }
    fn status(&self) -> Option<u16> {
        int_property(vec!["response", "code"])
            .and_then(|c| u16::try_from(c).ok())
            .filter(|c| *c != 0)
    }
    fn duration_ms(&self) -> Option<u64> {
        int_property(vec!["request", "duration"]).and_then(|ns| u64::try_from(ns / 1_000_000).ok())
    }
    fn route_name(&self) -> Option<String> {
        text_property(vec!["xds", "route_name"])
    }
}

/// An HTTP context that does nothing: every callback is the SDK's default
/// `Continue`, so no header map or body is copied into the VM.
pub struct Idle;

impl Context for Idle {}
impl HttpContext for Idle {}

/// Installs the modules' allocator ([`Allocator`]: free lists of small
/// blocks in front of dlmalloc), in a wasm VM only: it relies on the VM's
/// one thread. [`plugin!`] does it; a shell of its own (the floor) calls it.
#[macro_export]
macro_rules! allocator {
    () => {
        #[cfg(all(target_arch = "wasm32", not(target_feature = "atomics")))]
        #[global_allocator]
        static AIGW_ALLOCATOR: $crate::host::Allocator = $crate::host::Allocator::new();
    };
}

/// The whole of a plugin crate: `aigw_shared::plugin!(aigw_shared::meter::Meter);`
/// makes the wasm module run that [`Filter`] (configuration, timer, one stage
/// per request).
#[macro_export]
macro_rules! plugin {
    ($filter:ty) => {
        $crate::allocator!();
        proxy_wasm::main! {{
            $crate::host::init();
            proxy_wasm::set_root_context(|context_id| -> Box<dyn proxy_wasm::traits::RootContext> {
                Box::new($crate::host::StageRoot::<$filter>::new(context_id))
            });
        }}
    };
}

/// The whole shell of a filter that is not built yet: it accepts only an
/// empty configuration and passes every request through untouched, without
/// copying a header into the VM.
#[macro_export]
macro_rules! passthrough_plugin {
    ($name:literal) => {
        $crate::allocator!();
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
