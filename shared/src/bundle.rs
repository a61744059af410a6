//! The bundle: every stage in one VM, one context per request.
//!
//! Five separate wasm filters cost five VM contexts, five copies of every
//! header map and body, and a round of filter-state host calls for every
//! fact they share. [`Chain`] runs the stages in their DESIGN order inside
//! one HTTP context instead: the request headers are read once, the body is
//! read and its facts parsed once ([`RequestBody`] is passed from stage to
//! stage), and facts travel in memory ([`MemoryState`]); only the facts
//! something outside the VM reads (the access-log line) are written to
//! Envoy's filter state.
//!
//! The chain keeps the semantics of the separate filters: request steps run
//! top to bottom, response steps bottom to top; a stage's local reply passes
//! back only through the stages above it; a stage that waits for a callout
//! resumes the chain from itself when the answer comes. The one difference is
//! when the headers step of a stage runs relative to the body step of the
//! stages above it: all headers steps run first, then all body steps, in
//! order, since one body read serves them all.

use crate::boundary::{CalloutError, Callouts, FactValue, FilterState, GrpcCall, HttpCall};
use crate::config::{self, ConfigError};
use crate::facts;
use crate::stage::{
    CalloutResponse, Chunk, Env, Filter, Headers, LogInput, RequestBody, RootEnv, Stage, Step,
};
use std::rc::Rc;

/// Facts in VM memory, written through to Envoy only for the keys that
/// something outside the VM reads. A JSON fact (the route, the usage) is
/// kept as its value, so the stage that reads it parses nothing; its bytes
/// are made only if something asks for the bytes.
///
/// A request has a dozen facts at most: a list found by comparing keys
/// costs less than hashing them (SipHash) and growing a table per request.
#[derive(Default)]
pub struct MemoryState {
    values: Vec<(String, Fact)>,
}

enum Fact {
    Bytes(Vec<u8>),
    Value(Box<dyn FactValue>),
}

impl MemoryState {
    fn find(&self, key: &str) -> Option<&Fact> {
        self.values.iter().find(|(k, _)| k == key).map(|(_, f)| f)
    }

    fn put(&mut self, key: &str, fact: Fact) {
        match self.values.iter_mut().find(|(k, _)| k == key) {
            Some((_, f)) => *f = fact,
            None => self.values.push((key.to_string(), fact)),
        }
    }
}

/// Facts the bundle writes to Envoy's filter state too: the access log
/// format reads `%FILTER_STATE(wasm.aigw.access_log:PLAIN)%`.
pub const EXPORTED: &[&str] = &[facts::ACCESS_LOG];

struct Layered<'a> {
    memory: &'a mut MemoryState,
    host: &'a mut dyn FilterState,
}

impl FilterState for Layered<'_> {
    fn get(&self, key: &str) -> Option<Vec<u8>> {
        match self.memory.find(key) {
            Some(Fact::Bytes(v)) => Some(v.clone()),
            Some(Fact::Value(v)) => Some(v.to_bytes()),
            // The bundle is the one writer of the aigw facts: a fact none of
            // its stages wrote is not there, and asking Envoy would only
            // cost a host call. Other keys may come from other filters.
            None if key.starts_with("aigw.") => None,
            None => self.host.get(key),
        }
    }
    fn set(&mut self, key: &str, value: &[u8]) {
        if EXPORTED.contains(&key) {
            self.host.set(key, value);
        }
        self.memory.put(key, Fact::Bytes(value.to_vec()));
    }
    fn attribute(&self, path: &[&str]) -> Option<Vec<u8>> {
        self.host.attribute(path)
    }
    fn kept(&self, key: &str) -> Option<&dyn FactValue> {
        match self.memory.find(key)? {
            Fact::Value(v) => Some(v.as_ref()),
            Fact::Bytes(_) => None,
        }
    }
    fn keeps_values(&self) -> bool {
        true
    }
    fn keep(&mut self, key: &str, value: Box<dyn FactValue>) -> bool {
        if EXPORTED.contains(&key) {
            self.host.set(key, &value.to_bytes());
        }
        self.memory.put(key, Fact::Value(value));
        true
    }
}

/// Callouts that remember which stage made them.
struct Owned<'a> {
    inner: &'a mut dyn Callouts,
    owner: usize,
    owners: &'a mut Vec<(u32, usize)>,
}

