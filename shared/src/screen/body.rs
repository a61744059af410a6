//! Where the text is in a request or an answer, by role.
//!
//! Screening reads the text the model reads, not the JSON around it: the
//! contents of chat messages (OpenAI, Anthropic), Anthropic's `system`, the
//! Responses API's `input` and `instructions`, the completions `prompt`, and
//! tool results, each with the role it speaks in. Ids, roles, tool schemas
//! and image data are never looked at, so a redaction cannot break them.

use crate::wire::walk::{Walked, Walker};
use serde_json::Value;
use std::borrow::Cow;
use std::ops::Range;

/// Calls `f(role, text)` for every prompt text of a request body, and
/// returns how many messages (or input items) it has.
pub fn request_texts(body: &mut Value, f: &mut dyn FnMut(&str, &mut String)) -> usize {
    let Some(obj) = body.as_object_mut() else {
        return 0;
    };
    let mut count = 0;
    if let Some(msgs) = obj.get_mut("messages").and_then(Value::as_array_mut) {
        count += msgs.len();
        for m in msgs {
            message(m, "user", f);
        }
    }
    if let Some(system) = obj.get_mut("system") {
        content(system, "system", f);
    }
    if let Some(i) = obj.get_mut("instructions") {
        content(i, "system", f);
    }
    if let Some(p) = obj.get_mut("prompt") {
        content(p, "user", f);
    }
    match obj.get_mut("input") {
        Some(Value::Array(items)) => {
            count += items.len();
            for item in items {
                match item {
                    Value::String(s) => f("user", s),
                    other => message(other, "user", f),
                }
            }
        }
        Some(other) => content(other, "user", f),
        None => {}
    }
    count
}

fn role_of(m: &Value, default: &str) -> String {
    let role = m.get("role").and_then(Value::as_str).unwrap_or(default);
    match role {
        "function" => "tool".to_string(),
        r => r.to_string(),
    }
}

/// One message or input item.
fn message(m: &mut Value, default: &str, f: &mut dyn FnMut(&str, &mut String)) {
    let role = role_of(m, default);
    let Some(obj) = m.as_object_mut() else {
        return;
    };
    // Responses API tool results.
    if obj.get("type").and_then(Value::as_str) == Some("function_call_output") {
        if let Some(o) = obj.get_mut("output") {
            content(o, "tool", f);
        }
        return;
    }
    if let Some(c) = obj.get_mut("content") {
        content(c, &role, f);
    }
}

/// A content value: a string, or a list of parts (text parts, and
/// Anthropic's tool results, which speak as the tool).
fn content(c: &mut Value, role: &str, f: &mut dyn FnMut(&str, &mut String)) {
    match c {
        Value::String(s) => f(role, s),
        Value::Array(parts) => {
            for part in parts {
                match part {
                    Value::String(s) => f(role, s),
                    Value::Object(p) => {
                        let kind = p.get("type").and_then(Value::as_str).unwrap_or("");
                        if kind == "tool_result" {
                            if let Some(inner) = p.get_mut("content") {
                                content(inner, "tool", f);
                            }
                        } else if let Some(Value::String(s)) = p.get_mut("text") {
                            f(role, s);
                        }
                    }
                    _ => {}
                }
            }
        }
        _ => {}
    }
}

/// Keys whose string values are answer text, wherever they are in an answer
/// (OpenAI `message.content` and `text`, Anthropic `content[].text`, the
/// Responses API's `output_text` and `output[].content[].text`).
const ANSWER_TEXT: &[&str] = &["content", "text", "output_text", "refusal"];

