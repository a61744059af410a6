//! What the assembler reads of an OpenAI chat or completions chunk, walked
//! in place (every event of every streamed answer the cache may store passes
//! here).
//!
//! Texts are borrowed. The members whose type varies between providers
//! (`id`, `created`, `model`, `system_fingerprint`, `usage`, a choice's
//! `index` and `finish_reason`, a delta's `tool_calls`) are kept as their JSON bytes and
//! read into values only where the assembler keeps them: the head is the
//! first chunk's, so later chunks' ids and models are never built.
//!
//! A chunk is read as serde read it into the assembler's typed members
//! before (the oracle in the tests): the texts and `type` any value, a string
//! read as text and anything else as none; `delta` an object or null;
//! `choices` an array of objects or null; no member twice; broken JSON no
//! chunk. One difference is left on purpose: a member kept as bytes is
//! checked by the walker's grammar, and only turned into a value (which also
//! refuses numbers out of range and strings that are not text) where it is
//! kept; serde refused the whole chunk for such a member even where it was
//! then dropped. A choice's `index` is only read as a number (an integer
//! that fits, as `Value::as_u64` has it, else 0), never made a value.

use crate::wire::walk::{Once, Walked, Walker};
use std::borrow::Cow;

/// An OpenAI chunk's members the assembler reads.
#[derive(Debug, Default, PartialEq)]
pub(super) struct ChunkView<'a> {
    /// `type`, when it is text.
    pub(super) kind: Option<Cow<'a, str>>,
    /// An `error` member is there, whatever its value (`null` included).
    pub(super) error: bool,
    /// `usage`, unless absent or null.
    pub(super) usage: Option<&'a [u8]>,
    /// `id`, `created`, `model`, `system_fingerprint` (as [`HEAD`] names
    /// them), each unless absent or null.
    pub(super) head: [Option<&'a [u8]>; 4],
    /// `choices`, unless absent or null.
    pub(super) choices: Option<Vec<ChoiceView<'a>>>,
}

/// The head members of a chunk, in the order [`ChunkView::head`] holds them.
pub(super) const HEAD: [&str; 4] = ["id", "created", "model", "system_fingerprint"];

#[derive(Debug, Default, PartialEq)]
pub(super) struct ChoiceView<'a> {
    /// `index`, unless absent or null (read with [`crate::wire::walk::uint`]).
    pub(super) index: Option<&'a [u8]>,
    /// `finish_reason`, unless absent or null.
    pub(super) finish_reason: Option<&'a [u8]>,
    /// `text` (completions), when it is text.
    pub(super) text: Option<Cow<'a, str>>,
    /// `delta` (chat), unless absent or null.
    pub(super) delta: Option<DeltaView<'a>>,
}

#[derive(Debug, Default, PartialEq)]
pub(super) struct DeltaView<'a> {
    pub(super) role: Option<Cow<'a, str>>,
    pub(super) content: Option<Cow<'a, str>>,
    pub(super) refusal: Option<Cow<'a, str>>,
    /// `tool_calls`, unless absent or null.
    pub(super) tool_calls: Option<&'a [u8]>,
}

/// Reads one chunk; `None` when it is not JSON or not of the chunk's shape.
/// A chunk, a choice and a delta must be objects: serde's derive also took
/// an array as a struct's members in order, which no provider sends, and
/// a stream the cache cannot read is only not stored.
pub(super) fn read(data: &[u8]) -> Option<ChunkView<'_>> {
    Walker::document(data, |w| {
        let mut c = ChunkView::default();
        let mut seen = Once::default();
        w.object(|w, key| {
            let name = key.name()?;
            let slot = match &*name {
                b"type" => return seen.first(0).and(loose_str(w)).map(|s| c.kind = s),
                b"error" => return seen.first(1).and(w.skip()).map(|_| c.error = true),
                b"usage" => return seen.first(2).and(bytes(w)).map(|u| c.usage = u),
                b"choices" => {
                    seen.first(3)?;
                    if w.null()? {
                        return Ok(());
                    }
                    let mut choices = Vec::new();
                    w.array(|w| {
                        choices.push(choice(w)?);
                        Ok(())
                    })?;
                    c.choices = Some(choices);
                    return Ok(());
                }
                _ => HEAD.iter().position(|k| k.as_bytes() == &*name),
            };
            match slot {
                Some(i) => {
                    seen.first(4 + i as u8)?;
                    c.head[i] = bytes(w)?;
                    Ok(())
                }
                None => w.skip().map(drop),
            }
        })?;
        Ok(c)
    })
    .ok()
}

