//! Answers in both forms: a streamed answer assembled into the JSON the
//! provider sends without streaming, and a stored JSON answer replayed as the
//! provider's stream.
//!
//! One stored form (the JSON answer) serves both kinds of request, so the
//! same question asked streaming and not streaming shares an entry. The
//! stream a hit replays is well-formed in the provider's format and ends the
//! way the provider ends it: OpenAI chat and completions chunks closed by
//! `data: [DONE]` (with the usage chunk when the request asked for it),
//! Anthropic `message_start` ... `message_stop`, Responses API events from
//! `response.created` to `response.completed`. Usage is the original
//! answer's, so the meter above counts what the hit saved.

use super::chunk;
use crate::wire::api::Operation;
use crate::wire::walk;
use serde_json::{json, Map, Value};

/// Assembles a streamed answer as its events pass, without holding them.
#[derive(Debug)]
pub struct Assembler {
    op: Operation,
    head: Map<String, Value>,
    choices: Vec<ChoiceAcc>,
    usage: Option<Value>,
    blocks: Vec<Value>,
    partial_json: Vec<String>,
    message: Option<Map<String, Value>>,
    response: Option<Value>,
    done: bool,
    failed: bool,
}

#[derive(Debug, Default)]
struct ChoiceAcc {
    role: Option<String>,
    content: Option<String>,
    text: String,
    refusal: Option<String>,
    tool_calls: Vec<Map<String, Value>>,
    finish_reason: Option<Value>,
}

impl Assembler {
    pub fn new(op: Operation) -> Assembler {
        Assembler {
            op,
            head: Map::new(),
            choices: Vec::new(),
            usage: None,
            blocks: Vec::new(),
            partial_json: Vec::new(),
            message: None,
            response: None,
            done: false,
            failed: false,
        }
    }

    /// The stream carried an error: nothing of it is stored.
    pub fn failed(&self) -> bool {
        self.failed
    }

