//! The cache key: BLAKE3 over a canonical form of everything that changes
//! the answer. The key is the tenant boundary, so it is a cryptographic
//! hash. BLAKE3 (portable, as it runs in wasm) in place of SHA-256 took the
//! prompt-cache filter from 301k to 270k of Envoy's instructions per 1 KiB
//! request (`./scripts/bench.sh --instructions 100 --rows prompt-cache`).
//!
//! The form is written here, not by serde: object keys are sorted by their
//! bytes at every depth (serde_json's map order depends on a feature some
//! other crate may turn on), numbers keep serde_json's shortest form, strings
//! are JSON-escaped the one way serde_json escapes them. Every top-level
//! member of the body is part of the key except the ones in [`EXCLUDED`],
//! which change how the answer is delivered or billed but not what it says,
//! so an unknown new parameter can only split entries, never merge two
//! different questions. The scope, the API and the routed model come first,
//! each on its own line, so no body can collide with another scope's.

use crate::wire::decimal;
use crate::wire::json_out::push_string;
use crate::wire::request::TEXT_MEMBERS;
use crate::wire::walk::{uint, Bad, Walked, Walker};
use serde_json::Value;
use std::borrow::Cow;
use std::ops::Range;

/// Top-level request members that do not change the answer: the same
/// question asked streaming and not streaming, or by another end user of the
/// same consumer, shares an entry.
pub const EXCLUDED: &[&str] = &[
    "user",
    "stream",
    "stream_options",
    "metadata",
    "store",
    "service_tier",
    "safety_identifier",
    "prompt_cache_key",
];

/// A cache key: the BLAKE3 digest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Key(pub [u8; 32]);

impl Key {
    pub fn hex(&self) -> String {
        hex(&self.0)
    }
}

pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// What goes into a key besides the body.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Context<'a> {
    /// The cache scope (a consumer, a named group, a header's value, or the shared scope).
    pub scope: &'a str,
    /// The API: operation, family and (Azure) deployment.
    pub api: &'a str,
    /// The model a router chose before this filter, if one ran.
    pub routed_model: Option<&'a str>,
}

/// The key of a parsed request body (the tests' way in).
#[cfg(test)]
fn key(ctx: &Context<'_>, body: &serde_json::Map<String, Value>, fold: bool) -> Key {
    finish(ctx, &Request::of_value(body, fold).form)
}

/// The key of a body's canonical form ([`Request::form`]).
pub fn finish(ctx: &Context<'_>, form: &[u8]) -> Key {
    let mut head = Vec::with_capacity(64);
    head.extend_from_slice(b"aigw-cache/2\n");
    for part in [ctx.scope, ctx.api, ctx.routed_model.unwrap_or("")] {
        // Lengths first: no value can end early and start the next one.
        head.extend_from_slice(decimal(part.len() as u64, &mut [0; 20]));
        head.push(b':');
        head.extend_from_slice(part.as_bytes());
        head.push(b'\n');
    }
    let mut hasher = blake3::Hasher::new();
    hasher.update(&head);
    hasher.update(form);
    Key(*hasher.finalize().as_bytes())
}

/// What the cache reads of a request body: the canonical form its key
/// hashes, and the members that decide whether it is cached at all.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    /// The body's members but the [`EXCLUDED`] ones, keys sorted at every
    /// depth, prompt text folded when asked.
    pub form: Vec<u8>,
    /// `temperature`: 1 when absent or null, `None` when not a number.
    pub temperature: Option<f64>,
    /// Whether it offers tools: `tools` or `functions`, unless an empty list.
    pub tools: bool,
    pub stream: bool,
    /// `stream_options.include_usage`.
    pub include_usage: bool,
    pub model: Option<String>,
}

impl Request {
    /// Read from the parsed document.
    pub fn of_value(doc: &serde_json::Map<String, Value>, fold: bool) -> Request {
        let mut form = Vec::with_capacity(256);
        let members = doc.iter().filter(|(k, _)| !EXCLUDED.contains(&k.as_str()));
        write_object(&mut form, doc, members, &|k| {
            fold && TEXT_MEMBERS.contains(&k)
        });
        let has = |k: &str| {
            doc.get(k)
                .is_some_and(|v| v.as_array().is_none_or(|a| !a.is_empty()))
        };
        Request {
            form,
            temperature: match doc.get("temperature") {
                None | Some(Value::Null) => Some(1.0),
                Some(v) => v.as_f64(),
            },
            tools: has("tools") || has("functions"),
            stream: doc.get("stream").and_then(Value::as_bool).unwrap_or(false),
            include_usage: doc
                .get("stream_options")
                .and_then(|o| o.get("include_usage"))
                .and_then(Value::as_bool)
                .unwrap_or(false),
            model: doc.get("model").and_then(Value::as_str).map(str::to_string),
        }
    }

