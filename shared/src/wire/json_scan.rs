//! Reads a few top-level members of a JSON body as it streams past.
//!
//! A non-streaming LLM response carries its usage in one top-level member
//! (`usage`) next to members that can be large (`choices`, or `data` with
//! thousands of embedding floats). Buffering the whole body to parse it would
//! cost memory proportional to the response and delay nothing useful, so this
//! scanner walks the bytes once, in any chunking, keeping only a lexer state,
//! the bytes of the wanted top-level values (each bounded), and a count of the
//! bytes of string values below the top level (the text an estimate needs).
//! It validates nothing beyond what it needs; the captured values are parsed
//! by serde afterwards, which rejects anything malformed.

/// Scanner state for one body.
#[derive(Debug)]
pub struct TopLevel {
    wanted: &'static [&'static str],
    max_value_bytes: usize,
    captures: Vec<Option<Vec<u8>>>,
    depth: u32,
    /// Container kinds of the open levels, up to a bound (true = object).
    objects: Vec<bool>,
    in_string: bool,
    escaped: bool,
    /// The string being lexed is an object key.
    string_is_key: bool,
    /// In an object, the next string is a key.
    expect_key: bool,
    key: Vec<u8>,
    key_too_long: bool,
    /// Index into `wanted` of the value to capture once it starts.
    pending: Option<usize>,
    /// Index into `wanted` of the value being captured.
    capturing: Option<usize>,
    text_bytes: u64,
}

const MAX_TRACKED_DEPTH: usize = 64;
const MAX_KEY: usize = 64;

