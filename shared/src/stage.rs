//! The one interface every filter's logic has: a stage.
//!
//! A stage sees a request the way Envoy shows it to a filter (request
//! headers, request body, response headers, response body, the log phase) but
//! as plain data, and answers each step with a [`Step`]: go on, read the
//! whole body first, answer the request here ([`Reply`]: a 429, a cache hit,
//! a block), or wait for a callout it dispatched through [`Env::callouts`]
//! (a rate limit service, a cache tier, a moderation API), whose answer comes
//! back through [`Stage::on_callout`]. Header and body changes are made on the
//! data itself ([`Headers::set`], [`RequestBody::replace`], [`Chunk::set`]);
//! the shell applies them in one go.
//!
//! Because every filter has this shape, a plugin shell is the same few lines
//! for each, [`exchange`](crate::exchange) runs any stage through a request in
//! unit tests, and one shell can run several stages in one VM with one
//! context per request (the bundle DESIGN.md describes), sharing facts in
//! memory instead of through filter state. VM-wide work (flushing counters,
//! housekeeping) runs on a timer tick through [`Filter::tick`].

use crate::boundary::{Callouts, Clock, FilterState, Metrics, SharedData};
use crate::config::ConfigError;
use crate::metrics::Registry;
use crate::presence::{Presence, Writer};
use crate::wire::request::{self, RequestFacts};
use std::cell::RefCell;
use std::rc::Rc;

/// Headers as the host gave them (names lower-case, as Envoy stores them),
/// with the changes a stage made, which the shell applies in one go. Reads
/// see the changes, so a later stage in the same VM sees what an earlier one
/// set.
#[derive(Clone, Debug, Default)]
pub struct Headers {
    pairs: Vec<(String, String)>,
    edits: Vec<Edit>,
    /// The pairs are a whole map as the host gave it (not the empty default
    /// a stage gets where there was none), so they may replace it.
    whole: bool,
}

/// One header change, in the order it was made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Edit {
    /// Replace every value of the header with this one.
    Set(String, String),
    Remove(String),
}

impl Headers {
    pub fn new(pairs: Vec<(String, String)>) -> Self {
        Headers {
            pairs,
            edits: Vec::new(),
            whole: true,
        }
    }

    /// Headers whose values were read lossily (a value that is not UTF-8,
    /// as HTTP's obs-text allows): they are never handed back as a whole
    /// map, which would replace the bytes that came with the lossy text.
    pub fn lossy(pairs: Vec<(String, String)>) -> Self {
        Headers {
            whole: false,
            ..Headers::new(pairs)
        }
    }

    /// Whether the pairs, edits included, are the whole map: then the shell
    /// may hand them to the host as one replaced map instead of edit by edit.
    pub fn is_whole(&self) -> bool {
        self.whole
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.pairs.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Sets a header, replacing every value it had. Setting the one value
    /// it already has changes nothing and costs the shell no host call
    /// (two stages asking for `accept-encoding: identity`, a consumer
    /// header the client already sent right).
    pub fn set(&mut self, name: &str, value: impl Into<String>) {
        let value = value.into();
        // One scan says whether the header is there, and with what: the
        // usual new header (a rate-limit header, the cache status) is then
        // pushed without a second pass over the map.
        let (mut found, mut same) = (0, false);
        for (k, v) in &self.pairs {
            if k.eq_ignore_ascii_case(name) {
                found += 1;
                same = *v == value;
            }
        }
        if found == 1 && same {
            return;
        }
        if found > 0 {
            self.pairs.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
        }
        self.pairs.push((name.to_string(), value.clone()));
        self.edits.push(Edit::Set(name.to_string(), value));
    }

    /// Removes every value of a header. Removing one that is not there
    /// changes nothing and costs the shell no host call (the meter and the
    /// screen both drop the length of an answer they may rewrite).
    pub fn remove(&mut self, name: &str) {
        let before = self.pairs.len();
        self.pairs.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
        if self.pairs.len() != before {
            self.edits.push(Edit::Remove(name.to_string()));
        }
    }

    /// The changes made since the last call; the shell applies them.
    pub fn take_edits(&mut self) -> Vec<Edit> {
        std::mem::take(&mut self.edits)
    }

    pub fn edits(&self) -> &[Edit] {
        &self.edits
    }
}

/// What to do after a step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    Continue,
    /// After request headers: buffer the request body and call
    /// [`Stage::request_body`] with all of it. After response headers:
    /// buffer the whole response and call [`Stage::response_body`] once, with
    /// all of it. With `hold_headers` the headers wait too, because the stage
    /// may edit them once it has read the body (for requests Envoy needs
    /// `allow_on_headers_stop_iteration: true`).
    ReadBody {
        hold_headers: bool,
    },
    /// Answer here. On the request path nothing goes upstream; the reply
    /// passes back through the filters above this one.
    Reply(Reply),
    /// Wait for the callouts dispatched through [`Env::callouts`] during this
    /// step; [`Stage::on_callout`] gets each answer (or its failure).
    Wait,
}

