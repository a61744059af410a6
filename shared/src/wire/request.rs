//! What the request body says, read once.
//!
//! Every filter wants a few facts from the request body: the model, whether a
//! stream is asked for, whether OpenAI's `stream_options.include_usage` is on,
//! and how much prompt text there is (for a token estimate when the provider
//! reports none). They are read in one pass by serde into borrowed fields;
//! everything else in the body (images, tool schemas, long histories) is
//! skipped without being allocated. The result is small and is what the
//! filters share instead of parsing the body again.

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use std::borrow::Cow;
use std::fmt;

/// The facts of one request body.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct RequestFacts {
    pub model: Option<String>,
    pub stream: bool,
    /// `stream_options.include_usage` is `true`.
    pub include_usage: bool,
    /// A `stream_options` member is present (whatever its content).
    pub has_stream_options: bool,
    /// Bytes of prompt text (message contents, prompt, input, system, instructions).
    pub text_bytes: u64,
}

#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(default)]
    stream: Option<bool>,
    /// Outer `Some` when the member is present, even as `null`.
    #[serde(default, deserialize_with = "present")]
    stream_options: Option<Option<StreamOptions>>,
    #[serde(default)]
    messages: Option<TextLen>,
    #[serde(default)]
    prompt: Option<TextLen>,
    #[serde(default)]
    input: Option<TextLen>,
    #[serde(default)]
    system: Option<TextLen>,
    #[serde(default)]
    instructions: Option<TextLen>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// Reads the facts of a request body; `Err` for a body that is not a JSON object.
pub fn parse(body: &[u8]) -> Result<RequestFacts, serde_json::Error> {
    let wire: Wire<'_> = serde_json::from_slice(body)?;
    let text_bytes = [
        &wire.messages,
        &wire.prompt,
        &wire.input,
        &wire.system,
        &wire.instructions,
    ]
    .iter()
    .map(|t| t.as_ref().map_or(0, |t| t.0))
    .sum();
    Ok(RequestFacts {
        model: wire.model.map(Cow::into_owned),
        stream: wire.stream.unwrap_or(false),
        include_usage: wire
            .stream_options
            .as_ref()
            .and_then(|o| o.as_ref()?.include_usage)
            .unwrap_or(false),
        has_stream_options: wire.stream_options.is_some(),
        text_bytes,
    })
}

/// Returns the body with `stream_options.include_usage` set to true, or
/// `None` when it already is or the body cannot be edited.
///
/// The common case (no `stream_options` at all) is a splice after the opening
/// brace, so the body is not re-serialised and keeps its key order.
pub fn with_include_usage(body: &[u8], facts: &RequestFacts) -> Option<Vec<u8>> {
    if facts.include_usage {
        return None;
    }
    if !facts.has_stream_options {
        let open = body.iter().position(|b| !b.is_ascii_whitespace())?;
        if body[open] != b'{' {
            return None;
        }
        let rest = &body[open + 1..];
        let empty = rest
            .iter()
            .find(|b| !b.is_ascii_whitespace())
            .is_some_and(|b| *b == b'}');
        let member: &[u8] = if empty {
            br#""stream_options":{"include_usage":true}"#
        } else {
            br#""stream_options":{"include_usage":true},"#
        };
        let mut out = Vec::with_capacity(body.len() + member.len());
        out.extend_from_slice(&body[..=open]);
        out.extend_from_slice(member);
        out.extend_from_slice(rest);
        return Some(out);
    }
    // Rare: stream_options is there without include_usage. Edit the value.
    let mut value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let options = value.get_mut("stream_options")?;
    if options.is_null() {
        *options = serde_json::json!({});
    }
    options
        .as_object_mut()?
        .insert("include_usage".into(), serde_json::Value::Bool(true));
    serde_json::to_vec(&value).ok()
}

/// Sums the bytes of the text-bearing strings below a JSON value without
/// allocating them: strings count; in objects only the members that carry
/// prompt text are followed (so image data, ids and roles do not count).
pub(crate) struct TextLen(pub u64);

/// Whether an object member carries prompt text, read from its key
/// without allocating it (serde's `Cow<str>` would own every key it reads).
struct TextKey(bool);

pub(crate) fn is_text_key(key: &str) -> bool {
    matches!(
        key,
        "content"
            | "text"
            | "input"
            | "arguments"
            | "output"
            | "delta"
            | "refusal"
            | "reasoning_content"
            | "thinking"
            | "partial_json"
            | "choices"
            | "message"
            | "tool_calls"
            | "function"
    )
}

impl<'de> Deserialize<'de> for TextKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(TextKeyVisitor)
    }
}

struct TextKeyVisitor;

impl Visitor<'_> for TextKeyVisitor {
    type Value = TextKey;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<TextKey, E> {
        Ok(TextKey(is_text_key(v)))
    }
}

