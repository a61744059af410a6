//! What the router reads from a request body beyond the shared facts, and
//! the two edits it makes to it.
//!
//! The shared [`RequestFacts`](crate::wire::request::RequestFacts) carry the
//! model, `stream` and the prompt's size. Rules on tools, images or the last
//! user message, and the complexity score, need the conversation's shape,
//! which only this filter wants: it is read here, in one serde pass, only
//! when the configuration or the request needs it. Image data and tool
//! schemas are skipped without being allocated.
//!
//! The edits (the `model` sent upstream, a capped `max_tokens`) are splices
//! of one top-level member's value: the rest of the body keeps its bytes and
//! member order, and nothing is re-serialised.

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use std::borrow::Cow;
use std::fmt;

/// The conversation's shape, as routing needs it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Shape {
    /// Messages (or input items) in the conversation.
    pub messages: u32,
    /// Of which from the user.
    pub user_turns: u32,
    /// Text of the last user message (kept in memory only, never logged).
    pub last_user: String,
    /// A code fence or other code marker anywhere in the conversation.
    pub code: bool,
    pub images: bool,
    pub tools: bool,
    /// `max_completion_tokens`, `max_tokens` or `max_output_tokens`, as asked.
    pub max_tokens: Option<u64>,
    /// Which of those members the request used.
    pub max_tokens_field: Option<&'static str>,
}

#[derive(Deserialize)]
struct Wire {
    #[serde(default)]
    messages: Option<Messages>,
    #[serde(default)]
    input: Option<Messages>,
    #[serde(default)]
    prompt: Option<Messages>,
    #[serde(default)]
    tools: Option<Vec<IgnoredAny>>,
    #[serde(default)]
    functions: Option<Vec<IgnoredAny>>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
    #[serde(default)]
    max_output_tokens: Option<u64>,
}

/// Reads the shape; `None` for a body that is not a JSON object.
pub fn shape(body: &[u8]) -> Option<Shape> {
    let w: Wire = serde_json::from_slice(body).ok()?;
    let mut s = Shape {
        tools: w.tools.is_some_and(|t| !t.is_empty()) || w.functions.is_some_and(|f| !f.is_empty()),
        max_tokens: w
            .max_completion_tokens
            .or(w.max_tokens)
            .or(w.max_output_tokens),
        max_tokens_field: [
            ("max_completion_tokens", w.max_completion_tokens),
            ("max_tokens", w.max_tokens),
            ("max_output_tokens", w.max_output_tokens),
        ]
        .iter()
        .find(|(_, v)| v.is_some())
        .map(|(k, _)| *k),
        ..Shape::default()
    };
    for m in [w.messages, w.input, w.prompt].into_iter().flatten() {
        s.messages += m.count;
        s.user_turns += m.user_turns;
        s.code |= m.code;
        s.images |= m.images;
        if m.last_user.is_some() {
            s.last_user = m.last_user.unwrap_or_default();
        }
    }
    Some(s)
}

/// Markers that a text carries code.
fn has_code(text: &str) -> bool {
    const MARKERS: &[&str] = &[
        "```",
        "def ",
        "fn ",
        "function ",
        "class ",
        "#include",
        "import ",
        "SELECT ",
        "=>",
        "};",
    ];
    MARKERS.iter().any(|m| text.contains(m))
}

/// A conversation: a string (one user message), or an array of messages or
/// input items, each with a role and a content (a string or parts).
#[derive(Default)]
struct Messages {
    count: u32,
    user_turns: u32,
    last_user: Option<String>,
    code: bool,
    images: bool,
}

impl Messages {
    fn user_text(&mut self, text: String) {
        self.count += 1;
        self.user_turns += 1;
        self.code |= has_code(&text);
        self.last_user = Some(text);
    }
}

impl<'de> Deserialize<'de> for Messages {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(MessagesVisitor)
    }
}

struct MessagesVisitor;