    /// One event (its `event:` type, its joined data).
    pub fn event(&mut self, event_type: &[u8], data: &[u8]) {
        if self.failed {
            return;
        }
        if data == b"[DONE]" {
            self.done = true;
            return;
        }
        if matches!(self.op, Operation::Chat | Operation::Completions) {
            let Some(chunk) = chunk::read(data) else {
                // A stream we cannot read whole is not one we replay.
                self.failed = true;
                return;
            };
            let kind = chunk.kind.as_deref().map_or(event_type, str::as_bytes);
            if chunk.error || kind == b"error" {
                self.failed = true;
                return;
            }
            if self.openai_chunk(chunk).is_none() {
                self.failed = true;
            }
            return;
        }
        let Ok(Value::Object(v)) = serde_json::from_slice::<Value>(data) else {
            // A stream we cannot read whole is not one we replay.
            self.failed = true;
            return;
        };
        let kind = v
            .get("type")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| String::from_utf8_lossy(event_type).into_owned());
        if v.contains_key("error") || kind == "error" {
            self.failed = true;
            return;
        }
        match self.op {
            Operation::Messages => self.anthropic_event(&kind, v),
            Operation::Responses => self.responses_event(&kind, v),
            Operation::Chat | Operation::Completions | Operation::Embeddings => self.failed = true,
        }
    }

    /// Adds one chunk; `None` when it is not one the answer can be built
    /// from (a kept member that is not a JSON value, an index past 64, odd
    /// tool calls).
    fn openai_chunk(&mut self, chunk: chunk::ChunkView<'_>) -> Option<()> {
        let value = |bytes: &[u8]| serde_json::from_slice::<Value>(bytes).ok();
        if let Some(u) = chunk.usage {
            self.usage = Some(value(u)?);
        }
        for (k, x) in chunk::HEAD.into_iter().zip(chunk.head) {
            if let Some(x) = x.filter(|_| !self.head.contains_key(k)) {
                self.head.insert(k.to_string(), value(x)?);
            }
        }
        for c in chunk.choices.into_iter().flatten() {
            let index = c.index.and_then(walk::uint).unwrap_or(0) as usize;
            if index > 64 {
                return None;
            }
            while self.choices.len() <= index {
                self.choices.push(ChoiceAcc::default());
            }
            let acc = &mut self.choices[index];
            if let Some(f) = c.finish_reason {
                acc.finish_reason = Some(value(f)?);
            }
            if let Some(t) = &c.text {
                acc.text.push_str(t);
            }
            let Some(d) = c.delta else { continue };
            if let Some(r) = d.role {
                acc.role = Some(r.into_owned());
            }
            if let Some(t) = &d.content {
                acc.content.get_or_insert_with(String::new).push_str(t);
            }
            if let Some(t) = &d.refusal {
                acc.refusal.get_or_insert_with(String::new).push_str(t);
            }
            if let Some(calls) = d.tool_calls.filter(|t| t.first() == Some(&b'[')) {
                let calls = serde_json::from_slice::<Vec<Value>>(calls).ok()?;
                if !add_tool_calls(acc, &calls) {
                    return None;
                }
            }
        }
        Some(())
    }

    fn anthropic_event(&mut self, kind: &str, v: Map<String, Value>) {
        match kind {
            "message_start" => {
                if let Some(Value::Object(m)) = v.get("message") {
                    self.message = Some(m.clone());
                }
            }
            "content_block_start" => {
                let i = v.get("index").and_then(Value::as_u64).unwrap_or(0) as usize;
                if i != self.blocks.len() {
                    self.failed = true;
                    return;
                }
                let block = v.get("content_block").cloned().unwrap_or(Value::Null);
                self.blocks.push(block);
                self.partial_json.push(String::new());
            }
            "content_block_delta" => {
                let i = v.get("index").and_then(Value::as_u64).unwrap_or(0) as usize;
                let (Some(block), Some(d)) = (self.blocks.get_mut(i), v.get("delta")) else {
                    self.failed = true;
                    return;
                };
                let add = |block: &mut Value, field: &str, part: Option<&str>| match part {
                    Some(part) => append(block, field, part),
                    None => true,
                };
                let ok = match d.get("type").and_then(Value::as_str) {
                    Some("text_delta") => add(block, "text", d["text"].as_str()),
                    Some("thinking_delta") => add(block, "thinking", d["thinking"].as_str()),
                    Some("signature_delta") => add(block, "signature", d["signature"].as_str()),
                    Some("input_json_delta") => {
                        if let (Some(p), Some(acc)) =
                            (d["partial_json"].as_str(), self.partial_json.get_mut(i))
                        {
                            acc.push_str(p);
                        }
                        true
                    }
                    _ => true,
                };
                if !ok {
                    self.failed = true;
                }
            }
            "content_block_stop" => {
                let i = v.get("index").and_then(Value::as_u64).unwrap_or(0) as usize;
                let json_text = self.partial_json.get(i).cloned().unwrap_or_default();
                if let Some(block) = self.blocks.get_mut(i) {
                    if block.get("type").and_then(Value::as_str) == Some("tool_use") {
                        let input = if json_text.is_empty() {
                            Ok(json!({}))
                        } else {
                            serde_json::from_str(&json_text)
                        };
                        let set_ok = input.is_ok_and(|input| set(block, "input", input));
                        if !set_ok {
                            self.failed = true;
                        }
                    }
                }
            }
            "message_delta" => {
                let Some(m) = self.message.as_mut() else {
                    self.failed = true;
                    return;
                };
                if let Some(Value::Object(d)) = v.get("delta") {
                    for (k, x) in d {
                        m.insert(k.clone(), x.clone());
                    }
                }
                if let Some(Value::Object(u)) = v.get("usage") {
                    let usage = m.entry("usage").or_insert_with(|| json!({}));
                    for (k, x) in u {
                        if !x.is_null() && !set(usage, k, x.clone()) {
                            self.failed = true;
                            return;
                        }
                    }
                }
            }
            "message_stop" => self.done = true,
            _ => {}
        }
    }

    fn responses_event(&mut self, kind: &str, mut v: Map<String, Value>) {
        match kind {
            "response.completed" => {
                self.response = v.remove("response");
                self.done = self.response.is_some();
            }
            "response.failed" | "response.incomplete" => self.failed = true,
            _ => {}
        }
    }

    /// The answer as the provider sends it without streaming, if the stream
    /// ended the way the provider ends a whole answer.
    pub fn finish(self) -> Option<Value> {
        if self.failed || !self.done {
            return None;
        }
        match self.op {
            Operation::Chat | Operation::Completions => {
                let chat = self.op == Operation::Chat;
                if self.choices.is_empty() {
                    return None;
                }
                let mut out = self.head;
                out.insert(
                    "object".into(),
                    json!(if chat {
                        "chat.completion"
                    } else {
                        "text_completion"
                    }),
                );
                let choices: Vec<Value> = self
                    .choices
                    .into_iter()
                    .enumerate()
                    .map(|(i, c)| {
                        if chat {
                            let mut msg = Map::new();
                            msg.insert(
                                "role".into(),
                                json!(c.role.unwrap_or_else(|| "assistant".into())),
                            );
                            msg.insert("content".into(), json!(c.content));
                            if let Some(r) = c.refusal {
                                msg.insert("refusal".into(), json!(r));
                            }
                            if !c.tool_calls.is_empty() {
                                msg.insert("tool_calls".into(), json!(c.tool_calls));
                            }
                            json!({"index": i, "message": msg, "logprobs": null,
                                   "finish_reason": c.finish_reason})
                        } else {
                            json!({"index": i, "text": c.text, "logprobs": null,
                                   "finish_reason": c.finish_reason})
                        }
                    })
                    .collect();
                out.insert("choices".into(), Value::Array(choices));
                if let Some(u) = self.usage {
                    out.insert("usage".into(), u);
                }
                Some(Value::Object(out))
            }
            Operation::Messages => {
                let mut m = self.message?;
                m.insert("content".into(), Value::Array(self.blocks));
                Some(Value::Object(m))
            }
            Operation::Responses => self.response,
            Operation::Embeddings => None,
        }
    }
}

