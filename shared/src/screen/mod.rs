//! The content-screen stage: PII, secrets, prompt injection and denied terms,
//! in prompts and in answers (streamed ones included), and context budgets.
//!
//! It decides, for each request: whether it is within the budget (body
//! bytes, messages, estimated prompt tokens); whether any screened text
//! (the messages of the configured roles, not the JSON around them) holds a
//! value a detector blocks, redacts or only logs; and the same for the
//! answer. A block on the request is a 400 `content_filter` error naming the
//! detectors; a redaction rewrites the body (the headers are held so the
//! shell fixes Content-Length). A non-streamed answer is read whole before
//! the client sees a byte; a streamed one is rewritten event by event, with
//! the text of each event's delta replaced by what is final so far: only the
//! tail that could still start a match is held back (see `detect.rs`), so a
//! value split across any chunk or event boundary is still caught, memory is
//! bounded, and the SSE framing is kept. A block mid-stream ends the stream
//! with an error event in the provider's own format. An optional external
//! moderation service is asked about the (already redacted) prompt through
//! a callout, with a timeout and a failure mode (`moderation.rs`).
//!
//! Nothing matched is ever logged, put in a header or a metric label: the
//! verdict (`aigw.screen`), the metrics and the errors carry detector names
//! and counts only.

pub mod body;
pub mod config;
pub mod detect;
pub mod inject;
pub mod moderation;
pub mod stream;
pub mod text;

use crate::config::ConfigError;
use crate::facts;
use crate::metrics::Registry;
use crate::stage::{
    CalloutResponse, Chunk, Env, Filter, Headers, LogInput, Reply, RequestBody, Stage, Step,
    DEFAULT_MAX_BODY,
};
use crate::wire::api::{self, Api};
use crate::wire::usage::estimate_tokens;
use crate::wire::walk::Walked;
use config::{Compiled, Redaction};
use detect::{Action, Found};
use moderation::{FailureMode, Verdict};
use serde_json::Value;
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use stream::SseScreen;
use text::Normalized;

/// Metric names.
pub mod metric {
    /// Values found, by detector, action and direction.
    pub const FINDINGS: &str = "aigw_screen_findings_total";
    /// Requests by verdict (`screen` label: pass, redact, block).
    pub const REQUESTS: &str = "aigw_screen_requests_total";
}

/// The loaded filter: compiled detectors and the metric registry.
#[derive(Debug)]
pub struct Screen {
    pub c: Compiled,
    registry: RefCell<Registry>,
}

impl Screen {
    pub fn from_json(bytes: &[u8]) -> Result<Screen, ConfigError> {
        let c = Compiled::from_json(bytes)?;
        let registry = RefCell::new(Registry::flushed_every(
            c.metrics_flush_ms,
            c.max_metric_series,
        ));
        Ok(Screen { c, registry })
    }

    /// Screens one whole text; the redacted text when it changed.
    pub fn screen_text(&self, original: &str, dir: Direction, tally: &mut Tally) -> Option<String> {
        if self.c.scanner.is_empty() || original.is_empty() {
            return None;
        }
        self.screen_normalized(original, &Normalized::new(original), dir, tally)
    }

    /// As [`Screen::screen_text`], with the text already normalised.
    fn screen_normalized(
        &self,
        original: &str,
        n: &Normalized<'_>,
        dir: Direction,
        tally: &mut Tally,
    ) -> Option<String> {
        if self.c.scanner.is_empty() || original.is_empty() {
            return None;
        }
        let scan = self.c.scanner.scan(&n.text, 0, true);
        if scan.found.is_empty() {
            return None;
        }
        let out = self.apply(original, n, &scan.found, 0, original.len(), dir, tally);
        (out != original).then_some(out)
    }

    /// The original text between `from` and `to` with the findings in it
    /// applied (redacted, counted, or noted as blocks).
    #[allow(clippy::too_many_arguments)]
    fn apply(
        &self,
        original: &str,
        n: &Normalized<'_>,
        found: &[Found],
        from: usize,
        to: usize,
        dir: Direction,
        tally: &mut Tally,
    ) -> String {
        let mut out = String::with_capacity(to - from);
        let mut at = from;
        for f in found {
            let (a, b) = n.original(f.start, f.end);
            if a < at || b > to {
                continue;
            }
            let d = &self.c.scanner.detectors[f.detector];
            tally.note(d.kind.name(), d.action, dir);
            if d.action == Action::Redact {
                out.push_str(&original[at..a]);
                out.push_str(&self.placeholder(d.kind.placeholder(), &original[a..b]));
                at = b;
            }
        }
        out.push_str(&original[at..to]);
        out
    }