impl TopLevel {
    pub fn new(wanted: &'static [&'static str], max_value_bytes: usize) -> Self {
        TopLevel {
            wanted,
            max_value_bytes,
            captures: vec![None; wanted.len()],
            depth: 0,
            objects: Vec::new(),
            in_string: false,
            escaped: false,
            string_is_key: false,
            expect_key: false,
            key: Vec::new(),
            key_too_long: false,
            pending: None,
            capturing: None,
            text_bytes: 0,
        }
    }

    /// The bytes of a wanted top-level value, if it was seen whole and within the bound.
    pub fn value(&self, key: &str) -> Option<&[u8]> {
        let i = self.wanted.iter().position(|k| *k == key)?;
        self.captures.get(i)?.as_deref()
    }

    /// Bytes of string values below the top level (keys excluded).
    pub fn text_bytes(&self) -> u64 {
        self.text_bytes
    }

    fn in_object(&self) -> bool {
        self.depth as usize <= MAX_TRACKED_DEPTH && self.objects.last().copied().unwrap_or(false)
    }

    pub fn feed(&mut self, chunk: &[u8]) {
        let mut capture_from = self.capturing.map(|_| 0);
        let mut i = 0;
        while i < chunk.len() {
            if self.in_string && !self.escaped {
                // Up to the next quote or backslash a string's bytes all
                // count the same: taken as one run, not byte by byte.
                let rest = &chunk[i..];
                let run = memchr::memchr2(b'"', b'\\', rest).unwrap_or(rest.len());
                self.string_run(&rest[..run]);
                i += run;
                if i == chunk.len() {
                    break;
                }
            }
            let (at, b) = (i, chunk[i]);
            i += 1;
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                } else if b == b'\\' {
                    self.escaped = true;
                } else if b == b'"' {
                    self.in_string = false;
                    if self.string_is_key {
                        self.end_key();
                    }
                    continue;
                }
                if self.string_is_key {
                    if self.depth == 1 {
                        if self.key.len() < MAX_KEY {
                            self.key.push(b);
                        } else {
                            self.key_too_long = true;
                        }
                    }
                } else if self.depth >= 2 {
                    self.text_bytes += 1;
                }
                continue;
            }
            if b.is_ascii_whitespace() {
                continue;
            }
            // A value starts here when a wanted key's colon has been seen.
            if let Some(w) = self.pending.take() {
                if b != b':' {
                    self.capturing = Some(w);
                    self.captures[w] = Some(Vec::new());
                    capture_from = Some(at);
                } else {
                    self.pending = Some(w);
                }
            }
            match b {
                b'"' => {
                    self.in_string = true;
                    self.string_is_key = self.expect_key && self.in_object();
                    self.expect_key = false;
                    if self.string_is_key && self.depth == 1 {
                        self.key.clear();
                        self.key_too_long = false;
                    }
                }
                b'{' | b'[' => {
                    self.depth += 1;
                    if self.objects.len() < MAX_TRACKED_DEPTH {
                        self.objects.push(b == b'{');
                    }
                    self.expect_key = b == b'{';
                }
                b'}' | b']' => {
                    if (self.depth as usize) <= MAX_TRACKED_DEPTH {
                        self.objects.pop();
                    }
                    self.depth = self.depth.saturating_sub(1);
                    self.expect_key = false;
                    if self.depth <= 1 {
                        // Closing a container value at the top level ends its capture
                        // (inclusive); closing the top level ends a scalar's (exclusive).
                        let end = if self.depth == 1 { at + 1 } else { at };
                        self.finish_capture(chunk, &mut capture_from, end);
                    }
                }
                b',' => {
                    self.expect_key = self.in_object();
                    if self.depth == 1 {
                        self.finish_capture(chunk, &mut capture_from, at);
                    }
                }
                _ => {}
            }
        }
        if let (Some(w), Some(from)) = (self.capturing, capture_from) {
            self.append(w, &chunk[from..]);
        }
    }

    /// Bytes of a string with no quote or backslash among them, as the
    /// byte loop would take them one by one.
    fn string_run(&mut self, run: &[u8]) {
        if self.string_is_key {
            if self.depth == 1 {
                let room = MAX_KEY.saturating_sub(self.key.len());
                self.key.extend_from_slice(&run[..run.len().min(room)]);
                if run.len() > room {
                    self.key_too_long = true;
                }
            }
        } else if self.depth >= 2 {
            self.text_bytes += run.len() as u64;
        }
    }

    fn end_key(&mut self) {
        if self.depth == 1 && !self.key_too_long {
            self.pending = self.wanted.iter().position(|k| k.as_bytes() == self.key);
        }
    }

    fn finish_capture(&mut self, chunk: &[u8], from: &mut Option<usize>, end: usize) {
        if let (Some(w), Some(start)) = (self.capturing.take(), from.take()) {
            if start <= end {
                self.append(w, &chunk[start..end]);
            }
        }
    }

    fn append(&mut self, w: usize, bytes: &[u8]) {
        let max = self.max_value_bytes;
        if let Some(slot) = self.captures.get_mut(w) {
            match slot {
                Some(v) if v.len() + bytes.len() <= max => v.extend_from_slice(bytes),
                _ => *slot = None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const WANTED: &[&str] = &["usage", "model"];

    fn scan_whole(body: &str) -> (Option<String>, Option<String>, u64) {
        let mut s = TopLevel::new(WANTED, 4096);
        s.feed(body.as_bytes());
        result(&s)
    }

    fn result(s: &TopLevel) -> (Option<String>, Option<String>, u64) {
        let text = |k| {
            s.value(k)
                .map(|v| String::from_utf8_lossy(v).trim().to_string())
        };
        (text("usage"), text("model"), s.text_bytes())
    }

    const CHAT: &str = r#"{"id":"x","object":"chat.completion","model":"gpt-4o-2024-08-06","choices":[{"index":0,"message":{"role":"assistant","content":"hi \"usage\": there"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5,"prompt_tokens_details":{"cached_tokens":0}}}"#;

    #[test]
    fn captures_top_level_values_only() {
        let cases: &[(&str, Option<&str>, Option<&str>)] = &[
            (
                CHAT,
                Some(
                    r#"{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5,"prompt_tokens_details":{"cached_tokens":0}}"#,
                ),
                Some(r#""gpt-4o-2024-08-06""#),
            ),
            (
                r#"{"a":{"usage":{"x":1}},"model":"m"}"#,
                None,
                Some(r#""m""#),
            ),
            (
                r#"{"usage":null,"model":"m"}"#,
                Some("null"),
                Some(r#""m""#),
            ),
            (r#"{ "usage" : 7 }"#, Some("7"), None),
            (
                r#"{"data":[{"usage":1}],"usage":[1,2]}"#,
                Some("[1,2]"),
                None,
            ),
            (r#"{"error":{"message":"bad"}}"#, None, None),
            (
                r#"{"usage":{"prompt_tokens":3"#,
                Some(r#"{"prompt_tokens":3"#),
                None,
            ),
        ];
        for (body, usage, model) in cases {
            let (u, m, _) = scan_whole(body);
            assert_eq!(u.as_deref(), *usage, "{body}");
            assert_eq!(m.as_deref(), *model, "{body}");
        }
    }

    #[test]
    fn counts_text_below_the_top_level() {
        let (_, _, text) =
            scan_whole(r#"{"model":"abc","choices":[{"message":{"content":"hello"}}]}"#);
        assert_eq!(text, "hello".len() as u64);
    }

    #[test]
    fn oversized_values_are_dropped() {
        let mut s = TopLevel::new(WANTED, 8);
        s.feed(br#"{"usage":{"prompt_tokens":3},"model":"m"}"#);
        assert_eq!(s.value("usage"), None);
        assert_eq!(s.value("model"), Some(&br#""m""#[..]));
    }

    /// The scan fed one byte at a time, where no run is longer than a byte.
    fn scan_bytewise(body: &[u8], max: usize) -> TopLevel {
        let mut s = TopLevel::new(WANTED, max);
        for b in body {
            s.feed(std::slice::from_ref(b));
        }
        s
    }

    fn state(s: &TopLevel) -> (Vec<Option<Vec<u8>>>, u64, u32, bool) {
        (s.captures.clone(), s.text_bytes, s.depth, s.in_string)
    }

    #[test]
    fn keys_and_texts_read_in_runs_as_byte_by_byte() {
        let long_key = "k".repeat(MAX_KEY);
        let bodies = [
            CHAT.to_string(),
            format!(r#"{{"{long_key}":1,"usage":2}}"#),
            format!(r#"{{"{long_key}x":{{"usage":3}},"model":"m"}}"#),
            format!(r#"{{"usage{long_key}":1,"model":"m"}}"#),
            r#"{"model":"a\"b\\","choices":[{"t":"x\"y\\\u00e9z","u\"sage":"q"}],"usage":{"a":"\""}}"#.to_string(),
        ];
        for body in &bodies {
            let mut whole = TopLevel::new(WANTED, 4096);
            whole.feed(body.as_bytes());
            assert_eq!(
                state(&whole),
                state(&scan_bytewise(body.as_bytes(), 4096)),
                "{body}"
            );
        }
        let mut s = TopLevel::new(WANTED, 4096);
        s.feed(bodies[2].as_bytes());
        assert_eq!(s.value("model"), Some(&br#""m""#[..]));
        assert_eq!(s.value("usage"), None);
    }

    proptest! {
        #[test]
        fn any_body_read_whole_reads_as_byte_by_byte(
            body in proptest::collection::vec(
                proptest::sample::select(vec![
                    "{", "}", "[", "]", ",", ":", " ", "\"", "\\", "\\\"", "a", "usage", "model",
                    "\"usage\":", "\"model\":", "\"text\"", "12", "null", "é",
                ]),
                0..60,
            ),
            max in 1usize..64,
        ) {
            let body = body.concat();
            let mut whole = TopLevel::new(WANTED, max);
            whole.feed(body.as_bytes());
            prop_assert_eq!(state(&whole), state(&scan_bytewise(body.as_bytes(), max)), "{}", body);
        }

        #[test]
        fn any_chunking_gives_the_same_result(cuts in proptest::collection::vec(0usize..CHAT.len(), 0..20)) {
            let whole = scan_whole(CHAT);
            let mut cuts = cuts;
            cuts.sort_unstable();
            let mut s = TopLevel::new(WANTED, 4096);
            let mut prev = 0;
            for c in cuts.into_iter().chain([CHAT.len()]) {
                s.feed(&CHAT.as_bytes()[prev..c]);
                prev = c;
            }
            prop_assert_eq!(result(&s), whole);
        }
    }
}