impl<'de> Visitor<'de> for MessagesVisitor {
    type Value = Messages;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string or an array of messages")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Messages, E> {
        let mut m = Messages::default();
        m.user_text(v.to_string());
        Ok(m)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Messages, E> {
        Ok(Messages::default())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Messages, A::Error> {
        let mut m = Messages::default();
        while let Some(item) = seq.next_element::<Item>()? {
            match item {
                Item::Text(t) => m.user_text(t),
                Item::Message { role, content } => {
                    m.count += 1;
                    m.images |= content.images;
                    m.code |= content.code;
                    if role.as_deref().is_none_or(|r| r == "user") {
                        m.user_turns += 1;
                        m.last_user = Some(content.text);
                    }
                }
                Item::Other => {}
            }
        }
        Ok(m)
    }
}

/// One element of a conversation array.
enum Item {
    /// A bare string (a completions prompt array, a responses input list).
    Text(String),
    Message {
        role: Option<String>,
        content: Content,
    },
    /// A number (token ids) or an item without content (a tool call).
    Other,
}

impl<'de> Deserialize<'de> for Item {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ItemVisitor)
    }
}

struct ItemVisitor;

impl<'de> Visitor<'de> for ItemVisitor {
    type Value = Item;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a message")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Item, E> {
        Ok(Item::Text(v.to_string()))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Item, E> {
        Ok(Item::Other)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Item, E> {
        Ok(Item::Other)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Item, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Item::Other)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Item, A::Error> {
        let mut role = None;
        let mut content = None;
        let mut kind: Option<String> = None;
        let mut text = None;
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            match key.as_ref() {
                "role" => role = map.next_value::<Option<String>>()?,
                "content" => content = Some(map.next_value::<Content>()?),
                "type" => kind = map.next_value::<Option<String>>()?,
                "text" => text = map.next_value::<Option<String>>()?,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        // A responses input item may be a bare part (`{"type":"input_text","text":..}`).
        let content = match (content, text) {
            (Some(c), _) => c,
            (None, Some(t)) => Content::from_text(t),
            (None, None) => {
                let images = kind.as_deref().is_some_and(is_image);
                return Ok(if images {
                    Item::Message {
                        role,
                        content: Content {
                            images,
                            ..Content::default()
                        },
                    }
                } else {
                    Item::Other
                });
            }
        };
        Ok(Item::Message { role, content })
    }
}

fn is_image(kind: &str) -> bool {
    matches!(kind, "image_url" | "image" | "input_image")
}

/// A message's content: its text (parts joined) and whether it has images.
#[derive(Default)]
struct Content {
    text: String,
    images: bool,
    code: bool,
}

impl Content {
    fn from_text(text: String) -> Content {
        Content {
            code: has_code(&text),
            text,
            images: false,
        }
    }
}

impl<'de> Deserialize<'de> for Content {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ContentVisitor)
    }
}

struct ContentVisitor;

#[derive(Deserialize)]
struct Part<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    text: Option<Cow<'a, str>>,
}

impl<'de> Visitor<'de> for ContentVisitor {
    type Value = Content;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string or an array of parts")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Content, E> {
        Ok(Content::from_text(v.to_string()))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Content, E> {
        Ok(Content::default())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Content, A::Error> {
        let mut c = Content::default();
        while let Some(p) = seq.next_element::<Part<'de>>()? {
            if p.kind.as_deref().is_some_and(is_image) {
                c.images = true;
            }
            if let Some(t) = p.text {
                if !c.text.is_empty() {
                    c.text.push('\n');
                }
                c.text.push_str(&t);
            }
        }
        c.code = has_code(&c.text);
        Ok(c)
    }
}

// ---------------------------------------------------------------------------
// Splices.

fn ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while b.get(i).copied().is_some_and(ws) {
        i += 1;
    }
    i
}

/// The end (one past the closing quote) of the string starting at `i`.
fn string_end(b: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    while j < b.len() {
        match b[j] {
            b'\\' => j += 2,
            b'"' => return Some(j + 1),
            _ => j += 1,
        }
    }
    None
}

