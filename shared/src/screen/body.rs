//! Where the text is in a request or an answer, by role.
//!
//! Screening reads the text the model reads, not the JSON around it: the
//! contents of chat messages (OpenAI, Anthropic), Anthropic's `system`, the
//! Responses API's `input` and `instructions`, the completions `prompt`, and
//! tool results, each with the role it speaks in. Ids, roles, tool schemas
//! and image data are never looked at, so a redaction cannot break them.

use crate::wire::json_out::push_string;
use crate::wire::walk::{Bad, Once, Walked, Walker};
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

/// A prompt text found in place: who speaks it, where it lies in the body
/// (its quotes included), and what it says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spoken<'a> {
    pub role: Cow<'a, str>,
    pub span: Range<usize>,
    pub text: Cow<'a, str>,
}

/// The prompt texts of a request body, read in place: the texts
/// [`request_texts`] finds in the parsed document, in its order, and the
/// number of messages. `Err` where the walker cannot be sure of that: a
/// body serde refuses (every value is read as serde reads it, skipped ones
/// too, so nothing it would refuse passes unread), or a member that
/// decides a text written twice (serde keeps the last).
pub fn request_text_spans(bytes: &[u8]) -> Walked<(Vec<Spoken<'_>>, usize)> {
    // Texts by the member they are in: the parsed reader visits `messages`,
    // `system`, `instructions`, `prompt`, then `input`, whatever the order
    // in the body.
    let mut found: Vec<(u8, Heard<'_>)> = Vec::new();
    let mut count = 0;
    Walker::document(bytes, |w| {
        if !w.is_object() {
            return w.skip_checked();
        }
        let mut seen = Once::default();
        w.object(|w, k| {
            let name = k.name()?;
            let group = match &*name {
                b"messages" => 0,
                b"system" => 1,
                b"instructions" => 2,
                b"prompt" => 3,
                b"input" => 4,
                other => return skip_unread(w, other),
            };
            seen.first(group)?;
            let mut heard = Vec::new();
            match group {
                0 if w.is_array() => w.array(|w| {
                    count += 1;
                    message_at(w, &mut heard)
                })?,
                1 | 2 => content_at(w, Speaker::Is("system"), &mut heard)?,
                4 if w.is_array() => w.array(|w| {
                    count += 1;
                    if w.is_str() {
                        heard.push((Speaker::Is("user"), w.spanned_str()?));
                        Ok(())
                    } else {
                        message_at(w, &mut heard)
                    }
                })?,
                3 | 4 => content_at(w, Speaker::Is("user"), &mut heard)?,
                _ => w.skip_checked()?,
            }
            found.extend(heard.into_iter().map(|h| (group, h)));
            Ok(())
        })
    })?;
    found.sort_by_key(|(group, _)| *group);
    let texts = found
        .into_iter()
        .map(|(_, (speaker, (span, text)))| Spoken {
            role: match speaker {
                Speaker::Is(r) => Cow::Borrowed(r),
                Speaker::Named(r) => r,
                // Only a message's content speaks as the message, and
                // `message_at` names it.
                Speaker::Message => Cow::Borrowed("user"),
            },
            span,
            text,
        })
        .collect();
    Ok((texts, count))
}

/// Who speaks a text found in place: a fixed role, a message's role (once
/// its object is read), or the message whose role is not read yet.
#[derive(Clone, Debug)]
enum Speaker<'a> {
    Is(&'static str),
    Named(Cow<'a, str>),
    Message,
}

type Heard<'a> = (Speaker<'a>, (Range<usize>, Cow<'a, str>));

/// One message or input item, as [`message`] reads the parsed one.
fn message_at<'a>(w: &mut Walker<'a>, out: &mut Vec<Heard<'a>>) -> Walked<()> {
    if !w.is_object() {
        return w.skip_checked();
    }
    let (mut role, mut call_output) = (None, false);
    let (mut content, mut output) = (Vec::new(), Vec::new());
    let mut seen = Once::default();
    w.object(|w, k| match &*k.name()? {
        b"role" => {
            seen.first(0)?;
            role = opt_text(w)?;
            Ok(())
        }
        b"type" => {
            seen.first(1)?;
            call_output = opt_text(w)?.as_deref() == Some("function_call_output");
            Ok(())
        }
        b"content" => {
            seen.first(2)?;
            content_at(w, Speaker::Message, &mut content)
        }
        b"output" => {
            seen.first(3)?;
            content_at(w, Speaker::Is("tool"), &mut output)
        }
        other => skip_unread(w, other),
    })?;
    if call_output {
        out.extend(output);
        return Ok(());
    }
    let role = match role {
        Some(r) if r == "function" => Cow::Borrowed("tool"),
        Some(r) => r,
        None => Cow::Borrowed("user"),
    };
    out.extend(content.into_iter().map(|(speaker, t)| match speaker {
        Speaker::Message => (Speaker::Named(role.clone()), t),
        other => (other, t),
    }));
    Ok(())
}

/// A content value, as [`content`] reads the parsed one.
fn content_at<'a>(
    w: &mut Walker<'a>,
    speaker: Speaker<'a>,
    out: &mut Vec<Heard<'a>>,
) -> Walked<()> {
    if w.is_str() {
        out.push((speaker, w.spanned_str()?));
        return Ok(());
    }
    if !w.is_array() {
        return w.skip_checked();
    }
    w.array(|w| {
        if w.is_str() {
            out.push((speaker.clone(), w.spanned_str()?));
            return Ok(());
        }
        if !w.is_object() {
            return w.skip_checked();
        }
        let (mut kind, mut text, mut inner) = (None, None, Vec::new());
        let mut seen = Once::default();
        w.object(|w, k| match &*k.name()? {
            b"type" => {
                seen.first(0)?;
                kind = opt_text(w)?;
                Ok(())
            }
            b"text" => {
                seen.first(1)?;
                if w.is_str() {
                    text = Some(w.spanned_str()?);
                    Ok(())
                } else {
                    w.skip_checked()
                }
            }
            b"content" => {
                seen.first(2)?;
                content_at(w, Speaker::Is("tool"), &mut inner)
            }
            other => skip_unread(w, other),
        })?;
        if kind.as_deref() == Some("tool_result") {
            out.extend(inner);
        } else if let Some(t) = text {
            out.push((speaker.clone(), t));
        }
        Ok(())
    })
}

/// A member no reader looks at, read as serde reads it: its key's UTF-8
/// (the names the readers match are ASCII) and its value checked.
fn skip_unread(w: &mut Walker<'_>, name: &[u8]) -> Walked<()> {
    std::str::from_utf8(name).map_err(|_| Bad)?;
    w.skip_checked()
}

/// A string member's text, `None` for any other value (read as serde reads it).
fn opt_text<'a>(w: &mut Walker<'a>) -> Walked<Option<Cow<'a, str>>> {
    if w.is_str() {
        w.str().map(Some)
    } else {
        w.skip_checked().map(|()| None)
    }
}