/// A local reply: status, headers, body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Why, for Envoy's `%RESPONSE_CODE_DETAILS%` (no spaces).
    pub details: String,
}

impl Reply {
    /// A reply in the OpenAI error shape `{"error":{"message","type","code"}}`,
    /// which OpenAI clients (and most others) already parse.
    pub fn error(status: u16, kind: &str, code: &str, message: &str) -> Reply {
        let body = serde_json::json!({
            "error": { "message": message, "type": kind, "code": code }
        });
        Reply {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: body.to_string().into_bytes(),
            details: format!("aigw_{code}"),
        }
    }

    pub fn with_header(mut self, name: &str, value: impl Into<String>) -> Reply {
        self.headers.push((name.to_string(), value.into()));
        self
    }
}

/// The whole request body, shared by the stages that read it: the facts
/// every filter wants are parsed once, on first use, and a stage that
/// changes the body replaces it here (the shell writes it back once and
/// fixes Content-Length when the headers are held).
#[derive(Clone, Debug, Default)]
pub struct RequestBody {
    bytes: Vec<u8>,
    truncated: bool,
    changed: bool,
    facts: Option<Option<RequestFacts>>,
    /// The body as a JSON document, parsed on first use and shared by every
    /// stage that needs more than the facts (the bundle parses it once).
    json: Document,
}

/// Bytes as a JSON document: parsed on first use, kept while the bytes say
/// what it says. `RequestBody` and `Chunk` share it.
#[derive(Clone, Debug, Default)]
struct Document(Option<Option<serde_json::Value>>);

impl Document {
    /// Known not to be a document (a body that was not read).
    fn none() -> Document {
        Document(Some(None))
    }

    /// The document of `bytes`, parsed now if it was not yet.
    fn get_mut(&mut self, bytes: &[u8]) -> Option<&mut serde_json::Value> {
        self.0
            .get_or_insert_with(|| serde_json::from_slice(bytes).ok())
            .as_mut()
    }

    /// The document written out, if there is one (it may have been changed
    /// in place).
    fn to_bytes(&self) -> Option<Vec<u8>> {
        serde_json::to_vec(self.0.as_ref()?.as_ref()?).ok()
    }

    /// The bytes changed: the document is parsed again if asked.
    fn forget(&mut self) {
        self.0 = None;
    }
}

impl RequestBody {
    pub fn new(bytes: Vec<u8>) -> Self {
        RequestBody {
            bytes,
            ..RequestBody::default()
        }
    }