    fn placeholder(&self, kind: &str, value: &str) -> String {
        match self.c.redaction {
            Redaction::Typed => format!("[{kind}]"),
            Redaction::Hash => {
                // FNV-1a: stable across VMs and restarts, so the same value
                // is the same token in every request.
                let mut h: u64 = 0xcbf2_9ce4_8422_2325;
                for b in self.c.hash_salt.bytes().chain([0]).chain(value.bytes()) {
                    h ^= u64::from(b);
                    h = h.wrapping_mul(0x0100_0000_01b3);
                }
                format!("[{kind}_{:08x}]", (h >> 32) as u32 ^ h as u32)
            }
        }
    }

    /// Screens every answer text of a JSON answer where it lies: the new
    /// bytes when a text changed, each changed text written over its old
    /// one and every other byte kept. `Err` when the answer is not JSON.
    pub fn screen_answer_bytes(&self, bytes: &[u8], tally: &mut Tally) -> Walked<Option<Vec<u8>>> {
        // Every text is found before any is screened, so an answer that
        // turns out not to be JSON is not tallied twice (here, then as text).
        let texts = body::answer_text_spans(bytes)?;
        let changes: Vec<_> = texts
            .into_iter()
            .filter_map(|(span, text)| {
                let new = self.screen_text(&text, Direction::Response, tally)?;
                Some((span, new))
            })
            .collect();
        Ok((!changes.is_empty()).then(|| body::rewrite(bytes, changes)))
    }

    /// Screens every answer text of a JSON value; whether any changed.
    pub fn screen_answer(&self, v: &mut Value, tally: &mut Tally) -> bool {
        let mut changed = false;
        body::answer_texts(v, &mut |s| {
            if let Some(new) = self.screen_text(s, Direction::Response, tally) {
                *s = new;
                changed = true;
            }
        });
        changed
    }
}

/// Which way the text was going.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Direction {
    Request,
    Response,
}

impl Direction {
    fn name(self) -> &'static str {
        match self {
            Direction::Request => "request",
            Direction::Response => "response",
        }
    }
}

/// What one request's screening found, by detector name only.
#[derive(Debug, Default)]
pub struct Tally {
    pub counts: BTreeMap<(&'static str, Action, Direction), u64>,
    pub blocked: BTreeSet<&'static str>,
    pub redacted: bool,
}

impl Tally {
    pub fn note(&mut self, detector: &'static str, action: Action, dir: Direction) {
        *self.counts.entry((detector, action, dir)).or_default() += 1;
        match action {
            Action::Block => {
                self.blocked.insert(detector);
            }
            Action::Redact => self.redacted = true,
            Action::Log => {}
        }
    }

    pub fn verdict(&self) -> &'static str {
        if !self.blocked.is_empty() {
            "block"
        } else if self.redacted {
            "redact"
        } else {
            "pass"
        }
    }

    fn names(&self) -> String {
        self.blocked.iter().copied().collect::<Vec<_>>().join(", ")
    }
}

impl Filter for Screen {
    type Stage = ScreenStage;
    const NAME: &'static str = "content-screen";

    fn from_config(bytes: &[u8]) -> Result<Self, ConfigError> {
        Screen::from_json(bytes)
    }

    fn stage(screen: &Rc<Self>) -> ScreenStage {
        ScreenStage::new(Rc::clone(screen))
    }

    fn registry(&self) -> Option<&RefCell<Registry>> {
        Some(&self.registry)
    }
}

enum Answer {
    /// Not read: not an LLM call, an error status, or screening is off.
    Off,
    /// Read whole after response headers.
    Json,
    /// Compressed: cannot be screened, so it is replaced by an error.
    Unreadable,
    Sse(Box<SseScreen>),
}

/// A request's texts: called with the screening function (a text's role
/// and text in, its redacted form out), it hands it every text and answers
/// the number of messages.
type RequestTexts<'a> = &'a mut dyn FnMut(&mut dyn FnMut(&str, &str) -> Option<String>) -> usize;

/// The screen's work on one request.
pub struct ScreenStage {
    screen: Rc<Screen>,
    api: Option<Api>,
    tally: Tally,
    answer: Answer,
    /// The verdict was published (the fact has one writer, written once).
    published: bool,
    /// Set when a held answer was replaced by a block.
    response_status: Option<u16>,
    /// The screened prompt text, for the moderation service.
    prompt: String,
    /// The moderation callout this request waits for.
    moderation: Option<u32>,
}

impl ScreenStage {
    pub fn new(screen: Rc<Screen>) -> Self {
        ScreenStage {
            screen,
            api: None,
            tally: Tally::default(),
            answer: Answer::Off,
            published: false,
            response_status: None,
            prompt: String::new(),
            moderation: None,
        }
    }