/// The end of the JSON value starting at `i`.
fn value_end(b: &[u8], i: usize) -> Option<usize> {
    match b.get(i)? {
        b'"' => string_end(b, i),
        b'{' | b'[' => {
            let mut depth = 0u32;
            let mut j = i;
            while j < b.len() {
                match b[j] {
                    b'"' => {
                        j = string_end(b, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            None
        }
        _ => {
            let mut j = i;
            while j < b.len() && !matches!(b[j], b',' | b'}' | b']') && !ws(b[j]) {
                j += 1;
            }
            Some(j)
        }
    }
}

/// Where the top-level object opens, and the span of member `key`'s value
/// if it has one. `None` when the body is not an object.
fn member(b: &[u8], key: &str) -> Option<(usize, Option<(usize, usize)>)> {
    let open = skip_ws(b, 0);
    if b.get(open) != Some(&b'{') {
        return None;
    }
    let want = serde_json::to_string(key).ok()?;
    let mut i = skip_ws(b, open + 1);
    loop {
        match b.get(i)? {
            b'}' => return Some((open, None)),
            b'"' => {}
            _ => return None,
        }
        let k_end = string_end(b, i)?;
        let is_key = &b[i..k_end] == want.as_bytes();
        i = skip_ws(b, k_end);
        if b.get(i) != Some(&b':') {
            return None;
        }
        let v = skip_ws(b, i + 1);
        let v_end = value_end(b, v)?;
        if is_key {
            return Some((open, Some((v, v_end))));
        }
        i = skip_ws(b, v_end);
        match b.get(i)? {
            b',' => i = skip_ws(b, i + 1),
            b'}' => return Some((open, None)),
            _ => return None,
        }
    }
}

/// The body with top-level member `key` set to the JSON `value`: its value
/// replaced in place, or the member added first. `None` if the body is not
/// a JSON object.
pub fn set_member(body: &[u8], key: &str, value: &str) -> Option<Vec<u8>> {
    let (open, span) = member(body, key)?;
    let mut out = Vec::with_capacity(body.len() + key.len() + value.len() + 4);
    match span {
        Some((a, z)) => {
            out.extend_from_slice(&body[..a]);
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(&body[z..]);
        }
        None => {
            let rest = &body[open + 1..];
            let empty = rest.get(skip_ws(rest, 0)) == Some(&b'}');
            out.extend_from_slice(&body[..=open]);
            out.extend_from_slice(serde_json::to_string(key).ok()?.as_bytes());
            out.push(b':');
            out.extend_from_slice(value.as_bytes());
            if !empty {
                out.push(b',');
            }
            out.extend_from_slice(rest);
        }
    }
    Some(out)
}

/// Replaces the value of every string-valued `"model"` member, at any depth,
/// with `model` (a JSON string). An unescaped `"model"` followed by `:` can
/// only be an object key: inside a JSON string its quotes would be escaped.
/// Returns the new bytes and the first value replaced (as JSON); `None`
/// when there is nothing to replace.
pub fn replace_model_values(raw: &[u8], model: &str) -> Option<(Vec<u8>, Vec<u8>)> {
    let key = b"\"model\"";
    let mut out = Vec::new();
    let mut first: Option<Vec<u8>> = None;
    let mut copied = 0;
    let mut from = 0;
    while let Some(pos) = find(&raw[from..], key).map(|p| p + from) {
        // The quote must open a string, not close an escaped one.
        let escaped = pos > 0 && raw[pos - 1] == b'\\';
        let mut i = skip_ws(raw, pos + key.len());
        from = pos + 1;
        if escaped || raw.get(i) != Some(&b':') {
            continue;
        }
        i = skip_ws(raw, i + 1);
        if raw.get(i) != Some(&b'"') {
            continue;
        }
        let Some(end) = string_end(raw, i) else {
            break;
        };
        out.extend_from_slice(&raw[copied..i]);
        first.get_or_insert_with(|| raw[i..end].to_vec());
        out.extend_from_slice(model.as_bytes());
        copied = end;
        from = end;
    }
    if copied == 0 {
        return None;
    }
    out.extend_from_slice(&raw[copied..]);
    Some((out, first.unwrap_or_default()))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
#[allow(clippy::type_complexity)] // tables of cases read best inline
mod tests {
    use super::*;

    #[test]
    fn splices_keep_the_rest_of_the_body() {
        let cases: &[(&str, &str, &str, &str)] = &[
            (
                r#"{"model":"fast","messages":[{"role":"user","content":"hi"}]}"#,
                "model",
                r#""gpt-4o-mini""#,
                r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#,
            ),
            (
                r#"{ "messages": [{"content":"{\"model\":1}"}] , "model" : "x" , "n":1}"#,
                "model",
                r#""y""#,
                r#"{ "messages": [{"content":"{\"model\":1}"}] , "model" : "y" , "n":1}"#,
            ),
            (
                r#"{"messages":[]}"#,
                "model",
                r#""m""#,
                r#"{"model":"m","messages":[]}"#,
            ),
            (" { } ", "max_tokens", "5", r#" {"max_tokens":5 } "#),
            (
                r#"{"max_tokens":9000,"stream":true}"#,
                "max_tokens",
                "1024",
                r#"{"max_tokens":1024,"stream":true}"#,
            ),
            (
                r#"{"a":{"max_tokens":1},"max_tokens":null}"#,
                "max_tokens",
                "2",
                r#"{"a":{"max_tokens":1},"max_tokens":2}"#,
            ),
        ];
        for (body, key, value, want) in cases {
            let got = set_member(body.as_bytes(), key, value).unwrap();
            assert_eq!(std::str::from_utf8(&got).unwrap(), *want, "{body}");
            serde_json::from_slice::<serde_json::Value>(&got).unwrap();
        }
        assert!(set_member(b"[1]", "model", "1").is_none());
        assert!(set_member(b"not json", "model", "1").is_none());
    }

    #[test]
    fn response_models_are_replaced_wherever_they_are_keys() {
        let raw = br#"data: {"id":"x","model":"gpt-4o-mini","choices":[{"delta":{"content":"\"model\": \"no\""}}]}"#;
        let (out, was) = replace_model_values(raw, r#""fast""#).unwrap();
        assert_eq!(was, br#""gpt-4o-mini""#);
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"data: {"id":"x","model":"fast","choices":[{"delta":{"content":"\"model\": \"no\""}}]}"#
        );
        let nested = br#"{"type":"message_start","message":{"model" : "claude-x"}}"#;
        let (out, _) = replace_model_values(nested, r#""c""#).unwrap();
        assert_eq!(
            out,
            br#"{"type":"message_start","message":{"model" : "c"}}"#
        );
        assert!(replace_model_values(br#"{"model":null}"#, "\"c\"").is_none());
    }

    #[test]
    fn shape_of_each_api() {
        let cases: &[(&str, u32, u32, &str, bool, bool, bool, Option<u64>)] = &[
            (
                r#"{"model":"m","messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hi"},{"role":"assistant","content":"yo"},{"role":"user","content":[{"type":"text","text":"see"},{"type":"image_url","image_url":{"url":"data:x"}}]}],"tools":[{"type":"function"}],"max_completion_tokens":50}"#,
                4,
                2,
                "see",
                false,
                true,
                true,
                Some(50),
            ),
            (
                r#"{"model":"m","input":"def f(): pass","max_output_tokens":7}"#,
                1,
                1,
                "def f(): pass",
                true,
                false,
                false,
                Some(7),
            ),
            (
                r#"{"model":"m","input":[{"role":"user","content":[{"type":"input_text","text":"a"},{"type":"input_image","image_url":"x"}]}],"tools":[]}"#,
                1,
                1,
                "a",
                false,
                true,
                false,
                None,
            ),
            (
                r#"{"model":"m","system":"s","messages":[{"role":"user","content":"```x```"}],"max_tokens":9}"#,
                1,
                1,
                "```x```",
                true,
                false,
                false,
                Some(9),
            ),
            (
                r#"{"model":"m","prompt":["a","b"]}"#,
                2,
                2,
                "b",
                false,
                false,
                false,
                None,
            ),
            (
                r#"{"model":"m","input":[1,2,3]}"#,
                0,
                0,
                "",
                false,
                false,
                false,
                None,
            ),
        ];
        for (body, messages, users, last, code, images, tools, max) in cases {
            let s = shape(body.as_bytes()).unwrap();
            assert_eq!(s.messages, *messages, "{body}");
            assert_eq!(s.user_turns, *users, "{body}");
            assert_eq!(s.last_user, *last, "{body}");
            assert_eq!(s.code, *code, "{body}");
            assert_eq!(s.images, *images, "{body}");
            assert_eq!(s.tools, *tools, "{body}");
            assert_eq!(s.max_tokens, *max, "{body}");
        }
        assert!(shape(b"nope").is_none());
    }
}