impl Callouts for Owned<'_> {
    fn http(&mut self, call: &HttpCall) -> Result<u32, CalloutError> {
        let t = self.inner.http(call)?;
        self.owners.push((t, self.owner));
        Ok(t)
    }
    fn grpc(&mut self, call: &GrpcCall) -> Result<u32, CalloutError> {
        let t = self.inner.grpc(call)?;
        self.owners.push((t, self.owner));
        Ok(t)
    }
    fn http_detached(&mut self, call: &HttpCall) -> Result<(), CalloutError> {
        self.inner.http_detached(call)
    }
    fn grpc_detached(&mut self, call: &GrpcCall) -> Result<(), CalloutError> {
        self.inner.grpc_detached(call)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    RequestHeaders,
    RequestBody,
    ResponseHeaders,
}

/// Runs stages in order as one stage.
pub struct Chain {
    stages: Vec<Box<dyn Stage>>,
    memory: MemoryState,
    owners: Vec<(u32, usize)>,
    /// Stages that asked for the request body, and whether any holds headers.
    wants_body: Vec<bool>,
    hold_request: bool,
    /// Stages that asked for the whole response body.
    wants_response: Vec<bool>,
    hold_response: bool,
    /// The stage that answered the request itself.
    replied_by: Option<usize>,
    waiting: Option<(Phase, usize)>,
    request_end_of_stream: bool,
}

/// Runs `$call` on stage `$i` with the chain's view of the environment.
macro_rules! on {
    ($self:ident, $env:ident, $i:expr, |$stage:ident, $e:ident| $call:expr) => {{
        let i = $i;
        let mut state = Layered {
            memory: &mut $self.memory,
            host: &mut *$env.state,
        };
        let mut calls = Owned {
            inner: &mut *$env.callouts,
            owner: i,
            owners: &mut $self.owners,
        };
        let $e = &mut Env {
            clock: $env.clock,
            state: &mut state,
            metrics: &mut *$env.metrics,
            shared: &mut *$env.shared,
            callouts: &mut calls,
        };
        let $stage = &mut $self.stages[i];
        $call
    }};
}

impl Chain {
    pub fn new(stages: Vec<Box<dyn Stage>>) -> Chain {
        let n = stages.len();
        Chain {
            stages,
            memory: MemoryState::default(),
            owners: Vec::new(),
            wants_body: vec![false; n],
            hold_request: false,
            wants_response: vec![false; n],
            hold_response: false,
            replied_by: None,
            waiting: None,
            request_end_of_stream: false,
        }
    }

    /// The stages above the one that answered, or all of them.
    fn upper(&self) -> usize {
        self.replied_by.map_or(self.stages.len(), |k| k)
    }

    fn headers_from(&mut self, env: &mut Env<'_>, from: usize, headers: &mut Headers) -> Step {
        let eos = self.request_end_of_stream;
        for i in from..self.stages.len() {
            match on!(self, env, i, |s, e| s.request_headers(e, headers, eos)) {
                Step::Continue => {}
                Step::ReadBody { hold_headers } => {
                    self.wants_body[i] = true;
                    self.hold_request |= hold_headers;
                }
                Step::Reply(r) => {
                    self.replied_by = Some(i);
                    return Step::Reply(r);
                }
                Step::Wait => {
                    self.waiting = Some((Phase::RequestHeaders, i));
                    return Step::Wait;
                }
            }
        }
        if self.wants_body.iter().any(|w| *w) {
            Step::ReadBody {
                hold_headers: self.hold_request,
            }
        } else {
            Step::Continue
        }
    }

    fn bodies_from(
        &mut self,
        env: &mut Env<'_>,
        from: usize,
        body: &mut RequestBody,
        headers: &mut Headers,
    ) -> Step {
        for i in from..self.stages.len() {
            if !self.wants_body[i] {
                continue;
            }
            match on!(self, env, i, |s, e| s.request_body(e, body, headers)) {
                Step::Continue | Step::ReadBody { .. } => {}
                Step::Reply(r) => {
                    self.replied_by = Some(i);
                    return Step::Reply(r);
                }
                Step::Wait => {
                    self.waiting = Some((Phase::RequestBody, i));
                    return Step::Wait;
                }
            }
        }
        Step::Continue
    }

    /// Response headers from stage `below` upwards (exclusive), bottom to top.
    fn response_headers_below(
        &mut self,
        env: &mut Env<'_>,
        below: usize,
        headers: &mut Headers,
        end_of_stream: bool,
    ) -> Step {
        for i in (0..below).rev() {
            match on!(self, env, i, |s, e| s.response_headers(
                e,
                headers,
                end_of_stream
            )) {
                Step::Continue => {}
                Step::ReadBody { hold_headers } => {
                    self.wants_response[i] = true;
                    self.hold_response |= hold_headers;
                }
                Step::Reply(r) => return Step::Reply(r),
                Step::Wait => {
                    self.waiting = Some((Phase::ResponseHeaders, i));
                    return Step::Wait;
                }
            }
        }
        if self.wants_response.iter().any(|w| *w) {
            Step::ReadBody {
                hold_headers: self.hold_response,
            }
        } else {
            Step::Continue
        }
    }
}

