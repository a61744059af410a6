//! What the request body says, read once.
//!
//! Every filter wants a few facts from the request body: the model, whether a
//! stream is asked for, whether OpenAI's `stream_options.include_usage` is on,
//! how much prompt text there is (for a token estimate when the provider
//! reports none) and the cap it puts on the answer's tokens (what the rate
//! limiter reserves). They are read in one pass, in place, by the walker
//! ([`super::walk`]); everything else in the body (images, tool schemas,
//! long histories) is skipped without being allocated. The result is small
//! and is what the filters share instead of parsing the body again.
//!
//! serde's reading (into borrowed fields) is the definition: the walker
//! answers only where it is sure serde reads the same facts (a UTF-8 body,
//! an object, the wanted members of the types serde takes, none twice), and
//! any other body is read by serde, which also names what is wrong with it.
//! A test holds the two equal over generated bodies.

use super::walk::{uint, Bad, Once, Walker};
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
    /// The first of `max_completion_tokens`, `max_tokens`,
    /// `max_output_tokens` that is a positive integer (what `u64` holds).
    /// Negative, fractional or absent values give none.
    #[serde(default)]
    pub output_cap: Option<u64>,
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
    match walked(body) {
        Some(facts) => Ok(facts),
        None => parse_serde(body),
    }
}

/// The top-level members whose value is prompt text (what the facts count,
/// and where the cache key folds whitespace).
pub(crate) const TEXT_MEMBERS: [&str; 5] =
    ["messages", "prompt", "input", "system", "instructions"];

/// The members that cap the answer's tokens, the first usable one winning.
const CAP_MEMBERS: [&str; 3] = ["max_completion_tokens", "max_tokens", "max_output_tokens"];

/// The facts read in place, or `None` where the walker cannot vouch that
/// serde reads the same (serde then reads the body, and refuses it or not).
fn walked(body: &[u8]) -> Option<RequestFacts> {
    // serde checks the UTF-8 of every key and of the strings it reads; the
    // walker checks only the strings it reads. One check of the whole body
    // (an ASCII run goes by a word at a time) leaves no difference.
    std::str::from_utf8(body).ok()?;
    let mut facts = RequestFacts::default();
    let mut caps = [None; 3];
    let mut seen = Once::default();
    Walker::document(body, |w| {
        w.object(|w, key| match &*key.name()? {
            b"model" => {
                seen.first(0)?;
                facts.model = w.opt_str()?.map(Cow::into_owned);
                Ok(())
            }
            b"stream" => {
                seen.first(1)?;
                facts.stream = w.opt_bool()?.unwrap_or(false);
                Ok(())
            }
            b"stream_options" => {
                seen.first(2)?;
                facts.has_stream_options = true;
                if w.null()? {
                    return Ok(());
                }
                let mut inner = Once::default();
                w.object(|w, key| {
                    if *key.name()? == *b"include_usage" {
                        inner.first(0)?;
                        facts.include_usage = w.opt_bool()?.unwrap_or(false);
                        Ok(())
                    } else {
                        w.skip().map(drop)
                    }
                })
            }
            name => {
                if let Some(i) = TEXT_MEMBERS.iter().position(|t| t.as_bytes() == name) {
                    seen.first(3 + i as u8)?;
                    facts.text_bytes += w.text_len_without_numbers()?;
                } else if let Some(i) = CAP_MEMBERS.iter().position(|t| t.as_bytes() == name) {
                    seen.first(8 + i as u8)?;
                    // serde reads a cap as a value: `null` or an integer
                    // that fits is what the walker answers for; any other
                    // value (a fraction, a string, a number out of range,
                    // which serde refuses) is left to serde.
                    if !w.null()? {
                        caps[i] = Some(uint(w.skip()?).ok_or(Bad)?);
                    }
                } else {
                    w.skip()?;
                }
                Ok(())
            }
        })
    })
    .ok()?;
    facts.output_cap = first_cap(caps);
    Some(facts)
}

/// The first cap that is positive.
fn first_cap(caps: [Option<u64>; 3]) -> Option<u64> {
    caps.into_iter().flatten().find(|n| *n > 0)
}

/// The facts as serde reads them: the definition [`walked`] is held to.
/// The cap is read as a document of its own, so that a cap serde cannot
/// read (`1e400`) loses only the cap, not the facts.
fn parse_serde(body: &[u8]) -> Result<RequestFacts, serde_json::Error> {
    let mut facts = parse_wire(body)?;
    facts.output_cap = serde_json::from_slice::<Caps>(body).ok().and_then(|c| {
        first_cap([c.max_completion_tokens, c.max_tokens, c.max_output_tokens].map(|v| v?.as_u64()))
    });
    Ok(facts)
}

/// The members that cap the answer, as values (read as `Value::as_u64` reads them).
#[derive(Deserialize)]
struct Caps {
    #[serde(default)]
    max_completion_tokens: Option<serde_json::Value>,
    #[serde(default)]
    max_tokens: Option<serde_json::Value>,
    #[serde(default)]
    max_output_tokens: Option<serde_json::Value>,
}