/// Adds a chunk's tool-call pieces to a choice; `false` for pieces that
/// cannot be joined (an index out of bounds, a function that is not an
/// object).
fn add_tool_calls(acc: &mut ChoiceAcc, calls: &[Value]) -> bool {
    for call in calls {
        let i = call.get("index").and_then(Value::as_u64).unwrap_or(0) as usize;
        if i > 128 {
            return false;
        }
        while acc.tool_calls.len() <= i {
            let mut m = Map::new();
            m.insert("function".into(), json!({"name": "", "arguments": ""}));
            acc.tool_calls.push(m);
        }
        let slot = &mut acc.tool_calls[i];
        for k in ["id", "type"] {
            if let Some(x) = call.get(k).filter(|x| !x.is_null()) {
                slot.insert(k.into(), x.clone());
            }
        }
        if let Some(f) = call.get("function") {
            let func = slot.entry("function").or_insert_with(|| json!({}));
            for k in ["name", "arguments"] {
                if let Some(part) = f.get(k).and_then(Value::as_str) {
                    if !append(func, k, part) {
                        return false;
                    }
                }
            }
        }
    }
    true
}

/// Adds `part` to the text member `k` of the object `v` in place (a member
/// that is not text starts again from `part`), so a long stream of pieces
/// costs what its text weighs, not the square of it; `false` if `v` is not
/// an object.
fn append(v: &mut Value, k: &str, part: &str) -> bool {
    match v.get_mut(k) {
        Some(Value::String(so_far)) => {
            so_far.push_str(part);
            true
        }
        _ => set(v, k, Value::String(part.to_string())),
    }
}

/// Sets a member of a JSON object; `false` when the value is not an object
/// (an upstream's odd event, which must not trap the VM).
fn set(v: &mut Value, k: &str, x: Value) -> bool {
    match v.as_object_mut() {
        Some(m) => {
            m.insert(k.to_string(), x);
            true
        }
        None => false,
    }
}

/// Whether a JSON answer is kept, read in place: `Some` of the tokens its
/// usage counts (input + output, cache reads and writes included) when it
/// is a JSON object whose finish reasons are all in `allowed` (`stop`,
/// `length`, `tool_calls`, `content_filter`; Anthropic's and the Responses
/// API's reasons are mapped onto these). A member written twice counts as
/// its last value, as in the parsed document.
pub fn keepable(op: Operation, bytes: &[u8], allowed: &[String]) -> Option<u64> {
    // Only what serde would read as a document is kept: the walker does not
    // check the UTF-8 of the strings it passes over.
    std::str::from_utf8(bytes).ok()?;
    let ok = |r: &str| allowed.iter().any(|a| a == r);
    let mut finished = false;
    // prompt, completion (OpenAI); input, output, cache read, cache write.
    let mut usage = [0u64; 6];
    walk::Walker::document(bytes, |w| {
        if !w.is_object() {
            return Err(walk::Bad);
        }
        w.object(|w, k| match (&*k.name()?, op) {
            (b"choices", Operation::Chat | Operation::Completions) => {
                finished = choices_finished(w, &ok)?;
                Ok(())
            }
            (b"stop_reason", Operation::Messages) => {
                finished = match opt_text(w)?.as_deref() {
                    Some("end_turn" | "stop_sequence") => ok("stop"),
                    Some("max_tokens") => ok("length"),
                    Some("tool_use") => ok("tool_calls"),
                    Some("refusal") => ok("content_filter"),
                    _ => false,
                };
                Ok(())
            }
            (b"status", Operation::Responses) => {
                finished = opt_text(w)?.as_deref() == Some("completed") && ok("stop");
                Ok(())
            }
            (b"data", Operation::Embeddings) => {
                finished = w.is_array();
                w.skip().map(drop)
            }
            (b"usage", _) => {
                usage = read_usage(w)?;
                Ok(())
            }
            _ => w.skip().map(drop),
        })
    })
    .ok()?;
    let [prompt, completion, input, output, read, write] = usage;
    let openai = prompt.saturating_add(completion);
    let other = input
        .saturating_add(output)
        .saturating_add(read)
        .saturating_add(write);
    finished.then_some(openai.max(other))
}

/// [`keepable`] for an answer already parsed (a stream's, as assembled for
/// its entry). The two are held to the same decisions by a test.
pub fn keepable_value(op: Operation, answer: &Value, allowed: &[String]) -> Option<u64> {
    (answer.is_object() && finish_allowed(op, answer, allowed)).then(|| tokens(answer))
}

/// What [`keepable`] decides, as it was decided on the parsed document:
/// the reference it is held to.
fn finish_allowed(op: Operation, answer: &Value, allowed: &[String]) -> bool {
    let ok = |r: &str| allowed.iter().any(|a| a == r);
    match op {
        Operation::Chat | Operation::Completions => {
            let Some(choices) = answer.get("choices").and_then(Value::as_array) else {
                return false;
            };
            !choices.is_empty()
                && choices.iter().all(|c| {
                    c.get("finish_reason")
                        .and_then(Value::as_str)
                        .is_some_and(ok)
                })
        }
        Operation::Messages => match answer.get("stop_reason").and_then(Value::as_str) {
            Some("end_turn" | "stop_sequence") => ok("stop"),
            Some("max_tokens") => ok("length"),
            Some("tool_use") => ok("tool_calls"),
            Some("refusal") => ok("content_filter"),
            _ => false,
        },
        Operation::Responses => match answer.get("status").and_then(Value::as_str) {
            Some("completed") => ok("stop"),
            _ => false,
        },
        Operation::Embeddings => answer.get("data").is_some_and(Value::is_array),
    }
}