    /// A body that grew past the limit the stage gave: it was not read.
    pub fn truncated() -> Self {
        RequestBody {
            truncated: true,
            facts: Some(None),
            json: Document::none(),
            ..RequestBody::default()
        }
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn is_truncated(&self) -> bool {
        self.truncated
    }

    /// The request facts, parsed on first use; `None` for a body that is
    /// not a JSON object (or was not read).
    pub fn facts(&mut self) -> Option<&RequestFacts> {
        if self.facts.is_none() {
            self.facts = Some(request::parse(&self.bytes).ok());
        }
        self.facts.as_ref().and_then(Option::as_ref)
    }

    /// The request facts, from wherever they already are: parsed by a stage
    /// of this VM (the bundle), else published by an earlier filter
    /// (`aigw.request`), else parsed now. `true` when they came from
    /// another filter, which then also published the model it names.
    ///
    /// `above` is the caller's record of whether a filter before it
    /// publishes them, `probing` what [`Presence::begin`] said of this
    /// request: where none does (the filter runs alone, or first), the fact
    /// is looked for only while probing, not at the price of a host call on
    /// every request.
    pub fn shared_facts(
        &mut self,
        state: &dyn FilterState,
        above: &Presence,
        probing: bool,
    ) -> (Option<&RequestFacts>, bool) {
        let mut published = false;
        if self.facts.is_none() {
            if let Some(f) = above.look(Writer::Above, probing, || crate::facts::request(state)) {
                self.facts = Some(Some(f));
                published = true;
            }
        }
        (self.facts(), published)
    }

    /// Facts learnt elsewhere (another filter's), so they are not parsed again.
    pub fn set_facts(&mut self, facts: RequestFacts) {
        self.facts = Some(Some(facts));
    }

    /// The body as a JSON document, parsed on first use; `None` for a body
    /// that is not JSON (or was not read).
    pub fn json(&mut self) -> Option<&serde_json::Value> {
        self.json_mut().map(|v| &*v)
    }

    /// The document if a stage parsed it already (`Some(None)`: the body
    /// is not JSON), so a stage that can read the bytes in place reads
    /// the document instead when there is one.
    pub fn parsed_json(&self) -> Option<Option<&serde_json::Value>> {
        self.json.0.as_ref().map(Option::as_ref)
    }

    /// The document, to change in place; [`RequestBody::commit_json`] then
    /// makes the bytes say what it says.
    pub fn json_mut(&mut self) -> Option<&mut serde_json::Value> {
        self.json.get_mut(&self.bytes)
    }

    /// Writes the document changed through [`RequestBody::json_mut`] back
    /// as the body. The document stays (it is what the new bytes say); the
    /// facts are parsed again if asked.
    pub fn commit_json(&mut self) {
        if let Some(bytes) = self.json.to_bytes() {
            self.bytes = bytes;
            self.changed = true;
            self.facts = None;
        }
    }

    /// Replaces the body. What was parsed of it is dropped: the new body may
    /// say something else (a rewritten model, say) and is parsed again if asked.
    pub fn replace(&mut self, bytes: Vec<u8>) {
        self.bytes = bytes;
        self.changed = true;
        self.facts = None;
        self.json.forget();
    }

    pub fn is_changed(&self) -> bool {
        self.changed
    }
}

/// A piece of the response body (or, after [`Step::ReadBody`], all of it).
#[derive(Clone, Debug, Default)]
pub struct Chunk {
    bytes: Vec<u8>,
    changed: bool,
    truncated: bool,
}

impl Chunk {
    pub fn new(bytes: Vec<u8>) -> Self {
        Chunk {
            bytes,
            ..Chunk::default()
        }
    }

    /// A buffered response that grew past the stage's limit: it goes on unread.
    pub fn truncated() -> Self {
        Chunk {
            truncated: true,
            ..Chunk::default()
        }
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn is_truncated(&self) -> bool {
        self.truncated
    }

    /// Replaces the bytes that go on to the client.
    pub fn set(&mut self, bytes: Vec<u8>) {
        if bytes != self.bytes {
            self.bytes = bytes;
            self.changed = true;
        }
    }

    pub fn is_changed(&self) -> bool {
        self.changed
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }
}

/// A callout's answer, or why there is none.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CalloutResponse {
    Http {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// A gRPC answer: `status` 0 is OK (then `message` is the response
    /// message); anything else is the gRPC status code of the failure
    /// (4 deadline exceeded, 14 unavailable, ...).
    Grpc { status: u32, message: Vec<u8> },
    /// No answer: the connection failed or was reset.
    Failed,
}

/// What the host knows when the request is over. Each answer is a host
/// call through Envoy's attribute machinery (about 12,000 instructions,
/// `./scripts/bench.sh --floor --instructions`), so it is read only when a
/// stage asks, and a stage asks only for what it has no better source of.
pub trait LogInput {
    fn request_id(&self) -> Option<String>;
    /// The status the client got (a local reply's too).
    fn status(&self) -> Option<u16>;
    /// Envoy's own measure of the request's duration.
    fn duration_ms(&self) -> Option<u64>;
    /// The route Envoy matched.
    fn route_name(&self) -> Option<String>;
}

/// A [`LogInput`] of given values (tests, and the in-memory host).
#[derive(Clone, Debug, Default)]
pub struct LogValues {
    pub request_id: Option<String>,
    pub status: Option<u16>,
    pub duration_ms: Option<u64>,
    pub route_name: Option<String>,
}

impl LogInput for LogValues {
    fn request_id(&self) -> Option<String> {
        self.request_id.clone()
    }
    fn status(&self) -> Option<u16> {
        self.status
    }
    fn duration_ms(&self) -> Option<u64> {
        self.duration_ms
    }
    fn route_name(&self) -> Option<String> {
        self.route_name.clone()
    }
}

/// The host services a stage may use during a callback.
pub struct Env<'a> {
    pub clock: &'a dyn Clock,
    pub state: &'a mut dyn FilterState,
    pub metrics: &'a mut dyn Metrics,
    pub shared: &'a mut dyn SharedData,
    pub callouts: &'a mut dyn Callouts,
}

/// The host services of the VM-wide part of a filter (its timer tick).
pub struct RootEnv<'a> {
    pub clock: &'a dyn Clock,
    pub metrics: &'a mut dyn Metrics,
    pub shared: &'a mut dyn SharedData,
    pub callouts: &'a mut dyn Callouts,
}