    /// Read in place, without building the document: the same as
    /// [`Request::of_value`] of what serde parses, or `Err` where the
    /// walker cannot be sure of that (a member written twice, which serde
    /// keeps the last of; anything serde would refuse), and the caller
    /// parses the body. The form is written as the members come and an
    /// object put in key order only when it was not (a chat message's
    /// `role` comes before its `content`).
    pub fn walked(body: &[u8], fold: bool) -> Walked<Request> {
        // Every string and key is read as serde reads it (its UTF-8 and
        // escapes checked), so nothing serde refuses gets through.
        let mut r = Request {
            form: Vec::with_capacity(body.len()),
            temperature: Some(1.0),
            tools: false,
            stream: false,
            include_usage: false,
            model: None,
        };
        let mut scratch = Vec::new();
        Walker::document(body, |w| {
            walk_object(w, &mut r.form, |w, key, out| {
                let name = key.as_ref();
                if EXCLUDED.contains(&name) {
                    // Not in the key, but read as serde reads them.
                    scratch.clear();
                    walk_value(w, &mut scratch, false)?;
                    match name {
                        "stream" => r.stream = scratch == b"true",
                        "stream_options" => r.include_usage = include_usage(&scratch),
                        _ => {}
                    }
                    return Ok(false);
                }
                // Borrowed (as written) or decoded: a clone costs nothing
                // but for a key with escapes.
                push_as_serde(out, key.clone());
                out.push(b':');
                if name == "model" && w.is_str() {
                    let s = w.str()?;
                    r.model = Some(s.to_string());
                    push_as_serde(out, s);
                    return Ok(true);
                }
                let at = out.len();
                walk_value(w, out, fold && TEXT_MEMBERS.contains(&name))?;
                let v = &out[at..];
                match name {
                    "temperature" if v == b"null" => r.temperature = Some(1.0),
                    "temperature" => {
                        r.temperature = serde_json::from_slice::<serde_json::Number>(v)
                            .ok()
                            .and_then(|n| n.as_f64());
                    }
                    "tools" | "functions" => r.tools |= v != b"[]",
                    _ => {}
                }
                Ok(true)
            })
        })?;
        Ok(r)
    }
}

/// Whether `stream_options`, in the form [`walk_value`] wrote (its keys
/// unique), says `"include_usage": true`.
fn include_usage(form: &[u8]) -> bool {
    let read = Walker::document(form, |w| {
        if !w.is_object() {
            return w.skip().map(|_| false);
        }
        let mut on = false;
        w.object(|w, k| {
            let v = w.skip()?;
            if &*k.name()? == b"include_usage" {
                on = v == b"true";
            }
            Ok(())
        })?;
        Ok(on)
    });
    read.unwrap_or(false)
}