impl Stage for Chain {
    fn request_headers(
        &mut self,
        env: &mut Env<'_>,
        headers: &mut Headers,
        end_of_stream: bool,
    ) -> Step {
        self.request_end_of_stream = end_of_stream;
        self.headers_from(env, 0, headers)
    }

    fn request_body(
        &mut self,
        env: &mut Env<'_>,
        body: &mut RequestBody,
        headers: &mut Headers,
    ) -> Step {
        self.bodies_from(env, 0, body, headers)
    }

    fn response_headers(
        &mut self,
        env: &mut Env<'_>,
        headers: &mut Headers,
        end_of_stream: bool,
    ) -> Step {
        let upper = self.upper();
        self.response_headers_below(env, upper, headers, end_of_stream)
    }

    fn response_body(&mut self, env: &mut Env<'_>, chunk: &mut Chunk, end_of_stream: bool) -> Step {
        for i in (0..self.upper()).rev() {
            on!(self, env, i, |s, e| s.response_body(
                e,
                chunk,
                end_of_stream
            ));
        }
        Step::Continue
    }

    fn on_callout(
        &mut self,
        env: &mut Env<'_>,
        token: u32,
        response: &CalloutResponse,
        headers: &mut Headers,
    ) -> Step {
        let Some(owner) = self
            .owners
            .iter()
            .position(|(t, _)| *t == token)
            .map(|p| self.owners.remove(p).1)
        else {
            return Step::Wait;
        };
        let step = on!(self, env, owner, |s, e| s
            .on_callout(e, token, response, headers));
        let Some((phase, at)) = self.waiting else {
            return step;
        };
        if at != owner {
            return Step::Wait;
        }
        match step {
            Step::Wait => Step::Wait,
            Step::Reply(r) => {
                self.waiting = None;
                if phase != Phase::ResponseHeaders {
                    self.replied_by = Some(owner);
                }
                Step::Reply(r)
            }
            Step::ReadBody { hold_headers } if phase == Phase::RequestHeaders => {
                self.waiting = None;
                self.wants_body[owner] = true;
                self.hold_request |= hold_headers;
                self.headers_from(env, owner + 1, headers)
            }
            _ => {
                self.waiting = None;
                match phase {
                    Phase::RequestHeaders => self.headers_from(env, owner + 1, headers),
                    // The body was read and handed on before the wait; the
                    // stages after this one read it from their own copy of
                    // the facts, and the shell has already written it back.
                    Phase::RequestBody => Step::Continue,
                    Phase::ResponseHeaders => {
                        self.response_headers_below(env, owner, headers, false)
                    }
                }
            }
        }
    }

    fn log(&mut self, env: &mut Env<'_>, input: &dyn LogInput) {
        // Top to bottom, as Envoy runs the separate filters' log phases:
        // the meter (the first stage) publishes the usage that the stages
        // below it settle to (rate-limit refunds a reservation to it, a
        // client that hung up included), and composes the access-log line
        // from the facts they set before the log phase.
        for i in 0..self.stages.len() {
            on!(self, env, i, |s, e| s.log(e, input));
        }
    }

    fn max_body(&self) -> usize {
        self.stages
            .iter()
            .zip(&self.wants_body)
            .filter(|(_, w)| **w)
            .map(|(s, _)| s.max_body())
            .min()
            .unwrap_or(crate::stage::DEFAULT_MAX_BODY)
    }

    fn wants_response_body(&self) -> bool {
        self.stages[..self.upper()]
            .iter()
            .any(|s| s.wants_response_body())
    }

    fn holding(&self) -> bool {
        self.stages[..self.upper()].iter().any(|s| s.holding())
    }

    /// The status the topmost stage that replaced the answer gave it: it
    /// is the last to see the answer, as the outermost filter is.
    fn response_status(&self) -> Option<u16> {
        self.stages[..self.upper()]
            .iter()
            .find_map(|s| s.response_status())
    }

    fn reads_own_reply(&self) -> bool {
        true
    }

    fn reads_response(&self) -> bool {
        self.stages.iter().any(|s| s.reads_response())
    }

    fn logs(&self) -> bool {
        self.stages.iter().any(|s| s.logs())
    }
}

