//! Screening a streamed answer as it passes.
//!
//! The SSE parser (raw capture on) hands over each event with its exact
//! bytes. An event that carries a text delta (OpenAI chat and completions,
//! Anthropic `text_delta`, Responses `response.output_text.delta`) has its
//! delta replaced by the part of the text that is final so far: the text of
//! every delta of one choice (or content block) is one [`TextStream`], and
//! only its tail that could still start a match is held, to go out with a
//! later event. When that text ends (a `finish_reason`, `content_block_stop`,
//! `response.output_text.done`, `[DONE]`, or the end of the stream) what is
//! held goes out, in that event or in one made like the last delta. Other
//! events whose JSON carries answer text (a Responses `*.done` event, an
//! Anthropic `message_start`) are screened whole. Every other byte passes
//! unchanged, so the framing is the upstream's.
//!
//! A block ends the stream with an error event in the provider's format
//! (then `data: [DONE]` for OpenAI); nothing after it reaches the client.

use super::detect::Action;
use super::text::{self, Normalized};
use super::{Direction, Screen, Tally};
use crate::wire::api::{Family, Operation};
use crate::wire::sse::{self, Item};
use crate::wire::walk::{Once, Walked, Walker};
use serde_json::Value;
use std::borrow::Cow;
use std::collections::BTreeMap;

/// The text of one choice or content block, and what of it is held back.
#[derive(Debug, Default)]
pub struct TextStream {
    /// Text not yet released (original bytes).
    held: String,
    /// The last character released, for the look-behind of `\b`.
    before: String,
    /// Where `before` and `held` are joined to be scanned; kept, with
    /// the other two, from delta to delta, so a delta allocates no buffer.
    window: String,
}

impl TextStream {
    /// Adds a delta; returns the text now final, redacted.
    pub fn push(&mut self, screen: &Screen, delta: &str, tally: &mut Tally) -> String {
        self.held.push_str(delta);
        self.release(screen, false, tally)
    }

    /// The text ended: everything held goes out, redacted.
    pub fn finish(&mut self, screen: &Screen, tally: &mut Tally) -> String {
        self.release(screen, true, tally)
    }

    pub fn held(&self) -> usize {
        self.held.len()
    }

    fn release(&mut self, screen: &Screen, final_text: bool, tally: &mut Tally) -> String {
        if self.held.is_empty() {
            return String::new();
        }
        let base = self.before.len();
        let mut window = std::mem::take(&mut self.window);
        window.clear();
        window.push_str(&self.before);
        window.push_str(&self.held);
        let n = Normalized::new(&window);
        let from = n.normalized_at(base);
        let scan = screen
            .c
            .scanner
            .scan_held(&n.text, from, final_text, screen.c.max_hold_bytes);
        let mut safe = if scan.safe >= n.text.len() {
            window.len()
        } else {
            n.original_start(scan.safe)
        };
        if !final_text {
            // A combining mark still to come would change the last group
            // (nothing composes with whitespace, the usual end of a delta).
            if !window.ends_with(char::is_whitespace) {
                safe = safe.min(text::last_group_start(&window));
            }
            let max = screen.c.max_hold_bytes;
            if window.len() - safe > max {
                // Bounded memory wins over a match longer than the bound.
                let mut at = window.len() - max;
                while !window.is_char_boundary(at) {
                    at += 1;
                }
                safe = at;
            }
        }
        // A finding cut by the boundary waits whole for the next round.
        for f in &scan.found {
            let (a, b) = n.original(f.start, f.end);
            if a < safe && b > safe {
                safe = a;
            }
        }
        let safe = safe.max(base);
        let out = screen.apply(
            &window,
            &n,
            &scan.found,
            base,
            safe,
            Direction::Response,
            tally,
        );
        let mut last = safe;
        if safe > 0 {
            last = window[..safe]
                .char_indices()
                .next_back()
                .map_or(0, |(i, _)| i);
        }
        self.before.clear();
        self.before.push_str(if safe == base {
            &window[..base]
        } else {
            &window[last..safe]
        });
        self.held.clear();
        self.held.push_str(&window[safe..]);
        self.window = window;
        out
    }
}

/// Which text of the answer a delta belongs to: the choice (OpenAI), the
/// content block (Anthropic), the output and content part (Responses).
type Key = (u64, u64);

/// Where a text delta sits in an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    OpenAiChat,
    OpenAiCompletion,
    Anthropic,
    Responses,
}

/// The streamed answer of one request.
pub struct SseScreen {
    parser: sse::Parser,
    shape: Shape,
    family: Family,
    /// One text per choice / content block, with the last event that
    /// carried it (the template of an event made to flush it).
    streams: BTreeMap<Key, (TextStream, Vec<u8>, Vec<u8>)>,
    blocked: bool,
    /// The answer is compressed and cannot be read: it is refused.
    unreadable: bool,
}