/// Default largest request body a stage reads whole.
pub const DEFAULT_MAX_BODY: usize = 8 << 20;

/// One filter's logic for one request. Every method has a default that does
/// nothing, so a stage implements only the steps it cares about.
pub trait Stage {
    fn request_headers(
        &mut self,
        _env: &mut Env<'_>,
        _headers: &mut Headers,
        _end_of_stream: bool,
    ) -> Step {
        Step::Continue
    }

    /// The whole request body, after [`Step::ReadBody`] (empty when the
    /// request had none). `headers` are the request headers; changes to them
    /// take effect only while they are held.
    fn request_body(
        &mut self,
        _env: &mut Env<'_>,
        _body: &mut RequestBody,
        _headers: &mut Headers,
    ) -> Step {
        Step::Continue
    }

    fn response_headers(
        &mut self,
        _env: &mut Env<'_>,
        _headers: &mut Headers,
        _end_of_stream: bool,
    ) -> Step {
        Step::Continue
    }

    /// A piece of the response body as it passes (or all of it after
    /// [`Step::ReadBody`]); called once more with an empty chunk and
    /// `end_of_stream` when the response ends without one (a header-only
    /// answer, or one that ends with trailers). Only [`Step::Continue`] is
    /// meaningful here.
    fn response_body(
        &mut self,
        _env: &mut Env<'_>,
        _chunk: &mut Chunk,
        _end_of_stream: bool,
    ) -> Step {
        Step::Continue
    }

    /// A status to give the response instead of the upstream's, asked after
    /// [`Stage::response_body`] read a held response whole (a stage that
    /// replaced the answer, a blocked one say). Only used while the
    /// response headers are held.
    fn response_status(&self) -> Option<u16> {
        None
    }

    /// The answer to a callout this stage dispatched, while it waits.
    /// `headers` are those of the step that waits (request or response).
    fn on_callout(
        &mut self,
        _env: &mut Env<'_>,
        _token: u32,
        _response: &CalloutResponse,
        _headers: &mut Headers,
    ) -> Step {
        Step::Continue
    }

    fn log(&mut self, _env: &mut Env<'_>, _input: &dyn LogInput) {}

    /// The largest body (request, or response after [`Step::ReadBody`]) the
    /// stage wants to read whole.
    fn max_body(&self) -> usize {
        DEFAULT_MAX_BODY
    }

    /// Whether `response_body` needs the bytes; when false the shell does not
    /// copy them out of the host (it still reports the end of the stream).
    fn wants_response_body(&self) -> bool {
        false
    }

    /// Whether the stage looks at the response at all (asked when the
    /// response starts). When false the shell passes it through without a
    /// call into the stage and without copying headers out of the host.
    fn reads_response(&self) -> bool {
        true
    }

    /// Whether the stage has a log phase; when false the shell skips it and
    /// the properties it would read for it.
    fn logs(&self) -> bool {
        true
    }

    /// Whether the stage holds back response bytes that must still reach the
    /// client (a partial event it may rewrite, a window that may still hold a
    /// match). The shell then keeps the chunk in Envoy's buffer for one
    /// callback, so that a response ending in trailers loses nothing.
    fn holding(&self) -> bool {
        false
    }

    /// Whether the stage's response steps run for its own local reply.
    /// Envoy passes a filter's local reply through that filter's own
    /// response callbacks too; a single stage has nothing to read there (a
    /// cache would store its own hit), so the shell skips them, but a stage
    /// that runs others (the bundle) passes the reply to the stages above
    /// the one that answered.
    fn reads_own_reply(&self) -> bool {
        false
    }
}

/// A filter as loaded: its compiled configuration and VM-wide state, which
/// makes a [`Stage`] for each request and may run work on a timer.
pub trait Filter: Sized + 'static {
    type Stage: Stage + 'static;
    /// The filter's name in logs and errors (`token-meter`).
    const NAME: &'static str;