fn choice<'a>(w: &mut Walker<'a>) -> Walked<ChoiceView<'a>> {
    let mut c = ChoiceView::default();
    let mut seen = Once::default();
    w.object(|w, key| match &*key.name()? {
        b"index" => seen.first(0).and(bytes(w)).map(|i| c.index = i),
        b"finish_reason" => seen.first(1).and(bytes(w)).map(|f| c.finish_reason = f),
        b"text" => seen.first(2).and(loose_str(w)).map(|t| c.text = t),
        b"delta" => {
            seen.first(3)?;
            if !w.null()? {
                c.delta = Some(delta(w)?);
            }
            Ok(())
        }
        _ => w.skip().map(drop),
    })?;
    Ok(c)
}

fn delta<'a>(w: &mut Walker<'a>) -> Walked<DeltaView<'a>> {
    let mut d = DeltaView::default();
    let mut seen = Once::default();
    w.object(|w, key| match &*key.name()? {
        b"role" => seen.first(0).and(loose_str(w)).map(|s| d.role = s),
        b"content" => seen.first(1).and(loose_str(w)).map(|s| d.content = s),
        b"refusal" => seen.first(2).and(loose_str(w)).map(|s| d.refusal = s),
        b"tool_calls" => seen.first(3).and(bytes(w)).map(|t| d.tool_calls = t),
        _ => w.skip().map(drop),
    })?;
    Ok(d)
}

/// A value read as `Value::as_str` reads it: text, or none for any other value.
fn loose_str<'a>(w: &mut Walker<'a>) -> Walked<Option<Cow<'a, str>>> {
    if w.is_str() {
        w.str().map(Some)
    } else {
        w.skip().map(|_| None)
    }
}