impl SseScreen {
    pub fn new(family: Family, operation: Operation, unreadable: bool) -> SseScreen {
        let shape = match (family, operation) {
            (Family::Anthropic, _) => Shape::Anthropic,
            (_, Operation::Responses) => Shape::Responses,
            (_, Operation::Completions) => Shape::OpenAiCompletion,
            _ => Shape::OpenAiChat,
        };
        SseScreen {
            parser: sse::Parser::new(sse::Limits::default(), true),
            shape,
            family,
            streams: BTreeMap::new(),
            blocked: false,
            unreadable,
        }
    }

    pub fn holding(&self) -> bool {
        !self.blocked
            && (self.parser.held_bytes() > 0 || self.streams.values().any(|s| s.0.held() > 0))
    }

    /// Screens one piece of the stream; the bytes to send on.
    pub fn feed(&mut self, screen: &Screen, bytes: &[u8], eos: bool, tally: &mut Tally) -> Vec<u8> {
        if self.blocked {
            return Vec::new();
        }
        let mut out = Vec::with_capacity(bytes.len() + 64);
        if self.unreadable {
            tally.note("unscreenable", Action::Block, Direction::Response);
            self.end_blocked(&mut out, tally);
            return out;
        }
        let mut spill = false;
        let mut blocked = false;
        // The parser is taken out while it runs, so that the events it hands
        // over can be screened in place, without copying them.
        let mut parser = std::mem::replace(
            &mut self.parser,
            sse::Parser::new(sse::Limits::default(), true),
        );
        parser.feed(bytes, |item| {
            if blocked || spill {
                return;
            }
            match item {
                Item::Event(e) => {
                    let mark = out.len();
                    self.event(screen, e.event_type, e.data, e.raw, &mut out, tally);
                    if !tally.blocked.is_empty() {
                        // Nothing of the event that blocked goes out.
                        out.truncate(mark);
                        blocked = true;
                    }
                }
                Item::Other { raw } => out.extend_from_slice(raw),
                Item::Spill(_) => spill = true,
            }
        });
        self.parser = parser;
        if blocked {
            return self.block_here(out, tally);
        }
        if spill {
            // An event too large to hold cannot be screened: refuse it.
            tally.note("unscreenable", Action::Block, Direction::Response);
            return self.block_here(out, tally);
        }
        if eos {
            let mark = out.len();
            self.flush_all(screen, &mut out, tally);
            if !tally.blocked.is_empty() {
                out.truncate(mark);
                return self.block_here(out, tally);
            }
            out.extend_from_slice(&self.parser.take_pending_raw());
        }
        out
    }

    fn block_here(&mut self, mut out: Vec<u8>, tally: &Tally) -> Vec<u8> {
        self.end_blocked(&mut out, tally);
        out
    }

    fn end_blocked(&mut self, out: &mut Vec<u8>, tally: &Tally) {
        self.blocked = true;
        self.streams.clear();
        let names = tally.blocked.iter().copied().collect::<Vec<_>>().join(", ");
        let message = format!("content-screen blocked the response: {names}");
        let ev = match (self.family, self.shape) {
            (Family::Anthropic, _) => format!(
                "event: error\ndata: {}\n\n",
                serde_json::json!({"type": "error", "error": {"type": "invalid_request_error", "message": message}})
            ),
            (_, Shape::Responses) => format!(
                "event: error\ndata: {}\n\n",
                serde_json::json!({"type": "error", "code": "content_filter", "message": message, "param": null})
            ),
            _ => format!(
                "data: {}\n\ndata: [DONE]\n\n",
                serde_json::json!({"error": {"message": message, "type": "invalid_request_error", "code": "content_filter"}})
            ),
        };
        out.extend_from_slice(ev.as_bytes());
    }

