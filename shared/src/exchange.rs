//! Runs a stage through one request the way the host adapter does, over the
//! in-memory fakes, so that every stage's decisions are tested as a table of
//! exchanges (request in; what the upstream saw and what the client got out)
//! without Envoy and without scripting host calls one by one.
//!
//! It follows `host.rs` step for step: the body is read whole after
//! [`Step::ReadBody`] (or not at all past the stage's limit), header and body
//! changes are applied between steps, Content-Length is fixed while headers
//! are held, a [`Step::Reply`] ends the request there, and a [`Step::Wait`]
//! is answered by the test's responder, one callout at a time, in order.

use crate::boundary::{
    FakeCallouts, FakeClock, FakeFilterState, FakeMetrics, FakeSharedData, Sent,
};
use crate::stage::{
    CalloutResponse, Chunk, Env, Filter, Headers, LogValues, Reply, RequestBody, RootEnv, Stage,
    Step,
};

/// One request and the upstream's answer to it.
#[derive(Clone, Debug)]
pub struct Exchange {
    pub method: String,
    pub path: String,
    pub request_headers: Vec<(String, String)>,
    /// Empty: a request without a body (end of stream at the headers).
    pub request_body: Vec<u8>,
    pub status: u16,
    pub response_headers: Vec<(String, String)>,
    /// The response body as the upstream's pieces.
    pub response_chunks: Vec<Vec<u8>>,
    /// The upstream ended the response (false: cut mid-way).
    pub complete: bool,
    /// The response ends with trailers instead of an end-of-stream body piece.
    pub trailers: bool,
}

impl Exchange {
    /// A POST of a JSON body to `path`, answered 200 with `content-type: application/json` and no body.
    pub fn post(path: &str, body: &str) -> Exchange {
        Exchange {
            method: "POST".into(),
            path: path.into(),
            request_headers: vec![("content-type".into(), "application/json".into())],
            request_body: body.as_bytes().to_vec(),
            status: 200,
            response_headers: vec![("content-type".into(), "application/json".into())],
            response_chunks: Vec::new(),
            complete: true,
            trailers: false,
        }
    }

    pub fn header(mut self, name: &str, value: &str) -> Exchange {
        self.request_headers.push((name.into(), value.into()));
        self
    }

    /// The upstream answers with this status, content type and body pieces.
    pub fn answer(mut self, status: u16, content_type: &str, chunks: Vec<Vec<u8>>) -> Exchange {
        self.status = status;
        self.response_headers = vec![("content-type".into(), content_type.into())];
        self.response_chunks = chunks;
        self
    }
}

/// What the upstream received.
#[derive(Clone, Debug)]
pub struct Upstream {
    pub headers: Headers,
    pub body: Vec<u8>,
}

/// What one exchange left behind.
#[derive(Debug)]
pub struct Outcome {
    /// `None` when the stage answered before anything went upstream.
    pub upstream: Option<Upstream>,
    /// The stage's own reply, if it answered.
    pub reply: Option<Reply>,
    pub client_status: u16,
    pub client_headers: Headers,
    pub client_body: Vec<u8>,
    /// Every callout the stage made, in order (detached ones too).
    pub callouts: Vec<Sent>,
    pub state: FakeFilterState,
}

impl Outcome {
    pub fn client_text(&self) -> String {
        String::from_utf8_lossy(&self.client_body).into_owned()
    }
}

/// The fakes a stage runs against; VM-wide ones (metrics, shared data) carry
/// over from one exchange to the next, as they do in a VM.
#[derive(Debug, Default)]
pub struct Host {
    pub clock: FakeClock,
    pub metrics: FakeMetrics,
    pub shared: FakeSharedData,
    /// Filter state the next exchange starts with (facts other filters left).
    pub next_state: FakeFilterState,
    /// Milliseconds the clock moves between the request and the response.
    pub upstream_ms: u64,
}

/// Answers every callout with a failure (no service there).
pub fn no_service(_: &Sent) -> CalloutResponse {
    CalloutResponse::Failed
}

impl Host {
    pub fn at(ms: u64) -> Host {
        Host {
            clock: FakeClock::at(ms),
            ..Host::default()
        }
    }

    /// What the filter's timer tick does (counters handed to Envoy, sweeps),
    /// against this host's fakes.
    pub fn tick<F: Filter>(&mut self, filter: &F) {
        filter.tick(&mut RootEnv {
            clock: &self.clock,
            metrics: &mut self.metrics,
            shared: &mut self.shared,
            callouts: &mut FakeCallouts::default(),
        });
    }

    pub fn run(
        &mut self,
        stage: &mut dyn Stage,
        ex: &Exchange,
        respond: &mut dyn FnMut(&Sent) -> CalloutResponse,
    ) -> Outcome {
        let mut state = std::mem::take(&mut self.next_state);
        let mut callouts = FakeCallouts::default();
        let mut log = Vec::new();
        let mut run = Run {
            host: self,
            state: &mut state,
            callouts: &mut callouts,
            sent: &mut log,
        };
        let out = run.exchange(stage, ex, respond);
        Outcome {
            state,
            callouts: log,
            ..out
        }
    }
}