/// Writes the object at the walker: `member` writes a member (`"key":value`)
/// and says whether it did. Members are written as they come, then put in
/// key order if they were not; a key written twice is refused.
fn walk_object<'a>(
    w: &mut Walker<'a>,
    out: &mut Vec<u8>,
    mut member: impl FnMut(&mut Walker<'a>, Cow<'_, str>, &mut Vec<u8>) -> Walked<bool>,
) -> Walked<()> {
    let start = out.len();
    out.push(b'{');
    // Each key, and the bytes its member was written to (empty: left out).
    let mut members: Vec<(Cow<'a, [u8]>, Range<usize>)> = Vec::new();
    let mut any = false;
    w.object(|w, k| {
        let name = k.name()?;
        // Borrowed, as the key was written (no escapes), or decoded.
        let text = match &name {
            Cow::Borrowed(b) => Cow::Borrowed(std::str::from_utf8(b).map_err(|_| Bad)?),
            Cow::Owned(b) => Cow::Owned(String::from_utf8(b.clone()).map_err(|_| Bad)?),
        };
        let comma = out.len();
        if any {
            out.push(b',');
        }
        let from = out.len();
        let range = if member(w, text, out)? {
            any = true;
            from..out.len()
        } else {
            out.truncate(comma);
            from..from
        };
        members.push((name, range));
        Ok(())
    })?;
    if !members.windows(2).all(|p| p[0].0 < p[1].0) {
        members.sort_by(|a, b| a.0.cmp(&b.0));
        if members.windows(2).any(|p| p[0].0 == p[1].0) {
            return Err(Bad);
        }
        let as_written = out.split_off(start + 1);
        let mut first = true;
        for (_, r) in members.iter().filter(|(_, r)| !r.is_empty()) {
            if !first {
                out.push(b',');
            }
            first = false;
            let r = r.start - start - 1..r.end - start - 1;
            out.extend_from_slice(&as_written[r]);
        }
    }
    out.push(b'}');
    Ok(())
}

/// Writes a string the walker read as serde writes it. One it lends
/// (`Cow::Borrowed`) is written without an escape, so it holds no byte
/// serde escapes (no quote, backslash or control byte stands bare): its
/// bytes go as they are, quoted. A decoded one is written out again.
fn push_as_serde(out: &mut Vec<u8>, s: Cow<'_, str>) {
    match s {
        Cow::Borrowed(s) => {
            out.push(b'"');
            out.extend_from_slice(s.as_bytes());
            out.push(b'"');
        }
        Cow::Owned(s) => push_string(out, &s),
    }
}

/// Writes the value at the walker in canonical form, as [`write_value`]
/// writes the value serde parses of it.
fn walk_value(w: &mut Walker<'_>, out: &mut Vec<u8>, fold: bool) -> Walked<()> {
    if w.is_object() {
        return walk_object(w, out, |w, name, out| {
            push_as_serde(out, name);
            out.push(b':');
            walk_value(w, out, fold).map(|()| true)
        });
    }
    if w.is_array() {
        out.push(b'[');
        let mut first = true;
        w.array(|w| {
            if !first {
                out.push(b',');
            }
            first = false;
            walk_value(w, out, fold)
        })?;
        out.push(b']');
        return Ok(());
    }
    if w.is_str() {
        let s = w.str()?;
        if fold {
            push_string(out, &fold_ws(&s));
        } else {
            push_as_serde(out, s);
        }
        return Ok(());
    }
    let token = w.skip()?;
    match token {
        b"null" | b"true" | b"false" => out.extend_from_slice(token),
        // An integer that fits a u64 is written as serde writes it: as is.
        _ if uint(token).is_some() => out.extend_from_slice(token),
        _ => {
            let n: serde_json::Number = serde_json::from_slice(token).map_err(|_| Bad)?;
            out.extend_from_slice(n.to_string().as_bytes());
        }
    }
    Ok(())
}

/// Writes `members` (of `o`) sorted by their keys' bytes, each value folded
/// where `fold` says. serde_json's map is a `BTreeMap`, whose order is that
/// already, unless a feature turns it into an `IndexMap`: one look at the
/// keys tells, and only a map out of order is collected and sorted.
fn write_object<'a>(
    out: &mut Vec<u8>,
    o: &'a serde_json::Map<String, Value>,
    members: impl Iterator<Item = (&'a String, &'a Value)>,
    fold: &dyn Fn(&str) -> bool,
) {
    let sorted = o.keys().is_sorted_by(|a, b| a.as_bytes() <= b.as_bytes());
    out.push(b'{');
    let mut write = |i: usize, k: &str, v: &Value| {
        if i > 0 {
            out.push(b',');
        }
        push_string(out, k);
        out.push(b':');
        write_value(out, v, fold(k));
    };
    if sorted {
        for (i, (k, v)) in members.enumerate() {
            write(i, k, v);
        }
    } else {
        let mut members: Vec<_> = members.collect();
        members.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        for (i, (k, v)) in members.into_iter().enumerate() {
            write(i, k, v);
        }
    }
    out.push(b'}');
}

/// Canonical JSON of a value: keys sorted, no whitespace; with `fold`, runs
/// of whitespace in strings become one space and ends are trimmed.
pub fn canonical(v: &Value, fold: bool) -> Vec<u8> {
    let mut out = Vec::new();
    write_value(&mut out, v, fold);
    out
}