    fn event(
        &mut self,
        screen: &Screen,
        event_type: &[u8],
        data: &[u8],
        raw: &[u8],
        out: &mut Vec<u8>,
        tally: &mut Tally,
    ) {
        if data == b"[DONE]" {
            self.flush_all(screen, out, tally);
            out.extend_from_slice(raw);
            return;
        }
        if matches!(self.shape, Shape::OpenAiChat | Shape::OpenAiCompletion) {
            self.openai_event(screen, event_type, data, raw, out, tally);
            return;
        }
        let Ok(mut v) = serde_json::from_slice::<Value>(data) else {
            out.extend_from_slice(raw);
            return;
        };
        let mut changed = false;
        match self.shape {
            Shape::OpenAiChat | Shape::OpenAiCompletion => {}
            Shape::Anthropic => {
                let kind = v
                    .get("type")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                let key = (v.get("index").and_then(Value::as_u64).unwrap_or(0), 0);
                if kind == "content_block_delta" {
                    if let Some(delta) = v.get_mut("delta").and_then(Value::as_object_mut) {
                        if let Some(Value::String(d)) = delta.get("text") {
                            let t = self.stream(key, event_type, data).push(screen, d, tally);
                            if delta.get("text").and_then(Value::as_str) != Some(&t) {
                                delta.insert("text".into(), Value::String(t));
                                changed = true;
                            }
                        }
                    }
                } else if kind == "content_block_stop" {
                    self.flush(screen, key, out, tally);
                } else if matches!(kind.as_str(), "message_delta" | "message_stop") {
                    self.flush_all(screen, out, tally);
                } else {
                    changed = screen.screen_answer(&mut v, tally);
                }
            }
            Shape::Responses => {
                let kind = v
                    .get("type")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                let key = (
                    v.get("output_index").and_then(Value::as_u64).unwrap_or(0),
                    v.get("content_index").and_then(Value::as_u64).unwrap_or(0),
                );
                if kind == "response.output_text.delta" {
                    if let Some(Value::String(d)) = v.get("delta") {
                        let t = self.stream(key, event_type, data).push(screen, d, tally);
                        if v.get("delta").and_then(Value::as_str) != Some(&t) {
                            v["delta"] = Value::String(t);
                            changed = true;
                        }
                    }
                } else {
                    if kind == "response.output_text.done" {
                        self.flush(screen, key, out, tally);
                    } else if kind.starts_with("response.completed")
                        || kind == "response.incomplete"
                        || kind == "response.failed"
                    {
                        self.flush_all(screen, out, tally);
                    }
                    changed = screen.screen_answer(&mut v, tally);
                }
            }
        }
        if changed {
            write_event(out, event_type, &v);
        } else {
            out.extend_from_slice(raw);
        }
    }

    /// An OpenAI chunk: read borrowed, and rewritten (parsed whole) only
    /// when the text it sends on differs from the text it brought.
    fn openai_event(
        &mut self,
        screen: &Screen,
        event_type: &[u8],
        data: &[u8],
        raw: &[u8],
        out: &mut Vec<u8>,
        tally: &mut Tally,
    ) {
        let Some(choices) = read_chunk(data) else {
            out.extend_from_slice(raw);
            return;
        };
        let chat = self.shape == Shape::OpenAiChat;
        let mut texts: Vec<Option<String>> = Vec::new();
        let mut differs = false;
        for c in &choices {
            let key = (c.index, 0);
            let original = if chat {
                c.content.as_deref()
            } else {
                c.text.as_deref()
            };
            let mut text =
                original.map(|d| self.stream(key, event_type, data).push(screen, d, tally));
            if c.finished {
                if let Some((s, _, _)) = self.streams.get_mut(&key) {
                    let rest = s.finish(screen, tally);
                    if !rest.is_empty() {
                        text = Some(text.unwrap_or_default() + &rest);
                    }
                }
                self.streams.remove(&key);
            }
            if text.as_deref() != original {
                differs = true;
                texts.push(text);
            } else {
                texts.push(None);
            }
        }
        if !differs {
            out.extend_from_slice(raw);
            return;
        }
        let Ok(mut v) = serde_json::from_slice::<Value>(data) else {
            out.extend_from_slice(raw);
            return;
        };
        let field = if chat { "content" } else { "text" };
        if let Some(choices) = v.get_mut("choices").and_then(Value::as_array_mut) {
            for (c, text) in choices.iter_mut().zip(texts) {
                let Some(text) = text else { continue };
                let slot = if chat { c.get_mut("delta") } else { Some(c) };
                if let Some(slot) = slot.and_then(Value::as_object_mut) {
                    slot.insert(field.to_string(), Value::String(text));
                }
            }
        }
        write_event(out, event_type, &v);
    }

    /// The text of one choice or block; the event is kept (as its bytes,
    /// parsed again only if a flush needs it) as the template of a flush.
    fn stream(&mut self, key: Key, event_type: &[u8], data: &[u8]) -> &mut TextStream {
        let entry = self
            .streams
            .entry(key)
            .or_insert_with(|| (TextStream::default(), Vec::new(), Vec::new()));
        entry.1.clear();
        entry.1.extend_from_slice(event_type);
        entry.2.clear();
        entry.2.extend_from_slice(data);
        &mut entry.0
    }

