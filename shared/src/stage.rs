//! The one interface every filter's logic has: a stage.
//!
//! A stage sees a request the way Envoy shows it to a filter (request
//! headers, request body, response headers, response body chunks, the log
//! phase) but as plain data, and answers with data: continue, read the body
//! first, replace these bytes, set these headers. A plugin shell translates
//! host callbacks into these calls and applies the answers; because every
//! filter has the same shape, one shell can also run several stages in one VM
//! with one context per request (the bundle DESIGN.md describes), sharing
//! facts in memory instead of through filter state.

use crate::boundary::{Clock, FilterState, Metrics};

/// Headers as the host gave them (names lower-case, as Envoy stores them).
#[derive(Clone, Debug, Default)]
pub struct Headers {
    pairs: Vec<(String, String)>,
}

impl Headers {
    pub fn new(pairs: Vec<(String, String)>) -> Self {
        Headers { pairs }
    }
    pub fn get(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Header changes a stage asks for; the shell applies them in one go.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeaderEdits {
    pub set: Vec<(String, String)>,
    pub remove: Vec<String>,
}

impl HeaderEdits {
    pub fn set(&mut self, name: &str, value: impl Into<String>) {
        self.set.push((name.to_string(), value.into()));
    }
    pub fn remove(&mut self, name: &str) {
        self.remove.push(name.to_string());
    }
}

/// What to do after the request headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Buffer the request body and call `request_body` with all of it. With
    /// `hold_headers` the headers wait too, because the stage may edit them
    /// once it has read the body (Envoy needs
    /// `allow_on_headers_stop_iteration: true` for this).
    ReadBody {
        hold_headers: bool,
    },
}

/// What to do with a body, or a piece of one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Body {
    Unchanged,
    Replace(Vec<u8>),
}

/// What the host knows when the request is over.
#[derive(Clone, Debug, Default)]
pub struct LogInput {
    pub request_id: Option<String>,
    /// The status the client got (a local reply's too).
    pub status: Option<u16>,
    /// Envoy's own measure of the request's duration.
    pub duration_ms: Option<u64>,
    /// The route Envoy matched.
    pub route_name: Option<String>,
}

/// The host services a stage may use during a callback.
pub struct Env<'a> {
    pub clock: &'a dyn Clock,
    pub state: &'a mut dyn FilterState,
    pub metrics: &'a mut dyn Metrics,
}

/// One filter's logic for one request.
pub trait Stage {
    fn request_headers(
        &mut self,
        env: &mut Env<'_>,
        headers: &Headers,
        edits: &mut HeaderEdits,
        end_of_stream: bool,
    ) -> Flow;
    /// The whole request body (only after `Flow::ReadBody`). `truncated` when
    /// it grew past the limit the stage gave: it is then not read, and `body`
    /// is empty.
    fn request_body(
        &mut self,
        env: &mut Env<'_>,
        body: &[u8],
        truncated: bool,
        edits: &mut HeaderEdits,
    ) -> Body;
    fn response_headers(&mut self, env: &mut Env<'_>, headers: &Headers, edits: &mut HeaderEdits);
    fn response_chunk(&mut self, env: &mut Env<'_>, chunk: &[u8], end_of_stream: bool) -> Body;
    fn log(&mut self, env: &mut Env<'_>, input: &LogInput);
    /// The largest request body the stage wants to read whole.
    fn max_request_body(&self) -> usize;
    /// Whether `response_chunk` needs the bytes; when false the shell does not
    /// copy them out of the host (it still reports the end of the stream).
    fn wants_response_body(&self) -> bool {
        true
    }
}
