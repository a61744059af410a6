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

use crate::wire::json_out::push_string;
use crate::wire::request::TEXT_MEMBERS;
use serde_json::Value;

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
    pub fold_whitespace: bool,
}

/// The key of a request body (a JSON object).
pub fn key(ctx: &Context<'_>, body: &serde_json::Map<String, Value>) -> Key {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"aigw-cache/2\n");
    for part in [ctx.scope, ctx.api, ctx.routed_model.unwrap_or("")] {
        // Lengths first: no value can end early and start the next one.
        out.extend_from_slice(part.len().to_string().as_bytes());
        out.push(b':');
        out.extend_from_slice(part.as_bytes());
        out.push(b'\n');
    }
    let members = body.iter().filter(|(k, _)| !EXCLUDED.contains(&k.as_str()));
    write_object(&mut out, body, members, &|k| {
        ctx.fold_whitespace && TEXT_MEMBERS.contains(&k)
    });
    Key(*blake3::hash(&out).as_bytes())
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

    fn k(scope: &str, body: &str, fold: bool) -> Key {
        let v: Value = serde_json::from_str(body).unwrap();
        let ctx = Context {
            scope,
            api: "chat/openai",
            routed_model: None,
            fold_whitespace: fold,
        };
        key(&ctx, v.as_object().unwrap())
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
            fold_whitespace: false,
        };
        assert_ne!(key(&routed, v.as_object().unwrap()), base);
        let other_api = Context {
            api: "completions/openai",
            routed_model: None,
            ..routed
        };
        assert_ne!(key(&other_api, v.as_object().unwrap()), base);
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
            key(&a, v.as_object().unwrap()),
            key(&b, v.as_object().unwrap())
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
}