impl<'de> Deserialize<'de> for TextLen {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(TextLenVisitor)
    }
}

struct TextLenVisitor;

impl<'de> Visitor<'de> for TextLenVisitor {
    type Value = TextLen;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<TextLen, E> {
        Ok(TextLen(v.len() as u64))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<TextLen, E> {
        Ok(TextLen(0))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<TextLen, E> {
        Ok(TextLen(0))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<TextLen, E> {
        Ok(TextLen(0))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<TextLen, E> {
        Ok(TextLen(0))
    }
    fn visit_unit<E: de::Error>(self) -> Result<TextLen, E> {
        Ok(TextLen(0))
    }
    fn visit_none<E: de::Error>(self) -> Result<TextLen, E> {
        Ok(TextLen(0))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<TextLen, A::Error> {
        let mut n = 0;
        while let Some(TextLen(k)) = seq.next_element()? {
            n += k;
        }
        Ok(TextLen(n))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TextLen, A::Error> {
        let mut n = 0;
        while let Some(TextKey(text)) = map.next_key()? {
            if text {
                n += map.next_value::<TextLen>()?.0;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(TextLen(n))
    }
}

#[cfg(test)]
#[allow(clippy::type_complexity)] // tables of cases read best inline
mod tests {
    use super::*;

    #[test]
    fn reads_the_facts_of_each_api() {
        let cases: &[(&str, Option<&str>, bool, bool, bool, u64)] = &[
            (
                r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hello"}]}"#,
                Some("gpt-4o"),
                false,
                false,
                false,
                5,
            ),
            (
                r#"{"model":"m","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"system","content":"ab"},{"role":"user","content":[{"type":"text","text":"cde"},{"type":"image_url","image_url":{"url":"data:xxxxxxxx"}}]}]}"#,
                Some("m"),
                true,
                true,
                true,
                5,
            ),
            (
                r#"{"model":"m","stream":true,"stream_options":{"continuous_usage_stats":true},"prompt":["ab","c"]}"#,
                Some("m"),
                true,
                false,
                true,
                3,
            ),
            (
                r#"{"model":"m","input":"abcd","instructions":"xy"}"#,
                Some("m"),
                false,
                false,
                false,
                6,
            ),
            (
                r#"{"model":"claude","system":[{"type":"text","text":"abc"}],"messages":[{"role":"user","content":"de"}],"max_tokens":5}"#,
                Some("claude"),
                false,
                false,
                false,
                5,
            ),
            (
                r#"{"messages":[],"stream":null,"stream_options":null}"#,
                None,
                false,
                false,
                true,
                0,
            ),
            (
                r#"{"model":"caf\u00e9","input":["é"]}"#,
                Some("café"),
                false,
                false,
                false,
                2,
            ),
        ];
        for (body, model, stream, include, has_options, text) in cases {
            let f = parse(body.as_bytes()).unwrap();
            assert_eq!(f.model.as_deref(), *model, "{body}");
            assert_eq!(f.stream, *stream, "{body}");
            assert_eq!(f.include_usage, *include, "{body}");
            assert_eq!(f.has_stream_options, *has_options, "{body}");
            assert_eq!(f.text_bytes, *text, "{body}");
        }
    }

    #[test]
    fn rejects_what_is_not_an_object() {
        for body in ["", "[1]", "{\"model\":", "null", "{\"stream\":\"yes\"}"] {
            assert!(parse(body.as_bytes()).is_err(), "{body}");
        }
    }

    #[test]
    fn injects_include_usage() {
        let cases: &[(&str, Option<&str>)] = &[
            (
                r#"{"model":"m","stream":true}"#,
                Some(r#"{"stream_options":{"include_usage":true},"model":"m","stream":true}"#),
            ),
            (
                " {\n\"stream\":true}",
                Some(" {\"stream_options\":{\"include_usage\":true},\n\"stream\":true}"),
            ),
            (
                r#"{"stream":true,"stream_options":{"include_usage":true}}"#,
                None,
            ),
            (
                r#"{"stream":true,"stream_options":{"include_usage":false}}"#,
                Some(r#"{"stream":true,"stream_options":{"include_usage":true}}"#),
            ),
            (
                r#"{"stream":true,"stream_options":null}"#,
                Some(r#"{"stream":true,"stream_options":{"include_usage":true}}"#),
            ),
        ];
        for (body, want) in cases {
            let facts = parse(body.as_bytes()).unwrap();
            let got = with_include_usage(body.as_bytes(), &facts);
            let got = got.map(|b| String::from_utf8(b).unwrap());
            assert_eq!(got.as_deref(), *want, "{body}");
            if let Some(out) = got {
                let f = parse(out.as_bytes()).unwrap();
                assert!(f.include_usage && f.stream, "{out}");
            }
        }
    }
}