    fn from_config(bytes: &[u8]) -> Result<Self, ConfigError>;

    fn stage(filter: &Rc<Self>) -> Self::Stage;

    /// The filter's metric registry, whose buffered counters the timer
    /// hands to Envoy (the default [`Filter::tick_ms`] and [`Filter::tick`]).
    fn registry(&self) -> Option<&RefCell<Registry>> {
        None
    }

    /// How often [`Filter::tick`] runs, if at all: by default as often as
    /// the registry's counters are to be flushed.
    fn tick_ms(&self) -> Option<u64> {
        crate::metrics::timer_period(self.registry()?)
    }

    /// By default, hands the registry's counters to Envoy.
    fn tick(&self, env: &mut RootEnv<'_>) {
        if let Some(registry) = self.registry() {
            crate::metrics::flush_timer(registry, env.metrics);
        }
    }

    /// Runs once when the configuration is loaded, before the VM sees a
    /// request (creating shared-data keys that must exist before workers race
    /// on them, say).
    fn start(&self, _env: &mut RootEnv<'_>) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_changes_are_seen_and_recorded_in_order() {
        let mut h = Headers::new(vec![
            ("content-length".into(), "10".into()),
            ("x-a".into(), "1".into()),
        ]);
        h.set("x-a", "2");
        h.remove("content-length");
        assert_eq!(h.get("x-a"), Some("2"));
        assert_eq!(h.get("content-length"), None);
        assert_eq!(
            h.take_edits(),
            vec![
                Edit::Set("x-a".into(), "2".into()),
                Edit::Remove("content-length".into())
            ]
        );
        assert!(h.edits().is_empty());
        // A header not there is added; names match in any case.
        h.set("x-new", "v");
        h.set("X-A", "3");
        assert_eq!(
            h.iter().collect::<Vec<_>>(),
            vec![("x-new", "v"), ("X-A", "3")]
        );
        assert_eq!(h.take_edits().len(), 2);
    }

    #[test]
    fn setting_the_value_a_header_has_is_no_edit() {
        let mut h = Headers::new(vec![
            ("accept-encoding".into(), "identity".into()),
            ("x-two".into(), "a".into()),
            ("x-two".into(), "a".into()),
        ]);
        h.set("accept-encoding", "identity");
        assert!(h.edits().is_empty());
        // Two values become one: that is a change.
        h.set("x-two", "a");
        assert_eq!(h.take_edits(), vec![Edit::Set("x-two".into(), "a".into())]);
        assert_eq!(h.iter().filter(|(k, _)| *k == "x-two").count(), 1);
        h.set("accept-encoding", "gzip");
        assert_eq!(h.edits().len(), 1);
        h.take_edits();
        h.remove("content-length");
        assert!(h.edits().is_empty());
        h.remove("x-two");
        h.remove("x-two");
        assert_eq!(h.take_edits(), vec![Edit::Remove("x-two".into())]);
    }

    #[test]
    fn body_facts_are_parsed_once_and_dropped_on_replace() {
        let mut b = RequestBody::new(br#"{"model":"a","stream":true}"#.to_vec());
        assert_eq!(
            b.facts().and_then(|f| f.model.clone()).as_deref(),
            Some("a")
        );
        b.replace(br#"{"model":"b"}"#.to_vec());
        assert!(b.is_changed());
        assert_eq!(
            b.facts().and_then(|f| f.model.clone()).as_deref(),
            Some("b")
        );
        assert!(RequestBody::new(b"not json".to_vec()).facts().is_none());
        assert!(RequestBody::truncated().facts().is_none());
    }

    #[test]
    fn errors_have_the_openai_shape() {
        let r = Reply::error(429, "rate_limit_error", "rate_limit_exceeded", "slow down");
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["error"]["message"], "slow down");
        assert_eq!(v["error"]["type"], "rate_limit_error");
        assert_eq!(v["error"]["code"], "rate_limit_exceeded");
        assert_eq!(r.status, 429);
    }
}