    fn publish(&mut self, env: &mut Env<'_>, verdict: &str) {
        if !self.published {
            self.published = true;
            env.state.set(facts::SCREEN, verdict.as_bytes());
        }
    }

    fn block(&mut self, env: &mut Env<'_>, status: u16, code: &str, message: &str) -> Step {
        self.publish(env, "block");
        Step::Reply(Reply::error(status, "invalid_request_error", code, message))
    }

    fn max_body_bytes(&self) -> usize {
        self.screen.c.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY)
    }

    /// Screens the request's texts, which `texts` hands to the screening
    /// function with their roles (it answers a text's redacted form) and
    /// counts the messages of; what to do next.
    fn screen_request(&mut self, env: &mut Env<'_>, texts: RequestTexts<'_>) -> Step {
        let screen = Rc::clone(&self.screen);
        let c = &screen.c;
        let mut text_bytes = 0u64;
        let mut injection: Vec<&'static str> = Vec::new();
        let tally = &mut self.tally;
        let prompt = &mut self.prompt;
        let moderated = c.moderation.is_some();
        let messages = texts(&mut |role, s| {
            text_bytes += s.len() as u64;
            let scored = c
                .injection
                .as_ref()
                .filter(|(_, _, roles)| roles.iter().any(|r| r == role));
            let screened = c.roles.iter().any(|r| r == role);
            if s.is_empty() || (scored.is_none() && !screened) {
                return None;
            }
            let n = Normalized::new(s);
            if let Some((inj, _, _)) = scored {
                let score = inj.score(&n.text);
                if inj.is_injection(&score) {
                    injection.extend(score.rules);
                }
            }
            if !screened {
                return None;
            }
            let new = screen.screen_normalized(s, &n, Direction::Request, tally);
            if moderated {
                // Redacted first: the service never sees what was redacted.
                prompt.push_str(new.as_deref().unwrap_or(s));
                prompt.push('\n');
            }
            new
        });
        if let Some(max) = c.max_messages {
            if messages > max {
                let msg = format!("the request has {messages} messages; the limit is {max}");
                return self.block(env, 400, "context_length_exceeded", &msg);
            }
        }
        if let Some(max) = c.max_prompt_tokens {
            let tokens = estimate_tokens(text_bytes);
            if tokens > max {
                let msg = format!(
                    "the prompt is about {tokens} tokens; the limit is {max} (estimated at 4 bytes a token)"
                );
                return self.block(env, 400, "context_length_exceeded", &msg);
            }
        }
        if let Some((_, action, _)) = &c.injection {
            if !injection.is_empty() {
                // The rule ids say why without repeating the text.
                self.tally
                    .note("prompt_injection", *action, Direction::Request);
                if *action == Action::Block {
                    self.tally.blocked.insert("prompt_injection");
                }
            }
        }
        if !self.tally.blocked.is_empty() {
            let msg = format!("content-screen blocked the request: {}", self.tally.names());
            return self.block(env, 400, "content_filter", &msg);
        }
        Step::Continue
    }

    /// Acts on the moderation service's verdict.
    fn moderated(&mut self, env: &mut Env<'_>, verdict: &Verdict) -> Step {
        let shadow = self.screen.c.shadow;
        match verdict {
            Verdict::Clean => {}
            Verdict::Flagged(categories) => {
                let action = if shadow { Action::Log } else { Action::Block };
                self.tally.note("moderation", action, Direction::Request);
                if action == Action::Block {
                    // Category names are the service's labels, not the text.
                    let cats: Vec<String> = categories
                        .iter()
                        .take(8)
                        .map(|c| crate::metrics::label_value(c))
                        .collect();
                    let msg = if cats.is_empty() {
                        "content-screen blocked the request: moderation".to_string()
                    } else {
                        format!(
                            "content-screen blocked the request: moderation ({})",
                            cats.join(", ")
                        )
                    };
                    return self.block(env, 400, "content_filter", &msg);
                }
            }
            Verdict::Failed => {
                let deny = self
                    .screen
                    .c
                    .moderation
                    .as_ref()
                    .is_some_and(|m| m.failure_mode == FailureMode::Deny);
                if deny && !shadow {
                    self.tally
                        .note("moderation_unavailable", Action::Block, Direction::Request);
                    self.publish(env, "block");
                    return Step::Reply(Reply::error(
                        503,
                        "api_error",
                        "moderation_unavailable",
                        "content-screen could not reach its moderation service",
                    ));
                }
                self.tally
                    .note("moderation_unavailable", Action::Log, Direction::Request);
            }
        }
        if !self.screen.c.responses {
            self.end_of_answer(env);
        }
        Step::Continue
    }

    fn end_of_answer(&mut self, env: &mut Env<'_>) {
        let v = self.tally.verdict();
        self.publish(env, v);
    }
}