/// Calls `f` for every answer text of a response (or of one streamed event).
pub fn answer_texts(v: &mut Value, f: &mut dyn FnMut(&mut String)) {
    match v {
        Value::Object(obj) => {
            for (k, child) in obj.iter_mut() {
                match child {
                    Value::String(s) if is_answer_key(k.as_bytes()) => f(s),
                    Value::Array(_) | Value::Object(_) => answer_texts(child, f),
                    _ => {}
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                answer_texts(item, f);
            }
        }
        _ => {}
    }
}

fn is_answer_key(key: &[u8]) -> bool {
    ANSWER_TEXT.iter().any(|t| t.as_bytes() == key)
}

/// The answer texts of a JSON answer, read in place: each text's span in
/// `bytes` (its quotes included) and its value, in the document's order.
/// The same texts [`answer_texts`] finds in the parsed document, without
/// building it; `Err` when the bytes are not one JSON document.
pub fn answer_text_spans(bytes: &[u8]) -> Walked<Vec<(Range<usize>, Cow<'_, str>)>> {
    let mut out = Vec::new();
    Walker::document(bytes, |w| spans(w, &mut out))?;
    Ok(out)
}

fn spans<'a>(w: &mut Walker<'a>, out: &mut Vec<(Range<usize>, Cow<'a, str>)>) -> Walked<()> {
    if w.is_object() {
        w.object(|w, k| {
            if w.is_str() && is_answer_key(&k.name()?) {
                out.push(w.spanned_str()?);
                Ok(())
            } else {
                spans(w, out)
            }
        })
    } else if w.is_array() {
        w.array(|w| spans(w, out))
    } else {
        w.skip().map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(body: &str) -> (Vec<(String, String)>, usize) {
        let mut v: Value = serde_json::from_str(body).unwrap();
        let mut out = Vec::new();
        let n = request_texts(&mut v, &mut |role, s| {
            out.push((role.to_string(), s.clone()))
        });
        (out, n)
    }

    #[test]
    #[allow(clippy::type_complexity)] // a table of cases reads best inline
    fn finds_the_text_of_each_api_by_role() {
        let cases: &[(&str, &[(&str, &str)], usize)] = &[
            (
                r#"{"model":"m","messages":[{"role":"system","content":"sys"},{"role":"user","content":[{"type":"text","text":"hi"},{"type":"image_url","image_url":{"url":"data:x"}}]},{"role":"tool","tool_call_id":"1","content":"out"}]}"#,
                &[("system", "sys"), ("user", "hi"), ("tool", "out")],
                3,
            ),
            (
                r#"{"system":[{"type":"text","text":"s"}],"messages":[{"role":"user","content":[{"type":"tool_result","tool_use_id":"t","content":[{"type":"text","text":"res"}]},{"type":"text","text":"q"}]}]}"#,
                &[("tool", "res"), ("user", "q"), ("system", "s")],
                1,
            ),
            (
                r#"{"instructions":"be nice","input":[{"role":"user","content":[{"type":"input_text","text":"a"}]},{"type":"function_call_output","call_id":"c","output":"o"}]}"#,
                &[("system", "be nice"), ("user", "a"), ("tool", "o")],
                2,
            ),
            (r#"{"input":"plain"}"#, &[("user", "plain")], 0),
            (
                r#"{"prompt":["a","b"]}"#,
                &[("user", "a"), ("user", "b")],
                0,
            ),
        ];
        for (body, want, n) in cases {
            let (got, count) = texts(body);
            let want: Vec<(String, String)> = want
                .iter()
                .map(|(r, t)| (r.to_string(), t.to_string()))
                .collect();
            assert_eq!(got, want, "{body}");
            assert_eq!(count, *n, "{body}");
        }
    }

    #[test]
    fn finds_answer_text_not_ids() {
        let mut v: Value = serde_json::from_str(
            r#"{"id":"x","choices":[{"message":{"role":"assistant","content":"a"}}],"content":[{"type":"text","text":"b"}],"output":[{"content":[{"type":"output_text","text":"c"}]}]}"#,
        )
        .unwrap();
        let mut got = Vec::new();
        answer_texts(&mut v, &mut |s| got.push(s.clone()));
        got.sort();
        assert_eq!(got, ["a", "b", "c"]);
    }

    #[test]
    fn answer_texts_read_in_place_are_the_parsed_ones() {
        let docs = [
            r#"{"id":"x","choices":[{"message":{"role":"assistant","content":"a"}}],"content":[{"type":"text","text":"b"}],"output":[{"content":[{"type":"output_text","text":"c"}]}]}"#,
            r#"{"choices":[{"delta":{"content":"d\u00e9 \"q\""},"text":5,"refusal":null}]}"#,
            r#"[{"text":"in an array"},[[{"output_text":"deep"}]],"content"]"#,
            r#"{"content":{"text":"nested"},"model":"content","tool_calls":[{"function":{"arguments":"{\"text\":1}"}}]}"#,
            r#""just a string""#,
            r#"{}"#,
            "{ \"text\" : \"spaced\" ,\n \"n\": [1, 2.5e3, true, false, null] }",
            r#"{"te\u0078t":"escaped key"}"#,
        ];
        for doc in docs {
            let mut v: Value = serde_json::from_str(doc).unwrap();
            let mut parsed = Vec::new();
            answer_texts(&mut v, &mut |s| parsed.push(s.clone()));
            let spans = answer_text_spans(doc.as_bytes()).unwrap();
            let mut read: Vec<String> = spans.iter().map(|(_, s)| s.to_string()).collect();
            for (span, s) in &spans {
                let raw: String = serde_json::from_slice(&doc.as_bytes()[span.clone()]).unwrap();
                assert_eq!(&raw, s, "{doc}");
            }
            parsed.sort();
            read.sort();
            assert_eq!(read, parsed, "{doc}");
        }
        for bad in [
            r#"{"text":"a""#,
            r#"{"text":"a"} x"#,
            "",
            r#"{"text":"\ud800"}"#,
        ] {
            assert!(answer_text_spans(bad.as_bytes()).is_err(), "{bad}");
        }
    }
}