/// `bytes` with each span replaced by its new text as a JSON string (the
/// spans in the order they lie), every other byte kept.
pub fn rewrite(bytes: &[u8], changes: impl IntoIterator<Item = (Range<usize>, String)>) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() + 64);
    let mut at = 0;
    for (span, new) in changes {
        out.extend_from_slice(&bytes[at..span.start]);
        push_string(&mut out, &new);
        at = span.end;
    }
    out.extend_from_slice(&bytes[at..]);
    out
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

    type Texts = (Vec<(String, String)>, usize);

    /// The texts read in place (each span checked to hold its text), and
    /// the ones read from the parsed document.
    fn both(body: &[u8]) -> (Walked<Texts>, Option<Texts>) {
        let parsed = serde_json::from_slice::<Value>(body).ok().map(|mut v| {
            let mut out = Vec::new();
            let n = request_texts(&mut v, &mut |role, s| {
                out.push((role.to_string(), s.clone()))
            });
            (out, n)
        });
        let walked = request_text_spans(body).map(|(texts, n)| {
            let texts = texts
                .into_iter()
                .map(|t| {
                    let raw: String = serde_json::from_slice(&body[t.span.clone()]).unwrap();
                    assert_eq!(raw, t.text);
                    (t.role.into_owned(), t.text.into_owned())
                })
                .collect();
            (texts, n)
        });
        (walked, parsed)
    }

    #[test]
    fn request_texts_read_in_place_are_the_parsed_ones() {
        for body in [
            r#"{"model":"m","messages":[{"role":"system","content":"sys"},{"role":"user","content":[{"type":"text","text":"hi"},{"type":"image_url","image_url":{"url":"data:x"}}]},{"role":"tool","tool_call_id":"1","content":"out"}]}"#,
            r#"{"system":[{"type":"text","text":"s"}],"messages":[{"role":"user","content":[{"type":"tool_result","tool_use_id":"t","content":[{"type":"text","text":"res"}]},{"type":"text","text":"q"}]}]}"#,
            r#"{"instructions":"be nice","input":[{"role":"user","content":[{"type":"input_text","text":"a"}]},{"type":"function_call_output","call_id":"c","output":"o"}]}"#,
            r#"{"input":"plain","prompt":["a","b"],"instructions":["i"],"system":"s"}"#,
            // The role, or the part's type, after the text it decides.
            r#"{"messages":[{"content":"c\u00e9 \"q\"","role":"assistant"},{"content":[{"text":"r","type":"tool_result","content":"inner"}],"role":"function"}]}"#,
            r#"{"messages":[{"role":7,"content":"no role"},"loose",[1],{"type":"function_call_output","output":[{"type":"text","text":"o"}],"content":"ignored"}]}"#,
            r#"{"messages":{"role":"user"},"input":[{"role":null,"content":{"text":"not a list"}},"s",{"content":[{"type":"tool_result","content":[{"type":"tool_result","content":"deep"}]},{"type":"text","text":5}]}]}"#,
            r#"{"tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object","properties":{"q":{"type":"string"}}}}}],"temperature":0.7,"n":-1,"x":[1e5,-0,true,null],"messages":[]}"#,
            r#"[{"messages":[{"content":"in an array"}]}]"#,
            r#""just a string""#,
            " { \"prompt\" : \"spaced\" } ",
            r#"{"m\u0065ssages":[{"role":"user","content":"escaped key"}]}"#,
        ] {
            let (walked, parsed) = both(body.as_bytes());
            assert_eq!(walked.ok(), parsed, "{body}");
        }
        for left in [
            // Written twice: serde keeps the last.
            &br#"{"messages":[],"messages":[{"content":"x"}]}"#[..],
            br#"{"messages":[{"role":"user","content":"x","role":"system"}]}"#,
            br#"{"prompt":[{"type":"text","text":"a","text":"b"}]}"#,
            // What serde refuses, in a member no reader looks at.
            br#"{"user":"\ud800","prompt":"p"}"#,
            br#"{"seed":1e400,"prompt":"p"}"#,
            b"{\"\xff\":1,\"prompt\":\"p\"}",
            b"{\"x\":\"\xff\",\"prompt\":\"p\"}",
            br#"{"prompt":"p"} x"#,
            br#"{"prompt":"p""#,
        ] {
            assert_eq!(
                request_text_spans(left).err(),
                Some(Bad),
                "{}",
                String::from_utf8_lossy(left)
            );
        }
    }

    /// Request bodies of messages, parts and prompts, their members in
    /// any order, now and then twice or of another type, broken or cut
    /// short.
    fn bodies() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::collection::vec;
        use proptest::prelude::*;
        fn object(members: Vec<(&'static [u8], Vec<u8>)>) -> Vec<u8> {
            let m: Vec<Vec<u8>> = members
                .into_iter()
                .map(|(k, x)| [k, b":", &x].concat())
                .collect();
            [&b"{"[..], &m.join(&b","[..]), b"}"].concat()
        }
        fn array(items: Vec<Vec<u8>>) -> Vec<u8> {
            [&b"["[..], &items.join(&b","[..]), b"]"].concat()
        }
        let text = prop_oneof![
            30 => Just(&br#""hi""#[..]),
            10 => Just(&br#""caf\u00e9 \n""#[..]),
            1 => Just(&br#""\ud800""#[..]),
            1 => Just(&b"\"\xff\""[..]),
            3 => Just(&b"null"[..]),
            3 => Just(&b"7"[..]),
            1 => Just(&b"1e400"[..]),
        ]
        .prop_map(<[u8]>::to_vec);
        let role = prop_oneof![
            Just(&br#""user""#[..]),
            Just(&br#""system""#[..]),
            Just(&br#""function""#[..]),
            Just(&b"3"[..]),
        ]
        .prop_map(<[u8]>::to_vec);
        let kind = prop_oneof![
            Just(&br#""text""#[..]),
            Just(&br#""tool_result""#[..]),
            Just(&br#""function_call_output""#[..]),
            Just(&b"null"[..]),
        ]
        .prop_map(<[u8]>::to_vec);
        let (t, k) = (text.clone(), kind.clone());
        let content = text.clone().prop_recursive(3, 16, 3, move |inner| {
            let member = prop_oneof![
                (Just(&b"\"type\""[..]), k.clone()),
                (Just(&b"\"text\""[..]), t.clone()),
                (Just(&br#""t\u0065xt""#[..]), t.clone()),
                (Just(&b"\"content\""[..]), inner),
                (Just(&b"\"id\""[..]), t.clone()),
            ];
            let part = vec(member, 0..4).prop_map(object);
            vec(prop_oneof![t.clone(), part], 0..4).prop_map(array)
        });
        let member = prop_oneof![
            (Just(&b"\"role\""[..]), role),
            (Just(&b"\"type\""[..]), kind),
            (Just(&b"\"content\""[..]), content.clone()),
            (Just(&b"\"output\""[..]), content.clone()),
            (Just(&b"\"id\""[..]), text.clone()),
        ];
        let message = prop_oneof![4 => vec(member, 0..4).prop_map(object), 1 => text];
        let value = prop_oneof![content, vec(message, 0..4).prop_map(array)];
        let name = prop_oneof![
            3 => Just(&b"\"messages\""[..]),
            1 => Just(&b"\"system\""[..]),
            1 => Just(&b"\"instructions\""[..]),
            1 => Just(&b"\"prompt\""[..]),
            2 => Just(&b"\"input\""[..]),
            1 => Just(&b"\"model\""[..]),
        ];
        (vec((name, value), 0..4), any::<u8>(), any::<usize>()).prop_map(|(members, b, at)| {
            crate::wire::walk::sometimes_broken(object(members), b, at)
        })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(1024))]
        /// Where the in-place reader answers, it finds what the parsed
        /// reader finds; where serde refuses a body, so does it.
        #[test]
        fn request_texts_in_place_agree(body in bodies()) {
            let (walked, parsed) = both(&body);
            if let Ok(walked) = walked {
                proptest::prop_assert_eq!(Some(walked), parsed);
            }
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