impl Stage for ScreenStage {
    fn request_headers(&mut self, env: &mut Env<'_>, headers: &mut Headers, eos: bool) -> Step {
        self.api = api::classify(
            headers.get(":method").unwrap_or(""),
            headers.get(":path").unwrap_or(""),
        );
        if self.api.is_none() {
            self.publish(env, "off");
            return Step::Continue;
        }
        if let Some(max) = self.screen.c.max_body_bytes {
            let len = headers
                .get("content-length")
                .and_then(|l| l.trim().parse::<u64>().ok());
            if let Some(len) = len.filter(|l| *l > max as u64) {
                let msg = format!("the request body is {len} bytes; the limit is {max}");
                return self.block(env, 413, "request_too_large", &msg);
            }
        }
        if self.screen.c.responses {
            // Compressed answers cannot be screened: ask for plain ones.
            headers.set("accept-encoding", "identity");
        }
        if eos {
            return Step::Continue;
        }
        let hold = self.screen.c.hold_request_headers;
        if !hold {
            // A redacted body may change length after these headers are gone.
            headers.remove("content-length");
        }
        Step::ReadBody { hold_headers: hold }
    }

    fn request_body(
        &mut self,
        env: &mut Env<'_>,
        body: &mut RequestBody,
        _headers: &mut Headers,
    ) -> Step {
        if self.api.is_none() {
            return Step::Continue;
        }
        if body.is_truncated() {
            // Unread is unscreened: refuse rather than pass it blind.
            let max = self.max_body_bytes();
            let msg = format!("the request body is over the limit of {max} bytes");
            return self.block(env, 413, "request_too_large", &msg);
        }
        if body.bytes().iter().all(u8::is_ascii_whitespace) {
            return Step::Continue;
        }
        // Read in place unless another stage parsed the document already
        // (or the walker cannot be sure of the body: then serde reads it).
        // A redacted text is written over its old bytes; every other byte
        // of the body stays as the client sent it.
        let in_place = match body.parsed_json() {
            Some(_) => None,
            None => body::request_text_spans(body.bytes())
                .ok()
                .map(|(spoken, count)| {
                    let mut changes = Vec::new();
                    let step = self.screen_request(env, &mut |screen| {
                        for t in &spoken {
                            if let Some(new) = screen(&t.role, &t.text) {
                                changes.push((t.span.clone(), new));
                            }
                        }
                        count
                    });
                    changes.sort_by_key(|(span, _)| span.start);
                    let new = (!changes.is_empty()).then(|| body::rewrite(body.bytes(), changes));
                    (step, new)
                }),
        };
        if let Some((step, new)) = in_place {
            if step != Step::Continue {
                return step;
            }
            if let Some(new) = new {
                body.replace(new);
            }
        } else {
            let Some(v) = body.json_mut() else {
                // What cannot be read cannot be screened, and an upstream more
                // lenient than serde_json (a lone surrogate escape, say) would
                // read text that was never looked at: refuse it.
                self.publish(env, "block");
                return Step::Reply(Reply::error(
                    400,
                    "invalid_request_error",
                    "invalid_json",
                    "content-screen could not read the request body as JSON",
                ));
            };
            let mut changed = false;
            let step = self.screen_request(env, &mut |screen| {
                body::request_texts(v, &mut |role, s| {
                    if let Some(new) = screen(role, s) {
                        *s = new;
                        changed = true;
                    }
                })
            });
            if step != Step::Continue {
                return step;
            }
            if changed {
                body.commit_json();
            }
        }
        if let Some(m) = &self.screen.c.moderation {
            if !self.prompt.trim().is_empty() {
                let call = m.call(&self.prompt);
                self.prompt = String::new();
                match env.callouts.http(&call) {
                    Ok(token) => {
                        self.moderation = Some(token);
                        return Step::Wait;
                    }
                    Err(_) => return self.moderated(env, &Verdict::Failed),
                }
            }
        }
        if !self.screen.c.responses {
            self.end_of_answer(env);
        }
        Step::Continue
    }

    fn on_callout(
        &mut self,
        env: &mut Env<'_>,
        token: u32,
        response: &CalloutResponse,
        _headers: &mut Headers,
    ) -> Step {
        if self.moderation != Some(token) {
            return Step::Continue;
        }
        self.moderation = None;
        let verdict = match &self.screen.c.moderation {
            Some(m) => m.verdict(response),
            None => Verdict::Failed,
        };
        self.moderated(env, &verdict)
    }