fn write_value(out: &mut Vec<u8>, v: &Value, fold: bool) {
    match v {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Value::Number(n) => out.extend_from_slice(n.to_string().as_bytes()),
        Value::String(s) if fold => push_string(out, &fold_ws(s)),
        Value::String(s) => push_string(out, s),
        Value::Array(a) => {
            out.push(b'[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(out, x, fold);
            }
            out.push(b']');
        }
        Value::Object(o) => write_object(out, o, o.iter(), &|_| fold),
    }
}

fn fold_ws(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn k(scope: &str, body: &str, fold: bool) -> Key {
        let v: Value = serde_json::from_str(body).unwrap();
        let ctx = Context {
            scope,
            api: "chat/openai",
            routed_model: None,
        };
        key(&ctx, v.as_object().unwrap(), fold)
    }

    const BASE: &str =
        r#"{"model":"gpt-4o","temperature":0,"messages":[{"role":"user","content":"hi there"}]}"#;

    #[test]
    fn same_question_same_key_whatever_the_order_or_delivery() {
        let same = [
            r#"{"messages":[{"content":"hi there","role":"user"}],"temperature":0,"model":"gpt-4o"}"#,
            r#"{"model":"gpt-4o","temperature":0,"stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hi there"}]}"#,
            r#"{"model":"gpt-4o","user":"u-17","metadata":{"a":"b"},"temperature":0,"messages":[{"role":"user","content":"hi there"}]}"#,
            "{ \"model\" : \"gpt-4o\",\n \"temperature\": 0, \"messages\": [ {\"role\":\"user\", \"content\":\"hi there\"} ] }",
        ];
        for body in same {
            assert_eq!(k("alice", body, false), k("alice", BASE, false), "{body}");
        }
    }

    #[test]
    fn anything_that_changes_the_answer_changes_the_key() {
        let different = [
            r#"{"model":"gpt-4o-mini","temperature":0,"messages":[{"role":"user","content":"hi there"}]}"#,
            r#"{"model":"gpt-4o","temperature":0.5,"messages":[{"role":"user","content":"hi there"}]}"#,
            r#"{"model":"gpt-4o","temperature":0,"messages":[{"role":"user","content":"hi  there"}]}"#,
            r#"{"model":"gpt-4o","temperature":0,"seed":1,"messages":[{"role":"user","content":"hi there"}]}"#,
            r#"{"model":"gpt-4o","temperature":0,"max_tokens":5,"messages":[{"role":"user","content":"hi there"}]}"#,
            r#"{"model":"gpt-4o","temperature":0,"tools":[],"messages":[{"role":"user","content":"hi there"}]}"#,
            r#"{"model":"gpt-4o","temperature":0,"messages":[{"role":"system","content":"hi there"}]}"#,
            r#"{"model":"gpt-4o","temperature":0,"some_new_knob":true,"messages":[{"role":"user","content":"hi there"}]}"#,
        ];
        let base = k("alice", BASE, false);
        for body in different {
            assert_ne!(k("alice", body, false), base, "{body}");
        }
        assert_ne!(k("bob", BASE, false), base);
        let v: Value = serde_json::from_str(BASE).unwrap();
        let routed = Context {
            scope: "alice",
            api: "chat/openai",
            routed_model: Some("gpt-4o-2024-08-06"),
        };
        assert_ne!(key(&routed, v.as_object().unwrap(), false), base);
        let other_api = Context {
            api: "completions/openai",
            routed_model: None,
            ..routed
        };
        assert_ne!(key(&other_api, v.as_object().unwrap(), false), base);
    }

    #[test]
    fn scope_cannot_bleed_into_the_api() {
        let v: Value = serde_json::from_str(BASE).unwrap();
        let a = Context {
            scope: "a\nchat",
            api: "x",
            ..Context::default()
        };
        let b = Context {
            scope: "a",
            api: "chat\nx",
            ..Context::default()
        };
        assert_ne!(
            key(&a, v.as_object().unwrap(), false),
            key(&b, v.as_object().unwrap(), false)
        );
    }

    #[test]
    fn folding_whitespace_is_optional_and_only_in_prompt_text() {
        let spaced = r#"{"model":"gpt-4o","temperature":0,"messages":[{"role":"user","content":"  hi\t there\n"}]}"#;
        assert_ne!(k("a", spaced, false), k("a", BASE, false));
        assert_eq!(k("a", spaced, true), k("a", BASE, true));
        let stop_a = r#"{"stop":["a  b"],"messages":[]}"#;
        let stop_b = r#"{"stop":["a b"],"messages":[]}"#;
        assert_ne!(k("a", stop_a, true), k("a", stop_b, true));
    }

    #[test]
    fn canonical_form_sorts_keys_at_every_depth() {
        let v: Value =
            serde_json::from_str(r#"{"b":{"y":1,"x":[{"d":2,"c":"\u00e9"}]},"a":null}"#).unwrap();
        assert_eq!(
            String::from_utf8(canonical(&v, false)).unwrap(),
            r#"{"a":null,"b":{"x":[{"c":"é","d":2}],"y":1}}"#
        );
        assert_eq!(hex(&[0, 0xab, 0x10]), "00ab10");
    }

    #[test]
    fn the_hashed_bytes_are_the_stored_format() {
        // Entries already stored (shared data, Redis) are found again only
        // while these bytes stay the same.
        let preimage = concat!(
            "aigw-cache/2\n5:alice\n11:chat/openai\n0:\n",
            r#"{"messages":[{"content":"hi there","role":"user"}],"model":"gpt-4o","temperature":0}"#
        );
        let want = Key(*blake3::hash(preimage.as_bytes()).as_bytes());
        assert_eq!(k("alice", BASE, false), want);
        let walked = Request::walked(BASE.as_bytes(), false).unwrap();
        let ctx = Context {
            scope: "alice",
            api: "chat/openai",
            ..Context::default()
        };
        assert_eq!(finish(&ctx, &walked.form), want);
    }

    fn both(body: &[u8], fold: bool) -> (Walked<Request>, Option<Request>) {
        let parsed = match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(doc)) => Some(Request::of_value(&doc, fold)),
            _ => None,
        };
        (Request::walked(body, fold), parsed)
    }

    #[test]
    fn the_walker_reads_the_bodies_clients_send() {
        for body in [
            BASE,
            r#"{"model":"gpt-4o","temperature":0.7,"stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"system","content":"Be  brief."},{"role":"user","content":[{"type":"text","text":"caf\u00e9 \ud83d\ude00\n\"q\""}]}]}"#,
            r#"{"model":"gpt-4o","tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object","properties":{}}}}],"tool_choice":"auto","messages":[]}"#,
            r#"{"model":"m","tools":[],"functions":null,"stream":false,"stream_options":null,"user":"u","metadata":{"a":"b"},"messages":[]}"#,
            r#"{"model":7,"stream":true,"stream_options":{"x":{"include_usage":true},"include_usage":1},"messages":[]}"#,
            r#"{"stream_options":{"include_usage":null},"stream":"yes","messages":[]}"#,
            r#"{"prompt":["a  b","c"],"max_tokens":16,"seed":-3,"n":1,"logit_bias":{"50256":-100},"top_p":1.0,"x":1e5,"y":-0,"z":18446744073709551616,"w":-9223372036854775809,"v":0.1e-2}"#,
            r#"{"model":"claude","system":"  be\tkind ","max_tokens":1024,"temperature":null,"messages":[{"content":"hi","role":"user"}]}"#,
            r#"{"model":"gpt-4.1","instructions":"x","input":[{"role":"user","content":[{"type":"input_text","text":"hi"}]}],"stream":1}"#,
            " {\"model\" : \"gpt-4o\",\n \"temperature\": \"hot\", \"é\": 1, \"\\u00e8\": 2, \"messages\": [ ] } ",
        ] {
            for fold in [false, true] {
                let (walked, parsed) = both(body.as_bytes(), fold);
                assert_eq!(walked.ok(), parsed, "{body} fold {fold}");
            }
        }
    }

    #[test]
    fn a_member_written_twice_is_left_to_serde() {
        for body in [
            r#"{"model":"a","model":"b"}"#,
            r#"{"stream":true,"messages":[],"stream":false}"#,
            r#"{"a":1,"\u0061":2}"#,
            r#"{"messages":[{"role":"user","content":"x","role":"system"}]}"#,
            r#"{"stream_options":{"include_usage":true,"include_usage":false}}"#,
        ] {
            assert_eq!(Request::walked(body.as_bytes(), false), Err(Bad), "{body}");
            assert!(serde_json::from_slice::<Value>(body.as_bytes()).is_ok());
        }
        // What serde refuses, the walker refuses too.
        for body in [
            &br#"{"user":"\ud800"}"#[..],
            br#"{"x":1e400}"#,
            b"{\"x\":\"\xff\"}",
            br#"[{"model":"m"}]"#,
            br#"{"model":"m"} x"#,
        ] {
            assert_eq!(both(body, false), (Err(Bad), None));
        }
    }

    /// Request bodies: members the cache reads or folds, and others, with
    /// values of every kind (nested objects out of order, numbers in every
    /// form, escapes, runs of whitespace), now and then twice, broken or
    /// cut short.
    fn bodies() -> impl Strategy<Value = Vec<u8>> {
        let atom = prop_oneof![
            Just(&b"null"[..]),
            Just(&b"true"[..]),
            Just(&b"false"[..]),
            Just(&b"0"[..]),
            Just(&b"-0"[..]),
            Just(&b"17"[..]),
            Just(&b"-4"[..]),
            Just(&b"0.7"[..]),
            Just(&b"1.0"[..]),
            Just(&b"-1.5E3"[..]),
            Just(&b"1e400"[..]),
            Just(&b"18446744073709551616"[..]),
            Just(&br#""gpt-4o""#[..]),
            Just(&br#"" a \t b  c\n""#[..]),
            Just(&br#""caf\u00e9\/\"""#[..]),
            Just(&br#""\ud83d\ude00""#[..]),
            Just(&br#""\ud800""#[..]),
            Just(&b"\"\xff\""[..]),
            Just(&b"\"\xc3\xa9 \xe2\x80\x83x\""[..]),
            Just(&b"\"\x7f \xe2\x80\xa8 /\""[..]),
        ]
        .prop_map(<[u8]>::to_vec);
        let value = atom.prop_recursive(3, 24, 4, |inner| {
            let key = prop_oneof![
                Just(&b"\"role\""[..]),
                Just(&b"\"content\""[..]),
                Just(&b"\"text\""[..]),
                Just(&b"\"include_usage\""[..]),
                Just(&b"\"b\""[..]),
                Just(&br#""\u0062""#[..]),
                Just(&br#""k\"\n""#[..]),
                Just(&b"\"\xc3\xa9\""[..]),
            ];
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(|v| [
                    &b"[ "[..],
                    &v.join(&b", "[..]),
                    b"]"
                ]
                .concat()),
                prop::collection::vec((key, inner), 0..4).prop_map(|v| {
                    let m: Vec<Vec<u8>> = v
                        .into_iter()
                        .map(|(k, x)| [k, b" :", &x].concat())
                        .collect();
                    [&b"{"[..], &m.join(&b","[..]), b"}"].concat()
                }),
            ]
        });
        let name = prop_oneof![
            Just(&b"\"model\""[..]),
            Just(&b"\"messages\""[..]),
            Just(&b"\"prompt\""[..]),
            Just(&b"\"input\""[..]),
            Just(&b"\"system\""[..]),
            Just(&b"\"temperature\""[..]),
            Just(&b"\"tools\""[..]),
            Just(&b"\"functions\""[..]),
            Just(&b"\"stream\""[..]),
            Just(&b"\"stream_options\""[..]),
            Just(&b"\"user\""[..]),
            Just(&b"\"seed\""[..]),
            Just(&br#""str\u0065am""#[..]),
        ];
        (
            prop::collection::vec((name, value), 0..6),
            any::<u8>(),
            any::<usize>(),
        )
            .prop_map(|(members, b, at)| {
                let m: Vec<Vec<u8>> = members
                    .into_iter()
                    .map(|(k, x)| [k, b":", &x].concat())
                    .collect();
                let doc = [&b"{"[..], &m.join(&b","[..]), b"}"].concat();
                crate::wire::walk::sometimes_broken(doc, b, at)
            })
    }

    proptest! {
        /// Where the walker answers, its answer is what the parsed
        /// document says, form and key alike.
        #[test]
        fn the_walker_reads_as_serde_reads(body in bodies(), fold in any::<bool>()) {
            let (walked, parsed) = both(&body, fold);
            if let Ok(walked) = walked {
                prop_assert_eq!(Some(walked), parsed);
            }
        }
    }
}