/// The stages the bundle runs, in chain order: the field, the configuration
/// key (the filter's name with `_`), the filter type. One line per stage;
/// the macro writes the rest (configuration, stages, timer, start).
macro_rules! bundle {
    ($($field:ident: $key:literal => $filter:ty),* $(,)?) => {
        /// The bundle's configuration: each stage's configuration under its
        /// name, parsed by that stage's own code; a stage left out is off.
        pub struct Bundle {
            $($field: Option<Rc<$filter>>,)*
        }

        /// The stages the bundle knows, in chain order, by their configuration key.
        pub const STAGES: &[&str] = &[$($key),*];

        impl Filter for Bundle {
            type Stage = Chain;
            const NAME: &'static str = "gateway";

            fn from_config(bytes: &[u8]) -> Result<Self, ConfigError> {
                let doc: serde_json::Map<String, serde_json::Value> = config::parse(bytes)?;
                if let Some(unknown) = doc.keys().find(|k| !STAGES.contains(&k.as_str())) {
                    return Err(ConfigError::new(
                        unknown.as_str(),
                        format!("unknown stage; expected one of {}", STAGES.join(", ")),
                    ));
                }
                Ok(Bundle {
                    $($field: compile::<$filter>($key, &doc)?,)*
                })
            }

            fn stage(bundle: &Rc<Self>) -> Chain {
                let mut stages: Vec<Box<dyn Stage>> = Vec::new();
                $(if let Some(f) = &bundle.$field {
                    stages.push(Box::new(<$filter>::stage(f)));
                })*
                Chain::new(stages)
            }

            /// The shortest period any stage asks for; each stage's tick
            /// keeps its own pace (rate-limit sweeps once a minute whatever
            /// it is called at; the meter flushes its counters each time).
            fn tick_ms(&self) -> Option<u64> {
                [$(self.$field.as_ref().and_then(|f| f.tick_ms())),*]
                    .into_iter()
                    .flatten()
                    .min()
            }

            fn tick(&self, env: &mut RootEnv<'_>) {
                $(if let Some(f) = &self.$field {
                    f.tick(env);
                })*
            }

            fn start(&self, env: &mut RootEnv<'_>) {
                $(if let Some(f) = &self.$field {
                    f.start(env);
                })*
            }
        }
    };
}

bundle! {
    meter: "token_meter" => crate::meter::Meter,
    screen: "content_screen" => crate::screen::Screen,
    rate_limit: "rate_limit" => crate::ratelimit::RateLimit,
    cache: "prompt_cache" => crate::cache::Cache,
    // Last, right before Envoy's router, as in gateway.yaml.
    router: "model_router" => crate::router::Router,
}