/// Tokens an answer's usage counts (input + output, cache reads and writes included).
fn tokens(answer: &Value) -> u64 {
    let Some(u) = answer.get("usage") else {
        return 0;
    };
    let n = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0);
    let openai = n("prompt_tokens") + n("completion_tokens");
    let other = n("input_tokens")
        + n("output_tokens")
        + n("cache_read_input_tokens")
        + n("cache_creation_input_tokens");
    openai.max(other)
}

/// A string value, or `None` for any other value (skipped).
fn opt_text<'a>(w: &mut walk::Walker<'a>) -> walk::Walked<Option<std::borrow::Cow<'a, str>>> {
    if w.is_str() {
        w.str().map(Some)
    } else {
        w.skip().map(|_| None)
    }
}

/// Whether `choices` is a non-empty array whose every choice is an object
/// with an allowed `finish_reason`.
fn choices_finished(w: &mut walk::Walker<'_>, ok: &dyn Fn(&str) -> bool) -> walk::Walked<bool> {
    if !w.is_array() {
        return w.skip().map(|_| false);
    }
    let (mut any, mut all) = (false, true);
    w.array(|w| {
        any = true;
        if !w.is_object() {
            all = false;
            return w.skip().map(drop);
        }
        let mut reason = false;
        w.object(|w, k| {
            if &*k.name()? == b"finish_reason" {
                reason = opt_text(w)?.is_some_and(|r| ok(&r));
                Ok(())
            } else {
                w.skip().map(drop)
            }
        })?;
        all &= reason;
        Ok(())
    })?;
    Ok(any && all)
}

/// The usage's counts that decide the tokens an entry saves, each 0 when
/// absent or not an unsigned integer (and all 0 when usage is no object).
fn read_usage(w: &mut walk::Walker<'_>) -> walk::Walked<[u64; 6]> {
    let mut n = [0u64; 6];
    if !w.is_object() {
        return w.skip().map(|_| n);
    }
    w.object(|w, k| {
        let at = match &*k.name()? {
            b"prompt_tokens" => 0,
            b"completion_tokens" => 1,
            b"input_tokens" => 2,
            b"output_tokens" => 3,
            b"cache_read_input_tokens" => 4,
            b"cache_creation_input_tokens" => 5,
            _ => return w.skip().map(drop),
        };
        n[at] = walk::uint(w.skip()?).unwrap_or(0);
        Ok(())
    })?;
    Ok(n)
}

fn sse(out: &mut Vec<u8>, event: Option<&str>, data: &Value) {
    if let Some(e) = event {
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(e.as_bytes());
        out.push(b'\n');
    }
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(data.to_string().as_bytes());
    out.extend_from_slice(b"\n\n");
}

/// The stored answer as the provider's stream; `None` when it cannot be one.
pub fn to_stream(op: Operation, answer: &Value, include_usage: bool) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(answer.to_string().len() * 2);
    match op {
        Operation::Chat => chat_stream(&mut out, answer, include_usage)?,
        Operation::Completions => completions_stream(&mut out, answer, include_usage)?,
        Operation::Messages => messages_stream(&mut out, answer)?,
        Operation::Responses => responses_stream(&mut out, answer)?,
        Operation::Embeddings => return None,
    }
    Some(out)
}

fn openai_head(answer: &Value, object: &str) -> Map<String, Value> {
    let mut head = Map::new();
    for k in ["id", "created", "model", "system_fingerprint"] {
        if let Some(x) = answer.get(k) {
            head.insert(k.into(), x.clone());
        }
    }
    head.insert("object".into(), json!(object));
    head
}

fn chunk(head: &Map<String, Value>, choices: Value) -> Value {
    let mut c = head.clone();
    c.insert("choices".into(), choices);
    Value::Object(c)
}

fn usage_chunk(out: &mut Vec<u8>, head: &Map<String, Value>, answer: &Value, include: bool) {
    if include {
        if let Some(u) = answer.get("usage") {
            let mut c = head.clone();
            c.insert("choices".into(), json!([]));
            c.insert("usage".into(), u.clone());
            sse(out, None, &Value::Object(c));
        }
    }
    out.extend_from_slice(b"data: [DONE]\n\n");
}