struct Run<'a> {
    host: &'a mut Host,
    state: &'a mut FakeFilterState,
    callouts: &'a mut FakeCallouts,
    sent: &'a mut Vec<Sent>,
}

/// Runs one step of a stage with a fresh view of the fakes.
macro_rules! step {
    ($run:ident, |$env:ident| $body:expr) => {{
        let $env = &mut Env {
            clock: &$run.host.clock,
            state: &mut *$run.state,
            metrics: &mut $run.host.metrics,
            shared: &mut $run.host.shared,
            callouts: &mut *$run.callouts,
        };
        $body
    }};
}

impl Run<'_> {
    /// Answers the callouts of a waiting step until the stage stops waiting.
    fn settle(
        &mut self,
        stage: &mut dyn Stage,
        mut step: Step,
        headers: &mut Headers,
        respond: &mut dyn FnMut(&Sent) -> CalloutResponse,
    ) -> Step {
        let mut rounds = 0;
        while step == Step::Wait && rounds < 64 {
            rounds += 1;
            let waiting = self.callouts.take_waiting();
            self.note_detached();
            if waiting.is_empty() {
                // As the host does: a wait with nothing in flight goes on.
                return Step::Continue;
            }
            let mut next = Step::Wait;
            for (token, sent) in waiting {
                self.sent.push(sent.clone());
                let answer = respond(&sent);
                next = step!(self, |env| stage.on_callout(env, token, &answer, headers));
                if next != Step::Wait {
                    break;
                }
            }
            step = next;
        }
        self.note_detached();
        step
    }

    fn note_detached(&mut self) {
        for (_, sent) in std::mem::take(&mut self.callouts.sent) {
            self.sent.push(sent);
        }
    }

    fn replied(
        &mut self,
        stage: &mut dyn Stage,
        reply: Reply,
        upstream: Option<Upstream>,
    ) -> Outcome {
        let mut pairs = vec![(":status".to_string(), reply.status.to_string())];
        pairs.extend(reply.headers.iter().cloned());
        let mut headers = Headers::new(pairs);
        let mut body = reply.body.clone();
        // As Envoy does, the reply passes through the stage's own response
        // steps; only a stage that runs others (the bundle) reads them.
        if stage.reads_own_reply() {
            step!(self, |env| stage.response_headers(env, &mut headers, false));
            let mut chunk = Chunk::new(body.clone());
            step!(self, |env| stage.response_body(env, &mut chunk, true));
            body = chunk.into_bytes();
            headers.take_edits();
        }
        self.log(stage, reply.status);
        Outcome {
            upstream,
            client_status: reply.status,
            client_headers: headers,
            client_body: body,
            reply: Some(reply),
            callouts: Vec::new(),
            state: FakeFilterState::default(),
        }
    }

    fn log(&mut self, stage: &mut dyn Stage, status: u16) {
        if !stage.logs() {
            return;
        }
        let input = LogValues {
            request_id: Some("req-1".into()),
            status: Some(status),
            duration_ms: None,
            route_name: Some("llm".into()),
        };
        step!(self, |env| stage.log(env, &input));
        self.note_detached();
    }

    fn exchange(
        &mut self,
        stage: &mut dyn Stage,
        ex: &Exchange,
        respond: &mut dyn FnMut(&Sent) -> CalloutResponse,
    ) -> Outcome {
        let mut pairs = vec![
            (":method".to_string(), ex.method.clone()),
            (":path".to_string(), ex.path.clone()),
            (":authority".to_string(), "aigw.test".to_string()),
        ];
        pairs.extend(ex.request_headers.iter().cloned());
        if !ex.request_body.is_empty() {
            pairs.push(("content-length".into(), ex.request_body.len().to_string()));
        }
        let mut headers = Headers::new(pairs);
        let no_body = ex.request_body.is_empty();
        let first = step!(self, |env| stage.request_headers(
            env,
            &mut headers,
            no_body
        ));
        let mut step = self.settle(stage, first, &mut headers, respond);
        let mut body = ex.request_body.clone();
        if let Step::ReadBody { hold_headers } = step {
            let mut rb = if body.len() > stage.max_body() {
                RequestBody::truncated()
            } else {
                RequestBody::new(body.clone())
            };
            let s = step!(self, |env| stage.request_body(env, &mut rb, &mut headers));
            if rb.is_changed() {
                body = rb.bytes().to_vec();
                if hold_headers {
                    headers.set("content-length", body.len().to_string());
                }
            }
            step = self.settle(stage, s, &mut headers, respond);
        }
        if let Step::Reply(r) = step {
            return self.replied(stage, r, None);
        }
        headers.take_edits();
        let upstream = Upstream {
            headers: headers.clone(),
            body,
        };

        self.host.clock.advance(self.host.upstream_ms);
        let mut pairs = vec![(":status".to_string(), ex.status.to_string())];
        pairs.extend(ex.response_headers.iter().cloned());
        let mut rh = Headers::new(pairs);
        if !stage.reads_response() {
            // As the host does: the response passes without the stage.
            self.log(stage, ex.status);
            return Outcome {
                upstream: Some(upstream),
                reply: None,
                client_status: ex.status,
                client_headers: rh,
                client_body: ex.response_chunks.concat(),
                callouts: Vec::new(),
                state: FakeFilterState::default(),
            };
        }
        let header_only = ex.response_chunks.is_empty() && ex.complete && !ex.trailers;
        let s = step!(self, |env| stage.response_headers(
            env,
            &mut rh,
            header_only
        ));
        let s = self.settle(stage, s, &mut rh, respond);
        let mut client_body = Vec::new();
        match s {
            Step::Reply(r) => return self.replied(stage, r, Some(upstream)),
            Step::ReadBody { hold_headers } => {
                let whole: Vec<u8> = ex.response_chunks.concat();
                let mut chunk = if whole.len() > stage.max_body() {
                    Chunk::truncated()
                } else {
                    Chunk::new(whole.clone())
                };
                step!(self, |env| stage.response_body(env, &mut chunk, true));
                if chunk.is_changed() {
                    if hold_headers {
                        rh.set("content-length", chunk.bytes().len().to_string());
                    }
                    client_body = chunk.into_bytes();
                } else {
                    client_body = whole;
                }
                if let (true, Some(status)) = (hold_headers, stage.response_status()) {
                    rh.set(":status", status.to_string());
                }
            }
            _ => {
                if header_only {
                    step!(self, |env| stage.response_body(
                        env,
                        &mut Chunk::default(),
                        true
                    ));
                }
                let n = ex.response_chunks.len();
                for (i, piece) in ex.response_chunks.iter().enumerate() {
                    let last = i + 1 == n && ex.complete && !ex.trailers;
                    let wants = stage.wants_response_body();
                    let mut chunk = Chunk::new(if wants { piece.clone() } else { Vec::new() });
                    step!(self, |env| stage.response_body(env, &mut chunk, last));
                    if chunk.is_changed() {
                        client_body.extend_from_slice(chunk.bytes());
                    } else {
                        client_body.extend_from_slice(piece);
                    }
                }
                if ex.trailers && ex.complete {
                    let mut chunk = Chunk::default();
                    step!(self, |env| stage.response_body(env, &mut chunk, true));
                    client_body.extend_from_slice(chunk.bytes());
                } else if ex.complete && n == 0 && !header_only {
                    step!(self, |env| stage.response_body(
                        env,
                        &mut Chunk::default(),
                        true
                    ));
                }
            }
        }
        let status = rh
            .get(":status")
            .and_then(|s| s.parse().ok())
            .unwrap_or(ex.status);
        rh.take_edits();
        self.log(stage, status);
        Outcome {
            upstream: Some(upstream),
            reply: None,
            client_status: status,
            client_headers: rh,
            client_body,
            callouts: Vec::new(),
            state: FakeFilterState::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boundary::HttpCall;

    /// Asks a service whether to let the request through; a 200 says yes.
    struct Gate {
        answered: Option<CalloutResponse>,
    }

    impl Stage for Gate {
        fn request_headers(&mut self, env: &mut Env<'_>, _: &mut Headers, _: bool) -> Step {
            let call = HttpCall {
                cluster: "gate".into(),
                headers: vec![(":path".into(), "/check".into())],
                ..HttpCall::default()
            };
            match env.callouts.http(&call) {
                Ok(_) => Step::Wait,
                Err(_) => Step::Continue,
            }
        }
        fn on_callout(
            &mut self,
            _: &mut Env<'_>,
            _: u32,
            response: &CalloutResponse,
            headers: &mut Headers,
        ) -> Step {
            self.answered = Some(response.clone());
            match response {
                CalloutResponse::Http { status: 200, .. } => {
                    headers.set("x-gate", "open");
                    Step::Continue
                }
                _ => Step::Reply(Reply::error(403, "forbidden", "gate_closed", "closed")),
            }
        }
    }

    #[test]
    fn a_waiting_stage_gets_its_answer_and_decides() {
        let ex = Exchange::post("/v1/chat/completions", "{}");
        let ok = |_: &Sent| CalloutResponse::Http {
            status: 200,
            headers: vec![],
            body: vec![],
        };
        let mut host = Host::default();
        let mut gate = Gate { answered: None };
        let out = host.run(&mut gate, &ex, &mut { ok });
        assert_eq!(out.upstream.unwrap().headers.get("x-gate"), Some("open"));
        assert_eq!(out.callouts.len(), 1);

        let mut gate = Gate { answered: None };
        let out = host.run(&mut gate, &ex, &mut no_service);
        assert!(out.upstream.is_none());
        assert_eq!(out.client_status, 403);
        assert_eq!(gate.answered, Some(CalloutResponse::Failed));
    }
}