fn compile<F: Filter>(
    key: &str,
    doc: &serde_json::Map<String, serde_json::Value>,
) -> Result<Option<Rc<F>>, ConfigError> {
    let Some(v) = doc.get(key) else {
        return Ok(None);
    };
    let bytes = serde_json::to_vec(v).map_err(|e| ConfigError::new(key, e.to_string()))?;
    let filter = F::from_config(&bytes).map_err(|e| {
        let field = if e.field == "." {
            key.to_string()
        } else {
            format!("{key}.{}", e.field)
        };
        ConfigError::new(field, e.reason)
    })?;
    Ok(Some(Rc::new(filter)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exchange::{no_service, Exchange, Host};
    use crate::stage::Reply;

    /// Notes what it saw; answers 403 when the request has `x-deny`.
    #[derive(Default)]
    struct Probe {
        name: &'static str,
        saw_response: bool,
        seen_body: Option<usize>,
    }

    impl Stage for Probe {
        fn request_headers(&mut self, env: &mut Env<'_>, h: &mut Headers, _: bool) -> Step {
            h.set(&format!("x-{}", self.name), "1");
            env.state.set(&format!("aigw.probe.{}", self.name), b"x");
            if h.get("x-deny").is_some_and(|v| v == self.name) {
                return Step::Reply(Reply::error(403, "denied", "denied", self.name));
            }
            Step::ReadBody {
                hold_headers: false,
            }
        }
        fn request_body(&mut self, _: &mut Env<'_>, b: &mut RequestBody, _: &mut Headers) -> Step {
            self.seen_body = Some(b.bytes().len());
            Step::Continue
        }
        fn response_headers(&mut self, _: &mut Env<'_>, h: &mut Headers, _: bool) -> Step {
            self.saw_response = true;
            let order = h.get("x-order").unwrap_or("").to_string();
            h.set("x-order", format!("{order}{}", self.name));
            Step::Continue
        }
    }

    fn chain(names: &[&'static str]) -> Chain {
        Chain::new(
            names
                .iter()
                .map(|n| {
                    Box::new(Probe {
                        name: n,
                        ..Probe::default()
                    }) as Box<dyn Stage>
                })
                .collect(),
        )
    }

    #[test]
    fn requests_go_down_answers_come_up() {
        let mut c = chain(&["a", "b", "c"]);
        let mut host = Host::default();
        let out = host.run(
            &mut c,
            &Exchange::post("/v1/chat/completions", "{}"),
            &mut no_service,
        );
        let up = out.upstream.unwrap();
        assert_eq!(up.headers.get("x-c"), Some("1"));
        assert_eq!(out.client_headers.get("x-order"), Some("cba"));
        // Facts stay in memory; nothing but the exported ones reach the host.
        assert!(out.state.values.is_empty(), "{:?}", out.state.values);
    }

    #[test]
    fn aigw_facts_are_read_from_memory_only() {
        let mut host = crate::boundary::FakeFilterState::default()
            .with("aigw.consumer", "outside")
            .with("other.key", "v");
        let mut memory = MemoryState::default();
        let mut layered = Layered {
            memory: &mut memory,
            host: &mut host,
        };
        assert_eq!(layered.get("aigw.consumer"), None);
        assert_eq!(layered.get("other.key"), Some(b"v".to_vec()));
        layered.set("aigw.consumer", b"inside");
        layered.set(facts::ACCESS_LOG, b"{}");
        assert_eq!(layered.get("aigw.consumer"), Some(b"inside".to_vec()));
        // A fact written again says the last value, once.
        layered.set("aigw.consumer", b"again");
        assert_eq!(layered.get("aigw.consumer"), Some(b"again".to_vec()));
        assert_eq!(host.text(facts::ACCESS_LOG), Some("{}"));
        assert_eq!(host.text("aigw.consumer"), Some("outside"));
        assert_eq!(memory.values.len(), 2);
    }

    #[test]
    fn json_facts_are_kept_as_values_and_read_as_bytes_on_demand() {
        let mut host = crate::boundary::FakeFilterState::default();
        let mut memory = MemoryState::default();
        let mut layered = Layered {
            memory: &mut memory,
            host: &mut host,
        };
        let route = facts::Route {
            target: "fast".into(),
            reason: "alias:fast".into(),
            model: Some("gpt-4o-mini".into()),
            ..facts::Route::default()
        };
        facts::put_route(&mut layered, route.clone());
        assert!(layered.kept(facts::ROUTE).is_some());
        assert_eq!(facts::route(&layered), Some(route.clone()));
        // The bytes are the ones a separate filter writes to filter state.
        let mut separate = crate::boundary::FakeFilterState::default();
        facts::put_route(&mut separate, route.clone());
        assert_eq!(
            layered.get(facts::ROUTE),
            separate.values.get(facts::ROUTE).cloned()
        );
        // Bytes written over a kept value win, and are read as bytes.
        layered.set(facts::ROUTE, br#"{"target":"t","reason":"r"}"#);
        assert!(layered.kept(facts::ROUTE).is_none());
        assert_eq!(facts::route(&layered).map(|r| r.target), Some("t".into()));
        // A kept fact of an exported key reaches Envoy as bytes.
        assert!(layered.keep(facts::ACCESS_LOG, Box::new(7u32)));
        assert_eq!(host.text(facts::ACCESS_LOG), Some("7"));
        assert!(!host.values.contains_key(facts::ROUTE));
    }

    #[test]
    fn a_reply_passes_back_only_through_the_stages_above() {
        let mut c = chain(&["a", "b", "c"]);
        let ex = Exchange::post("/v1/chat/completions", "{}").header("x-deny", "b");
        let out = Host::default().run(&mut c, &ex, &mut no_service);
        assert!(out.upstream.is_none());
        assert_eq!(out.client_status, 403);
        assert_eq!(c.replied_by, Some(1));
        // Only the stage above the one that answered sees the answer.
        assert_eq!(out.client_headers.get("x-order"), Some("a"));
    }

    #[test]
    fn configuration_names_the_stage_and_field() {
        let err = Bundle::from_config(br#"{"token_meter":{"consumer_heder":"x"}}"#)
            .err()
            .unwrap();
        assert_eq!(err.field, "token_meter.consumer_heder");
        let err = Bundle::from_config(br#"{"nope":{}}"#).err().unwrap();
        assert_eq!(err.field, "nope");
        assert!(Bundle::from_config(b"{}").is_ok());
    }
}