/// A value's JSON bytes, none for `null`.
fn bytes<'a>(w: &mut Walker<'a>) -> Walked<Option<&'a [u8]>> {
    if w.null()? {
        Ok(None)
    } else {
        w.skip().map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
    use serde::Deserialize;
    use serde_json::{json, Value};
    use std::fmt;

    /// The serde reading [`read`] replaced: the oracle it must agree with.
    #[derive(Deserialize)]
    struct ChunkWire<'a> {
        #[serde(rename = "type", borrow, default)]
        kind: LooseStr<'a>,
        #[serde(default, deserialize_with = "present")]
        error: bool,
        #[serde(default)]
        usage: Option<Value>,
        #[serde(default)]
        id: Option<Value>,
        #[serde(default)]
        created: Option<Value>,
        #[serde(default)]
        model: Option<Value>,
        #[serde(default)]
        system_fingerprint: Option<Value>,
        #[serde(borrow, default)]
        choices: Option<Vec<ChoiceWire<'a>>>,
    }

    #[derive(Deserialize)]
    struct ChoiceWire<'a> {
        #[serde(default)]
        index: Option<Value>,
        #[serde(default)]
        finish_reason: Option<Value>,
        #[serde(borrow, default)]
        text: LooseStr<'a>,
        #[serde(borrow, default)]
        delta: Option<DeltaWire<'a>>,
    }

    #[derive(Deserialize)]
    struct DeltaWire<'a> {
        #[serde(borrow, default)]
        role: LooseStr<'a>,
        #[serde(borrow, default)]
        content: LooseStr<'a>,
        #[serde(borrow, default)]
        refusal: LooseStr<'a>,
        #[serde(default)]
        tool_calls: Option<Value>,
    }

    fn present<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
        IgnoredAny::deserialize(d).map(|_| true)
    }

    /// A string, or none for any other value.
    #[derive(Default)]
    struct LooseStr<'a>(Option<Cow<'a, str>>);

    impl<'de: 'a, 'a> Deserialize<'de> for LooseStr<'a> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_any(LooseStrVisitor(std::marker::PhantomData))
        }
    }

    struct LooseStrVisitor<'a>(std::marker::PhantomData<&'a ()>);

    impl<'de: 'a, 'a> Visitor<'de> for LooseStrVisitor<'a> {
        type Value = LooseStr<'a>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
            Ok(LooseStr(Some(Cow::Borrowed(v))))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(LooseStr(Some(Cow::Owned(v.to_string()))))
        }
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok(LooseStr(None))
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok(LooseStr(None))
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok(LooseStr(None))
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok(LooseStr(None))
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(LooseStr(None))
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok(LooseStr(None))
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            Ok(LooseStr(None))
        }
    }

    /// What serde read of a chunk, as one value to compare.
    fn by_serde(data: &[u8]) -> Option<Value> {
        let c = serde_json::from_slice::<ChunkWire<'_>>(data).ok()?;
        let text = |s: LooseStr<'_>| s.0.map(Cow::into_owned);
        let choices = c.choices.map(|cs| {
            cs.into_iter()
                .map(|c| {
                    json!({
                        "index": c.index.as_ref().and_then(Value::as_u64),
                        "finish_reason": c.finish_reason,
                        "text": text(c.text),
                        "delta": c.delta.map(|d| json!({
                            "role": text(d.role),
                            "content": text(d.content),
                            "refusal": text(d.refusal),
                            "tool_calls": d.tool_calls,
                        })),
                    })
                })
                .collect::<Vec<_>>()
        });
        Some(json!({
            "kind": text(c.kind),
            "error": c.error,
            "usage": c.usage,
            "head": [c.id, c.created, c.model, c.system_fingerprint],
            "choices": choices,
        }))
    }

    /// What the walker read, every member kept as bytes turned into a value
    /// (as serde turned them all): `None` if one is not a value.
    fn by_walker(data: &[u8]) -> Option<Value> {
        let c = read(data)?;
        let value = |b: Option<&[u8]>| -> Option<Option<Value>> {
            b.map(serde_json::from_slice::<Value>).transpose().ok()
        };
        let mut choices = None;
        if let Some(cs) = c.choices {
            let mut out = Vec::new();
            for c in cs {
                let delta = match c.delta {
                    Some(d) => Some(json!({
                        "role": d.role,
                        "content": d.content,
                        "refusal": d.refusal,
                        "tool_calls": value(d.tool_calls)?,
                    })),
                    None => None,
                };
                // The assembler reads the index from its bytes, as the
                // value would have it.
                let index = value(c.index)?;
                assert_eq!(
                    c.index.and_then(crate::wire::walk::uint),
                    index.as_ref().and_then(Value::as_u64)
                );
                out.push(json!({
                    "index": index.as_ref().and_then(Value::as_u64),
                    "finish_reason": value(c.finish_reason)?,
                    "text": c.text,
                    "delta": delta,
                }));
            }
            choices = Some(out);
        }
        let mut head = Vec::new();
        for h in c.head {
            head.push(value(h)?);
        }
        Some(json!({
            "kind": c.kind,
            "error": c.error,
            "usage": value(c.usage)?,
            "head": head,
            "choices": choices,
        }))
    }

    #[test]
    fn chunks_are_read_as_serde_read_them() {
        for data in [
            r#"{"id":"c","object":"chat.completion.chunk","created":1,"model":"gpt-4o","system_fingerprint":null,"choices":[{"index":0,"delta":{"role":"assistant","content":"w0 "},"finish_reason":null}],"usage":null}"#,
            r#"{"choices":[{"index":1,"text":"a\nb\u00e9","finish_reason":"stop"}]}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"a\""}}]}}]}"#,
            r#"{"choices":[{"index":"0","delta":{"content":[1,{"x":2}],"refusal":5},"text":{}}]}"#,
            r#"{"choices":[{"index":"\ud800"}]}"#,
            r#"{"choices":[{"index":1.5},{"index":-1},{"index":18446744073709551616}]}"#,
            r#"{"error":null,"choices":[]}"#,
            r#"{"type":"error"}"#,
            r#"{"type":7,"id":7,"model":[]}"#,
            r#"{"choices":[{"delta":{"content":"a","content":"b"}}]}"#,
            r#"{"id":"a","\u0069d":"b"}"#,
            r#"{"choices":[{"delta":"x"}]}"#,
            r#"{"choices":[5]}"#,
            r#"{"choices":{}}"#,
            r#"{"choices":null}"#,
            r#"{"\ud800":1}"#,
            r#"{"type":"\ud800"}"#,
            r#"{"choices":[]} x"#,
            "{}",
        ] {
            assert_eq!(
                by_walker(data.as_bytes()),
                by_serde(data.as_bytes()),
                "{data}"
            );
        }
        // The difference left on purpose: a number out of range in a member
        // kept as bytes is refused only where it is made a value.
        let far = br#"{"id":"a","created":1e400}"#;
        assert!(by_serde(far).is_none());
        assert_eq!(read(far).unwrap().head[1], Some(&b"1e400"[..]));
        assert!(by_walker(far).is_none());
    }

    /// Chunks built from the members the assembler reads and some it does
    /// not, each value of the right type, of a wrong one or broken.
    fn chunk() -> impl Strategy<Value = Vec<u8>> {
        let value = prop_oneof![
            Just("null"),
            Just("0"),
            Just("-1"),
            Just("1.5"),
            Just("18446744073709551616"),
            Just(r#""stop""#),
            Just(r#""a\n\u00e9\ud83d\ude00""#),
            Just(r#""\ud800""#),
            Just("true"),
            Just("[]"),
            Just(r#"{"a":[1,{"b":null}]}"#),
        ];
        let tool_calls = prop_oneof![
            Just(r#"[{"index":0,"id":"t","function":{"name":"f","arguments":"{\""}}]"#),
            Just("null"),
            Just("{}"),
        ];
        let delta_member = prop_oneof![
            value.clone().prop_map(|v| format!(r#""role":{v}"#)),
            value.clone().prop_map(|v| format!(r#""content":{v}"#)),
            value.clone().prop_map(|v| format!(r#""refusal":{v}"#)),
            tool_calls.prop_map(|v| format!(r#""tool_calls":{v}"#)),
            Just(r#""x":1"#.to_string()),
        ];
        // Never an array: serde's derive reads an array as a struct's
        // members in order, which the walker refuses (see `read`).
        let delta = prop_oneof![
            3 => prop::collection::vec(delta_member, 0..4)
                .prop_map(|m| format!("{{{}}}", m.join(","))),
            1 => prop_oneof![Just("null"), Just("3"), Just(r#""d""#)].prop_map(str::to_string),
        ];
        let member = prop_oneof![
            value.clone().prop_map(|v| format!(r#""index":{v}"#)),
            value
                .clone()
                .prop_map(|v| format!(r#""finish_reason":{v}"#)),
            value.clone().prop_map(|v| format!(r#""text":{v}"#)),
            delta.prop_map(|d| format!(r#""delta":{d}"#)),
            Just(r#""logprobs":null"#.to_string()),
        ];
        let choice =
            prop::collection::vec(member, 0..5).prop_map(|m| format!("{{{}}}", m.join(",")));
        let head = prop_oneof![
            Just("id"),
            Just("created"),
            Just("model"),
            Just("system_fingerprint"),
            Just("usage"),
            Just("type"),
            Just("error"),
            Just("object"),
        ];
        let top = prop_oneof![
            (head, value).prop_map(|(k, v)| format!(r#""{k}":{v}"#)),
            Just(r#""usage":{"prompt_tokens":1}"#.to_string()),
            Just(r#""choices":null"#.to_string()),
            Just(r#""choices":{}"#.to_string()),
            prop::collection::vec(choice, 0..3)
                .prop_map(|c| format!(r#""choices":[{}]"#, c.join(","))),
        ];
        crate::wire::walk::objects_sometimes_broken(top, 5)
    }

    proptest! {
        #[test]
        fn any_chunk_is_read_as_serde_reads_it(data in chunk()) {
            prop_assert_eq!(
                by_walker(&data),
                by_serde(&data),
                "{}", String::from_utf8_lossy(&data)
            );
        }
    }
}