    fn response_headers(&mut self, _env: &mut Env<'_>, headers: &mut Headers, _eos: bool) -> Step {
        let Some(api) = &self.api else {
            return Step::Continue;
        };
        let status: Option<u16> = headers.get(":status").and_then(|s| s.parse().ok());
        // Embeddings answer with vectors: nothing in them to screen.
        if !self.screen.c.responses
            || self.screen.c.scanner.is_empty()
            || api.operation == api::Operation::Embeddings
        {
            return Step::Continue;
        }
        if status.is_none_or(|s| s >= 400) {
            return Step::Continue;
        }
        let encoded = headers
            .get("content-encoding")
            .is_some_and(|e| !e.trim().eq_ignore_ascii_case("identity"));
        let sse = headers.get("content-type").is_some_and(|t| {
            t.trim_start()
                .to_ascii_lowercase()
                .starts_with("text/event-stream")
        });
        if sse {
            headers.remove("content-length");
            if encoded {
                // Refused with an error event, which is not compressed.
                headers.remove("content-encoding");
            }
            self.answer = Answer::Sse(Box::new(SseScreen::new(api.family, api.operation, encoded)));
            return Step::Continue;
        }
        self.answer = if encoded {
            // The error that replaces it is not compressed.
            headers.remove("content-encoding");
            Answer::Unreadable
        } else {
            Answer::Json
        };
        Step::ReadBody { hold_headers: true }
    }

    fn response_body(&mut self, env: &mut Env<'_>, chunk: &mut Chunk, eos: bool) -> Step {
        let screen = Rc::clone(&self.screen);
        match &mut self.answer {
            Answer::Off => {}
            Answer::Unreadable => {
                self.tally
                    .note("unscreenable", Action::Block, Direction::Response);
                self.replace_answer(chunk);
            }
            Answer::Json => {
                if chunk.is_truncated() {
                    self.tally
                        .note("unscreenable", Action::Block, Direction::Response);
                    self.replace_answer(chunk);
                } else if let Ok(new) = screen.screen_answer_bytes(chunk.bytes(), &mut self.tally) {
                    if !self.tally.blocked.is_empty() {
                        self.replace_answer(chunk);
                    } else if let Some(new) = new {
                        chunk.set(new);
                    }
                } else if !chunk.bytes().is_empty() {
                    // Not JSON after all (text/plain, say): screen it as text.
                    if let Ok(s) = std::str::from_utf8(chunk.bytes()) {
                        let new = screen.screen_text(s, Direction::Response, &mut self.tally);
                        if !self.tally.blocked.is_empty() {
                            self.replace_answer(chunk);
                        } else if let Some(new) = new {
                            chunk.set(new.into_bytes());
                        }
                    }
                }
            }
            Answer::Sse(s) => {
                let out = s.feed(&screen, chunk.bytes(), eos, &mut self.tally);
                chunk.set(out);
            }
        }
        if eos {
            self.end_of_answer(env);
        }
        Step::Continue
    }

    fn response_status(&self) -> Option<u16> {
        self.response_status
    }

    fn log(&mut self, env: &mut Env<'_>, _input: &dyn LogInput) {
        if self.api.is_none() {
            return;
        }
        let v = self.tally.verdict();
        self.publish(env, v);
        let Ok(mut reg) = self.screen.registry.try_borrow_mut() else {
            return;
        };
        for ((detector, action, dir), n) in &self.tally.counts {
            reg.add(
                env.metrics,
                metric::FINDINGS,
                &[
                    ("detector", detector),
                    ("action", action.name()),
                    ("direction", dir.name()),
                ],
                *n,
            );
        }
        reg.add(env.metrics, metric::REQUESTS, &[("screen", v)], 1);
    }

    fn max_body(&self) -> usize {
        self.max_body_bytes()
    }

    fn wants_response_body(&self) -> bool {
        !matches!(self.answer, Answer::Off)
    }

    fn holding(&self) -> bool {
        match &self.answer {
            Answer::Sse(s) => s.holding(),
            _ => false,
        }
    }
}

impl ScreenStage {
    /// Replaces a held answer with the block error.
    fn replace_answer(&mut self, chunk: &mut Chunk) {
        let msg = format!(
            "content-screen blocked the response: {}",
            self.tally.names()
        );
        let r = Reply::error(400, "invalid_request_error", "content_filter", &msg);
        chunk.set(r.body);
        self.response_status = Some(400);
    }
}

#[cfg(test)]
mod tests;