fn parse_wire(body: &[u8]) -> Result<RequestFacts, serde_json::Error> {
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
        output_cap: None,
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
    fn the_walker_reads_the_bodies_clients_send() {
        // Bodies like `reads_the_facts_of_each_api`'s and the bench's are
        // read in place; serde is only the way out for what is odd.
        for body in [
            r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hello"}]}"#,
            r#"{"model":"m","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":[{"type":"text","text":"cde"},{"type":"image_url","image_url":{"url":"data:xx"}}]}],"temperature":0.2,"max_tokens":5}"#,
            r#"{"model":"caf\u00e9","input":["é"],"stream":null,"stream_options":null}"#,
            r#" {"system":[{"type":"text","text":"abc"}],"messages":[]} "#,
            r#"{"max_tokens":0,"max_output_tokens":null,"max_completion_tokens":64}"#,
        ] {
            let walked = walked(body.as_bytes());
            assert!(walked.is_some(), "{body}");
            assert_eq!(walked, parse_serde(body.as_bytes()).ok(), "{body}");
        }
    }

    #[test]
    fn what_the_walker_leaves_serde_reads() {
        // Each is a body serde refuses, or reads otherwise than as an
        // object's members: the walker must answer for none.
        let left: [&[u8]; 14] = [
            b"[]",
            br#"["m",true]"#,
            br#"{"model":"a","model":"b"}"#,
            br#"{"stream_options":{"include_usage":true,"include_usage":false}}"#,
            br#"{"stream_options":[true]}"#,
            br#"{"messages":[{"content":1e400}]}"#,
            br#"{"messages":[{"content":5}]}"#,
            b"{\"x\xff\":1}",
            br#"{"mod\u0065l":"m","model":"n"}"#,
            br#"{"model":"\ud800"}"#,
            br#"{"stream":1}"#,
            br#"{"max_tokens":16,"max_tokens":32}"#,
            br#"{"max_tokens":2.0}"#,
            br#"{"max_tokens":1e400,"model":"m"}"#,
        ];
        for body in left {
            assert_eq!(walked(body), None, "{}", String::from_utf8_lossy(body));
        }
        // What it leaves, serde reads as before.
        assert_eq!(parse(b"[]").unwrap(), RequestFacts::default());
        let f = parse(br#"{"stream_options":[true]}"#).unwrap();
        assert!(f.include_usage && f.has_stream_options);
        assert_eq!(
            parse(br#"{"messages":[{"content":5}]}"#)
                .unwrap()
                .text_bytes,
            0
        );
        assert!(parse(br#"{"messages":[{"content":1e400}]}"#).is_err());
        assert!(parse(br#"{"model":"a","model":"b"}"#).is_err());
        // A cap serde cannot read costs the cap, not the facts.
        let f = parse(br#"{"max_tokens":1e400,"model":"m"}"#).unwrap();
        assert_eq!((f.model.as_deref(), f.output_cap), (Some("m"), None));
        assert_eq!(
            parse(br#"{"max_tokens":16,"max_tokens":32}"#)
                .unwrap()
                .output_cap,
            None
        );
    }

    #[test]
    fn reads_the_output_cap() {
        let cases: &[(&str, Option<u64>)] = &[
            (r#"{"max_tokens":16}"#, Some(16)),
            (r#"{"max_completion_tokens":7,"max_tokens":9}"#, Some(7)),
            (r#"{"max_tokens":9,"max_completion_tokens":7}"#, Some(7)),
            (r#"{"max_completion_tokens":0,"max_tokens":9}"#, Some(9)),
            (
                r#"{"max_completion_tokens":null,"max_output_tokens":5}"#,
                Some(5),
            ),
            (
                r#"{"max_output_tokens":18446744073709551615}"#,
                Some(u64::MAX),
            ),
            (r#"{"max_tokens":18446744073709551616}"#, None),
            (r#"{"max_tokens":-5}"#, None),
            (r#"{"max_tokens":5.0}"#, None),
            (r#"{"max_tokens":"12"}"#, None),
            (r#"{"max_tokens":[12]}"#, None),
            (r#"{"messages":[]}"#, None),
        ];
        for (body, want) in cases {
            assert_eq!(parse(body.as_bytes()).unwrap().output_cap, *want, "{body}");
        }
    }

    /// Request bodies of the members [`parse`] reads, of every type, now
    /// and then twice, spelt with escapes, broken or cut short.
    fn bodies() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        let atom = prop_oneof![
            // Mostly what serde reads; now and then what it refuses.
            3 => Just(&b"null"[..]),
            3 => Just(&b"true"[..]),
            3 => Just(&b"false"[..]),
            1 => Just(&b"0"[..]),
            1 => Just(&b"-1.5e3"[..]),
            1 => Just(&b"1e400"[..]),
            6 => Just(&br#""gpt-4o""#[..]),
            3 => Just(&br#""caf\u00e9 \n""#[..]),
            1 => Just(&br#""\ud800""#[..]),
            1 => Just(&b"\"\xff\""[..]),
            3 => Just(&br#"{"include_usage":true}"#[..]),
            2 => Just(&br#"{"include_usage":null,"x":[1]}"#[..]),
            1 => Just(&br#"{"include_usage":1}"#[..]),
            1 => Just(&br#"{"include_usage":true,"include_usage":true}"#[..]),
        ]
        .prop_map(<[u8]>::to_vec);
        let value = atom.prop_recursive(3, 24, 4, |inner| {
            let key = prop_oneof![
                3 => Just(&b"\"content\""[..]),
                3 => Just(&b"\"text\""[..]),
                3 => Just(&b"\"role\""[..]),
                1 => Just(&br#""t\u0065xt""#[..]),
                1 => Just(&b"\"\xfe\""[..]),
                1 => Just(&b"\"include_usage\""[..]),
            ];
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4)
                    .prop_map(|v| { [&b"["[..], &v.join(&b","[..]), b"]"].concat() }),
                prop::collection::vec((key, inner), 0..4).prop_map(|v| {
                    let members: Vec<Vec<u8>> =
                        v.into_iter().map(|(k, x)| [k, b":", &x].concat()).collect();
                    [&b"{"[..], &members.join(&b","[..]), b"}"].concat()
                }),
            ]
        });
        let name = prop_oneof![
            Just(&b"\"model\""[..]),
            Just(&b"\"stream\""[..]),
            Just(&b"\"stream_options\""[..]),
            Just(&b"\"messages\""[..]),
            Just(&b"\"prompt\""[..]),
            Just(&b"\"input\""[..]),
            Just(&b"\"system\""[..]),
            Just(&b"\"instructions\""[..]),
            Just(&br#""str\u0065am""#[..]),
            Just(&b"\"temperature\""[..]),
            Just(&b"\"max_tokens\""[..]),
            Just(&b"\"max_completion_tokens\""[..]),
            Just(&b"\"max_output_tokens\""[..]),
            Just(&b"\"\xff\""[..]),
        ];
        // Mostly a member of the type serde takes for its name (so that
        // bodies the walker answers for are common, twice-written members
        // among them); now and then any name with any value.
        let typed = |name: &'static [u8], values: &[&'static [u8]]| {
            let values: Vec<_> = values.iter().map(|v| Just(v.to_vec())).collect();
            (Just(name), proptest::strategy::Union::new(values))
        };
        let member = prop_oneof![
            3 => typed(b"\"model\"", &[br#""gpt-4o""#, b"null", br#""caf\u00e9""#]),
            3 => typed(b"\"stream\"", &[b"true", b"false", b"null"]),
            3 => typed(
                b"\"stream_options\"",
                &[
                    b"null",
                    br#"{"include_usage":true}"#,
                    br#"{"include_usage":false,"x":1}"#,
                    br#"{"include_usage":true,"include_usage":false}"#,
                ],
            ),
            3 => (
                prop_oneof![
                    Just(&b"\"messages\""[..]),
                    Just(&b"\"input\""[..]),
                    Just(&b"\"system\""[..]),
                ],
                value.clone(),
            ),
            2 => typed(b"\"max_tokens\"", &[b"0", b"16", b"null", b"-2", b"2.0", b"1e400", br#""9""#]),
            1 => typed(b"\"max_completion_tokens\"", &[b"7", b"0", b"18446744073709551616"]),
            1 => typed(b"\"max_output_tokens\"", &[b"18446744073709551615", b"null"]),
            2 => (name, value),
        ];
        let members = prop::collection::vec(member, 0..6);
        let shape = (any::<u8>(), any::<u8>(), any::<usize>());
        (members, shape).prop_map(|(members, (odd, b, at))| {
            // One body in eight is an array; one in four is broken.
            let (array, cut) = (odd % 8 == 0, odd % 4 == 1);
            let members: Vec<Vec<u8>> = members
                .into_iter()
                .map(|(k, x)| if array { x } else { [k, b" : ", &x].concat() })
                .collect();
            let (open, close) = if array { (b"[", b"]") } else { (b"{", b"}") };
            let mut t = [&open[..], &members.join(&b","[..]), &close[..]].concat();
            // Now and then one byte changes or the body stops short.
            if cut {
                let at = at % t.len();
                if b % 2 == 0 {
                    t.truncate(at);
                } else {
                    t[at] = b"{}[],:\" x1"[usize::from(b) % 10];
                }
            }
            t
        })
    }

    proptest::proptest! {
        #[test]
        fn the_walker_reads_as_serde_reads(body in bodies()) {
            let serde = parse_serde(&body).ok();
            if let Some(facts) = walked(&body) {
                proptest::prop_assert_eq!(Some(facts), serde.clone());
            }
            proptest::prop_assert_eq!(parse(&body).ok(), serde);
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