    /// Sends what one text still holds, in an event made like its last delta.
    fn flush(&mut self, screen: &Screen, key: Key, out: &mut Vec<u8>, tally: &mut Tally) {
        let Some((mut s, event_type, data)) = self.streams.remove(&key) else {
            return;
        };
        let rest = s.finish(screen, tally);
        if rest.is_empty() || !tally.blocked.is_empty() {
            return;
        }
        // It parsed when it came: it parses again.
        let Ok(mut template) = serde_json::from_slice::<Value>(&data) else {
            return;
        };
        let placed = match self.shape {
            Shape::OpenAiChat | Shape::OpenAiCompletion => {
                let field = if self.shape == Shape::OpenAiChat {
                    "content"
                } else {
                    "text"
                };
                let idx = key.0;
                let choice = template
                    .get("choices")
                    .and_then(Value::as_array)
                    .and_then(|cs| {
                        cs.iter()
                            .find(|c| c.get("index").and_then(Value::as_u64).unwrap_or(0) == idx)
                    })
                    .cloned();
                match (choice, template.as_object_mut()) {
                    (Some(mut c), Some(obj)) => {
                        if let Some(c) = c.as_object_mut() {
                            c.insert("finish_reason".into(), Value::Null);
                        }
                        let slot = if self.shape == Shape::OpenAiChat {
                            c.get_mut("delta")
                        } else {
                            Some(&mut c)
                        };
                        if let Some(slot) = slot.and_then(Value::as_object_mut) {
                            slot.insert(field.into(), Value::String(rest));
                        }
                        obj.insert("choices".into(), Value::Array(vec![c]));
                        obj.remove("usage");
                        true
                    }
                    _ => false,
                }
            }
            Shape::Anthropic => match template.get_mut("delta").and_then(Value::as_object_mut) {
                Some(d) => {
                    d.insert("text".into(), Value::String(rest));
                    true
                }
                None => false,
            },
            Shape::Responses => match template.as_object_mut() {
                Some(obj) => {
                    obj.insert("delta".into(), Value::String(rest));
                    true
                }
                None => false,
            },
        };
        if placed {
            write_event(out, &event_type, &template);
        }
    }

    fn flush_all(&mut self, screen: &Screen, out: &mut Vec<u8>, tally: &mut Tally) {
        let keys: Vec<Key> = self.streams.keys().copied().collect();
        for k in keys {
            self.flush(screen, k, out, tally);
        }
    }
}

/// What the screen reads of one choice of an OpenAI chunk, borrowed.
#[derive(Debug, Default, PartialEq)]
pub(super) struct ChoiceView<'a> {
    pub(super) index: u64,
    /// `delta.content` (chat).
    pub(super) content: Option<Cow<'a, str>>,
    /// `text` (completions).
    pub(super) text: Option<Cow<'a, str>>,
    /// `finish_reason` is there and not null.
    pub(super) finished: bool,
}

/// An OpenAI chunk's choices, walked in place (each event of every
/// streamed answer passes here). A chunk is read as serde reads it into
/// typed members: `index` a `u64`, `delta` an object or null, the texts
/// strings or null, no member twice; anything else, or broken JSON, is
/// no chunk, and the event passes as it came.
pub(super) fn read_chunk(data: &[u8]) -> Option<Vec<ChoiceView<'_>>> {
    Walker::document(data, |w| {
        let mut choices = Vec::new();
        let mut seen = Once::default();
        w.object(|w, key| {
            if *key.name()? != *b"choices" {
                return w.skip().map(drop);
            }
            seen.first(0)?;
            if w.null()? {
                return Ok(());
            }
            w.array(|w| {
                choices.push(choice(w)?);
                Ok(())
            })
        })?;
        Ok(choices)
    })
    .ok()
}

fn choice<'a>(w: &mut Walker<'a>) -> Walked<ChoiceView<'a>> {
    let mut c = ChoiceView::default();
    let mut seen = Once::default();
    w.object(|w, key| {
        match &*key.name()? {
            b"index" => c.index = seen.first(0).and(w.u64())?,
            b"text" => c.text = seen.first(1).and(w.opt_str())?,
            b"finish_reason" => {
                seen.first(2)?;
                c.finished = !w.null()?;
                if c.finished {
                    w.skip()?;
                }
            }
            b"delta" => {
                seen.first(3)?;
                if !w.null()? {
                    let mut once = Once::default();
                    w.object(|w, key| {
                        if *key.name()? != *b"content" {
                            return w.skip().map(drop);
                        }
                        c.content = once.first(0).and(w.opt_str())?;
                        Ok(())
                    })?;
                }
            }
            _ => drop(w.skip()?),
        }
        Ok(())
    })?;
    Ok(c)
}

fn write_event(out: &mut Vec<u8>, event_type: &[u8], v: &Value) {
    if !event_type.is_empty() {
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(event_type);
        out.push(b'\n');
    }
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(v.to_string().as_bytes());
    out.extend_from_slice(b"\n\n");
}