fn chat_stream(out: &mut Vec<u8>, answer: &Value, include_usage: bool) -> Option<()> {
    let head = openai_head(answer, "chat.completion.chunk");
    for c in answer.get("choices")?.as_array()? {
        let index = c.get("index").cloned().unwrap_or(json!(0));
        let msg = c.get("message")?;
        let role = msg.get("role").cloned().unwrap_or(json!("assistant"));
        let opening = if msg.get("content").is_some_and(Value::is_string) {
            json!("")
        } else {
            Value::Null
        };
        let first = json!([{"index": index, "delta": {"role": role, "content": opening},
                            "logprobs": null, "finish_reason": null}]);
        sse(out, None, &chunk(&head, first));
        if let Some(text) = msg.get("content").and_then(Value::as_str) {
            if !text.is_empty() {
                let d = json!([{"index": index, "delta": {"content": text},
                                "logprobs": null, "finish_reason": null}]);
                sse(out, None, &chunk(&head, d));
            }
        }
        if let Some(r) = msg.get("refusal").and_then(Value::as_str) {
            let d = json!([{"index": index, "delta": {"refusal": r},
                            "logprobs": null, "finish_reason": null}]);
            sse(out, None, &chunk(&head, d));
        }
        if let Some(calls) = msg.get("tool_calls").and_then(Value::as_array) {
            for (i, call) in calls.iter().enumerate() {
                let mut call = call.as_object().cloned().unwrap_or_default();
                call.insert("index".into(), json!(i));
                let d = json!([{"index": index, "delta": {"tool_calls": [call]},
                                "logprobs": null, "finish_reason": null}]);
                sse(out, None, &chunk(&head, d));
            }
        }
        let last = json!([{"index": index, "delta": {}, "logprobs": null,
                           "finish_reason": c.get("finish_reason").cloned().unwrap_or(Value::Null)}]);
        sse(out, None, &chunk(&head, last));
    }
    usage_chunk(out, &head, answer, include_usage);
    Some(())
}

fn completions_stream(out: &mut Vec<u8>, answer: &Value, include_usage: bool) -> Option<()> {
    let head = openai_head(answer, "text_completion");
    for c in answer.get("choices")?.as_array()? {
        let index = c.get("index").cloned().unwrap_or(json!(0));
        let text = c.get("text").cloned().unwrap_or(json!(""));
        sse(
            out,
            None,
            &chunk(
                &head,
                json!([{"index": index, "text": text, "logprobs": null, "finish_reason": null}]),
            ),
        );
        let finish = c.get("finish_reason").cloned().unwrap_or(Value::Null);
        sse(
            out,
            None,
            &chunk(
                &head,
                json!([{"index": index, "text": "", "logprobs": null, "finish_reason": finish}]),
            ),
        );
    }
    usage_chunk(out, &head, answer, include_usage);
    Some(())
}

fn messages_stream(out: &mut Vec<u8>, answer: &Value) -> Option<()> {
    let mut start = answer.as_object()?.clone();
    let blocks = start.remove("content")?.as_array()?.clone();
    start.insert("content".into(), json!([]));
    start.insert("stop_reason".into(), Value::Null);
    start.insert("stop_sequence".into(), Value::Null);
    let usage = answer.get("usage").cloned().unwrap_or(json!({}));
    let mut start_usage = usage.as_object().cloned().unwrap_or_default();
    start_usage.insert("output_tokens".into(), json!(0));
    start.insert("usage".into(), Value::Object(start_usage));
    sse(
        out,
        Some("message_start"),
        &json!({"type": "message_start", "message": start}),
    );
    for (i, block) in blocks.iter().enumerate() {
        let kind = block.get("type").and_then(Value::as_str).unwrap_or("");
        let (empty, delta) = match kind {
            "text" => (
                json!({"type": "text", "text": ""}),
                Some(json!({"type": "text_delta", "text": block.get("text")?})),
            ),
            "tool_use" => {
                let mut b = block.as_object()?.clone();
                b.insert("input".into(), json!({}));
                let input = block.get("input").cloned().unwrap_or(json!({}));
                (
                    Value::Object(b),
                    Some(json!({"type": "input_json_delta", "partial_json": input.to_string()})),
                )
            }
            "thinking" => (
                json!({"type": "thinking", "thinking": ""}),
                Some(json!({"type": "thinking_delta", "thinking": block.get("thinking")?})),
            ),
            _ => (block.clone(), None),
        };
        sse(
            out,
            Some("content_block_start"),
            &json!({"type": "content_block_start", "index": i, "content_block": empty}),
        );
        if let Some(d) = delta {
            sse(
                out,
                Some("content_block_delta"),
                &json!({"type": "content_block_delta", "index": i, "delta": d}),
            );
        }
        if let Some(sig) = block.get("signature") {
            sse(
                out,
                Some("content_block_delta"),
                &json!({"type": "content_block_delta", "index": i,
                        "delta": {"type": "signature_delta", "signature": sig}}),
            );
        }
        sse(
            out,
            Some("content_block_stop"),
            &json!({"type": "content_block_stop", "index": i}),
        );
    }
    let output_tokens = usage.get("output_tokens").cloned().unwrap_or(json!(0));
    sse(
        out,
        Some("message_delta"),
        &json!({"type": "message_delta",
                "delta": {"stop_reason": answer.get("stop_reason"),
                          "stop_sequence": answer.get("stop_sequence").cloned().unwrap_or(Value::Null)},
                "usage": {"output_tokens": output_tokens}}),
    );
    sse(out, Some("message_stop"), &json!({"type": "message_stop"}));
    Some(())
}

fn responses_stream(out: &mut Vec<u8>, answer: &Value) -> Option<()> {
    let mut seq = 0u64;
    let mut emit = |out: &mut Vec<u8>, kind: &str, mut v: Map<String, Value>| {
        v.insert("type".into(), json!(kind));
        v.insert("sequence_number".into(), json!(seq));
        seq += 1;
        sse(out, Some(kind), &Value::Object(v));
    };
    let mut created = answer.as_object()?.clone();
    created.insert("status".into(), json!("in_progress"));
    created.insert("output".into(), json!([]));
    created.insert("usage".into(), Value::Null);
    let obj = |pairs: Vec<(&str, Value)>| -> Map<String, Value> {
        pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
    };
    emit(
        out,
        "response.created",
        obj(vec![("response", Value::Object(created.clone()))]),
    );
    emit(
        out,
        "response.in_progress",
        obj(vec![("response", Value::Object(created))]),
    );
    let items = answer
        .get("output")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for (i, item) in items.iter().enumerate() {
        let item_id = item.get("id").cloned().unwrap_or(Value::Null);
        let mut added = item.as_object().cloned().unwrap_or_default();
        added.insert("status".into(), json!("in_progress"));
        let parts = added
            .get("content")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        if added.contains_key("content") {
            added.insert("content".into(), json!([]));
        }
        emit(
            out,
            "response.output_item.added",
            obj(vec![
                ("output_index", json!(i)),
                ("item", Value::Object(added)),
            ]),
        );
        for (j, part) in parts.iter().enumerate() {
            let is_text = part.get("type").and_then(Value::as_str) == Some("output_text");
            let mut empty = part.as_object().cloned().unwrap_or_default();
            if is_text {
                empty.insert("text".into(), json!(""));
            }
            let at = |extra: Vec<(&str, Value)>| {
                let mut m = obj(vec![
                    ("item_id", item_id.clone()),
                    ("output_index", json!(i)),
                    ("content_index", json!(j)),
                ]);
                m.extend(obj(extra));
                m
            };
            emit(
                out,
                "response.content_part.added",
                at(vec![("part", Value::Object(empty))]),
            );
            if is_text {
                let text = part.get("text").cloned().unwrap_or(json!(""));
                emit(
                    out,
                    "response.output_text.delta",
                    at(vec![("delta", text.clone())]),
                );
                emit(out, "response.output_text.done", at(vec![("text", text)]));
            }
            emit(
                out,
                "response.content_part.done",
                at(vec![("part", part.clone())]),
            );
        }
        emit(
            out,
            "response.output_item.done",
            obj(vec![("output_index", json!(i)), ("item", item.clone())]),
        );
    }
    emit(
        out,
        "response.completed",
        obj(vec![("response", answer.clone())]),
    );
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::sse::{Item, Limits, Parser};

    fn events(stream: &[u8]) -> Vec<(String, String)> {
        let mut p = Parser::new(Limits::default(), false);
        let mut out = Vec::new();
        p.feed(stream, |i| {
            if let Item::Event(e) = i {
                out.push((
                    String::from_utf8_lossy(e.event_type).into_owned(),
                    String::from_utf8_lossy(e.data).into_owned(),
                ));
            }
        });
        out
    }

    fn assemble(op: Operation, stream: &[u8]) -> Option<Value> {
        let mut a = Assembler::new(op);
        for (t, d) in events(stream) {
            a.event(t.as_bytes(), d.as_bytes());
        }
        a.finish()
    }

    /// Whether the answer, as bytes, is kept.
    fn kept(op: Operation, answer: &Value, allowed: &[String]) -> bool {
        keepable(op, &serde_json::to_vec(answer).unwrap(), allowed).is_some()
    }

    #[test]
    fn answers_are_judged_in_place_as_parsed() {
        let ops = [
            Operation::Chat,
            Operation::Completions,
            Operation::Messages,
            Operation::Responses,
            Operation::Embeddings,
        ];
        let allowed = [
            vec!["stop".to_string()],
            vec![
                "stop".to_string(),
                "length".to_string(),
                "tool_calls".to_string(),
            ],
            vec!["content_filter".to_string(), "length".to_string()],
        ];
        let mut docs: Vec<String> = answers().iter().map(|(_, a)| a.to_string()).collect();
        docs.extend(
            [
                r#"{"choices":[{"finish_reason":"length"},{"finish_reason":"stop"}]}"#,
                r#"{"choices":[{"finish_reason":"stop"},5]}"#,
                r#"{"choices":[{"finish_reason":5}]}"#,
                r#"{"choices":[]}"#,
                r#"{"choices":{"finish_reason":"stop"}}"#,
                r#"{"choices":[{"finish_reason":"stop","finish_reason":"length"}]}"#,
                r#"{"choices":[{"finish_reason":"length"}],"choices":[{"finish_reason":"stop"}]}"#,
                r#"{"stop_reason":"max_tokens","usage":{"input_tokens":3,"output_tokens":1.5}}"#,
                r#"{"stop_reason":"refusal","stop_reason":"tool_use"}"#,
                r#"{"stop_reason":null,"status":"completed","data":[]}"#,
                r#"{"status":"failed","data":{}}"#,
                r#"{"usage":{"prompt_tokens":7,"completion_tokens":"2","input_tokens":-1,"cache_read_input_tokens":4,"cache_creation_input_tokens":99999999999999999999}}"#,
                r#"{"usage":[1,2],"choices":[{"finish_reason":"stop"}]}"#,
                r#"{"usage":{"prompt_tokens":1},"usage":{"completion_tokens":2},"choices":[{"finish_reason":"stop"}]}"#,
                r#"{"ch\u006fices":[{"finish_re\u0061son":"st\u006fp"}]}"#,
                "[1]",
                "5",
            ]
            .map(String::from),
        );
        for doc in &docs {
            let v: Value = serde_json::from_str(doc).unwrap();
            for op in ops {
                for a in &allowed {
                    let want = keepable_value(op, &v, a);
                    assert_eq!(keepable(op, doc.as_bytes(), a), want, "{op:?} {a:?} {doc}");
                }
            }
        }
        // Not one JSON document, or not all UTF-8: not kept.
        for bad in [
            &br#"{"choices":[{"finish_reason":"stop"}]"#[..],
            br#"{"choices":[{"finish_reason":"stop"}]} {}"#,
            b"{\"choices\":[{\"finish_reason\":\"stop\"}],\"x\":\"\xff\"}",
            b"",
        ] {
            let stop = ["stop".to_string()];
            assert_eq!(keepable(Operation::Chat, bad, &stop), None);
        }
    }

    fn answers() -> Vec<(Operation, Value)> {
        vec![
            (
                Operation::Chat,
                json!({"id":"c1","object":"chat.completion","created":1,"model":"gpt-4o",
                       "choices":[{"index":0,"message":{"role":"assistant","content":"w0 w1 "},
                                   "logprobs":null,"finish_reason":"stop"}],
                       "usage":{"prompt_tokens":4,"completion_tokens":2,"total_tokens":6}}),
            ),
            (
                Operation::Chat,
                json!({"id":"c2","object":"chat.completion","created":1,"model":"gpt-4o",
                       "choices":[{"index":0,"message":{"role":"assistant","content":null,
                         "tool_calls":[{"id":"t1","type":"function","function":{"name":"f","arguments":"{\"a\":1}"}}]},
                         "logprobs":null,"finish_reason":"tool_calls"}],
                       "usage":{"prompt_tokens":4,"completion_tokens":2,"total_tokens":6}}),
            ),
            (
                Operation::Completions,
                json!({"id":"p1","object":"text_completion","created":1,"model":"m",
                       "choices":[{"index":0,"text":"abc","logprobs":null,"finish_reason":"length"}],
                       "usage":{"prompt_tokens":1,"completion_tokens":3,"total_tokens":4}}),
            ),
            (
                Operation::Messages,
                json!({"id":"msg_1","type":"message","role":"assistant","model":"claude",
                       "content":[{"type":"text","text":"hello"},
                                  {"type":"tool_use","id":"tu","name":"f","input":{"q":"x"}}],
                       "stop_reason":"end_turn","stop_sequence":null,
                       "usage":{"input_tokens":5,"output_tokens":3}}),
            ),
            (
                Operation::Responses,
                json!({"id":"resp_1","object":"response","created_at":1,"status":"completed","model":"gpt-4o",
                       "output":[{"type":"message","id":"m1","status":"completed","role":"assistant",
                                  "content":[{"type":"output_text","text":"hi","annotations":[]}]}],
                       "usage":{"input_tokens":3,"output_tokens":1,"total_tokens":4}}),
            ),
        ]
    }

    #[test]
    fn every_stream_replays_and_assembles_back_to_the_answer() {
        for (op, answer) in answers() {
            let stream = to_stream(op, &answer, true).unwrap();
            let text = String::from_utf8(stream.clone()).unwrap();
            let back = assemble(op, &stream).unwrap_or_else(|| panic!("{op:?}: {text}"));
            assert_eq!(back, answer, "{op:?}: {text}");
            match op {
                Operation::Chat | Operation::Completions => {
                    assert!(text.ends_with("data: [DONE]\n\n"), "{text}")
                }
                Operation::Messages => {
                    assert!(text
                        .ends_with("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"))
                }
                _ => assert!(text.contains("event: response.completed\n")),
            }
        }
    }

    #[test]
    fn usage_is_in_an_openai_stream_only_when_asked() {
        let (op, answer) = answers().remove(0);
        let with = String::from_utf8(to_stream(op, &answer, true).unwrap()).unwrap();
        let without = String::from_utf8(to_stream(op, &answer, false).unwrap()).unwrap();
        assert!(
            with.contains("\"usage\":{\"completion_tokens\":2"),
            "{with}"
        );
        assert!(!without.contains("usage"), "{without}");
        let stop = ["stop".to_string()];
        let bytes = serde_json::to_vec(&answer).unwrap();
        assert_eq!(keepable(op, &bytes, &stop), Some(6));
    }

    #[test]
    fn broken_or_unfinished_streams_are_not_answers() {
        let ok = to_stream(Operation::Chat, &answers()[0].1, true).unwrap();
        let cut = &ok[..ok.len() - "data: [DONE]\n\n".len()];
        assert!(assemble(Operation::Chat, cut).is_none(), "no [DONE]");
        let mut errored = cut.to_vec();
        errored.extend_from_slice(
            b"data: {\"error\":{\"message\":\"overloaded\"}}\n\ndata: [DONE]\n\n",
        );
        assert!(assemble(Operation::Chat, &errored).is_none(), "error event");
        let mut garbage = cut.to_vec();
        garbage.extend_from_slice(b"data: {not json\n\ndata: [DONE]\n\n");
        assert!(assemble(Operation::Chat, &garbage).is_none());
        let a = to_stream(Operation::Messages, &answers()[3].1, true).unwrap();
        let a_cut = &a[..a.len() - 60];
        assert!(assemble(Operation::Messages, a_cut).is_none());
        let failed =
            b"event: response.failed\ndata: {\"type\":\"response.failed\",\"response\":{}}\n\n";
        assert!(assemble(Operation::Responses, failed).is_none());
    }

    #[test]
    fn openai_chunks_are_read_as_json_reads_them() {
        // Escaped text is joined unescaped; members of another type than
        // text are skipped, as `Value::as_str` skips them; the head is the
        // first chunk's.
        let s = concat!(
            "data: {\"id\":\"c1\",\"created\":1,\"model\":\"m\",\"system_fingerprint\":null,",
            "\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"a\\n\\\"b\\u00e9 \"},",
            "\"finish_reason\":null}],\"usage\":null}\n\n",
            "data: {\"id\":\"c2\",\"model\":7,\"choices\":[{\"index\":0,\"delta\":{\"content\":[1,{\"x\":2}],",
            "\"refusal\":5},\"text\":{}}],\"usage\":null}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"c\"},\"finish_reason\":\"stop\"}]}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2,\"total_tokens\":3}}\n\n",
            "data: [DONE]\n\n",
        );
        let answer = assemble(Operation::Chat, s.as_bytes()).unwrap();
        assert_eq!(
            answer,
            json!({"id":"c1","object":"chat.completion","created":1,"model":"m",
                   "choices":[{"index":0,"message":{"role":"assistant","content":"a\n\"b\u{e9} c"},
                               "logprobs":null,"finish_reason":"stop"}],
                   "usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}})
        );
        // An error member, even null, and data that is not an object end it.
        for bad in [
            "data: {\"error\":null,\"choices\":[]}\n\n",
            "data: {\"type\":\"error\"}\n\n",
            "data: []\n\n",
            "data: \"x\"\n\n",
            "data: {\"choices\":[{\"index\":0,\"finish_reason\":1e400}]}\n\n",
            "data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":1e400}]}}]}\n\n",
        ] {
            let stream = format!("{s}{bad}");
            let mut a = Assembler::new(Operation::Chat);
            for (t, d) in events(stream.as_bytes()) {
                a.event(t.as_bytes(), d.as_bytes());
            }
            assert!(a.failed(), "{bad}");
        }
        // A member that is not kept (the head is the first chunk's) is only
        // checked as JSON, not made a value.
        let later = s.replace(
            "data: [DONE]",
            "data: {\"id\":1e400,\"choices\":[]}\n\ndata: [DONE]",
        );
        assert_eq!(assemble(Operation::Chat, later.as_bytes()), Some(answer));
    }

    #[test]
    fn odd_events_are_not_answers_and_never_panic() {
        let streams: &[(Operation, &str)] = &[
            (Operation::Messages, "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":5}}\n\nevent: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":1}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"),
            (Operation::Messages, "data: {\"type\":\"message_start\",\"message\":{}}\n\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":5}\n\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"x\"}}\n\ndata: {\"type\":\"message_stop\"}\n\n"),
            (Operation::Messages, "data: {\"type\":\"message_start\",\"message\":{}}\n\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":[]}\n\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\ndata: {\"type\":\"content_block_delta\",\"index\":7,\"delta\":{}}\n\ndata: {\"type\":\"message_stop\"}\n\n"),
            (Operation::Chat, "data: {\"choices\":[{\"index\":99999,\"delta\":{}}]}\n\ndata: [DONE]\n\n"),
            (Operation::Chat, "data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":5}]}}]}\n\ndata: [DONE]\n\n"),
            (Operation::Chat, "data: {\"choices\":5}\n\ndata: [DONE]\n\n"),
            (Operation::Responses, "data: {\"type\":\"response.completed\"}\n\n"),
        ];
        let stop = ["stop".to_string()];
        for (op, s) in streams {
            // Either no answer, or none worth keeping.
            let kept = assemble(*op, s.as_bytes()).is_some_and(|a| kept(*op, &a, &stop));
            assert!(!kept, "{op:?}: {s}");
        }
        for answer in [
            json!(5),
            json!({"choices": 5}),
            json!({"content": [5], "usage": 3}),
            json!({"output": [{"content": 7}]}),
        ] {
            for op in [
                Operation::Chat,
                Operation::Completions,
                Operation::Messages,
                Operation::Responses,
            ] {
                let _ = to_stream(op, &answer, true);
                let _ = kept(op, &answer, &["stop".to_string()]);
            }
        }
    }

    #[test]
    fn finish_reasons_decide_what_is_kept() {
        let stop = vec!["stop".to_string()];
        let both = vec!["stop".to_string(), "length".to_string()];
        let a = answers();
        assert!(kept(Operation::Chat, &a[0].1, &stop));
        assert!(!kept(Operation::Chat, &a[1].1, &both), "tool_calls");
        assert!(!kept(Operation::Completions, &a[2].1, &stop));
        assert!(kept(Operation::Completions, &a[2].1, &both));
        assert!(kept(Operation::Messages, &a[3].1, &stop));
        assert!(kept(Operation::Responses, &a[4].1, &stop));
        assert!(!kept(Operation::Chat, &json!({"choices":[]}), &stop));
        assert!(kept(Operation::Embeddings, &json!({"data":[]}), &stop));
    }
}
