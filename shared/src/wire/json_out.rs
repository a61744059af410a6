//! JSON written by hand, byte for byte as `serde_json` writes it, where a
//! request writes it: the cache key's canonical prompt and the access-log
//! line. serde's derive goes through a serializer per member (the line's 25
//! keys each escaped, byte by byte, at run time); here a member's name and
//! its punctuation are one constant.

use super::decimal;

/// Writes `s` as a JSON string, byte for byte as `serde_json` does (so cache
/// keys do not change), without an allocation per string. Prompts are long and
/// seldom need an escape, so eight bytes at a time are checked for one.
pub fn push_string(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    let mut at = 0;
    for word in bytes.chunks_exact(8) {
        let w = u64::from_le_bytes([
            word[0], word[1], word[2], word[3], word[4], word[5], word[6], word[7],
        ]);
        if needs_escape(w) {
            for i in at..at + 8 {
                escape(out, bytes, &mut start, i);
            }
        }
        at += 8;
    }
    // The last few bytes, padded with spaces (which need no escape) to a
    // word: most names and values here are shorter than eight bytes.
    let tail = &bytes[at..];
    if !tail.is_empty() {
        let mut w = [b' '; 8];
        w[..tail.len()].copy_from_slice(tail);
        if needs_escape(u64::from_le_bytes(w)) {
            for i in at..bytes.len() {
                escape(out, bytes, &mut start, i);
            }
        }
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// Whether any of the eight bytes is a control byte, `"` or `\\`.
fn needs_escape(w: u64) -> bool {
    specials(w) != 0
}

/// The control bytes, `"` and `\\` of a word (read little-endian), as the
/// high bit of their bytes: the classic "has a byte less than n" and "has a
/// zero byte" tests. A flag can stand above the first such byte where
/// there is none (a borrow carries up), never below it, so the lowest flag
/// is exactly the first.
pub(crate) fn specials(w: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let less_than = |x: u64, n: u64| x.wrapping_sub(ONES * n) & !x & HIGH;
    let control = less_than(w, 0x20);
    let quote = less_than(w ^ (ONES * u64::from(b'"')), 1);
    let backslash = less_than(w ^ (ONES * u64::from(b'\\')), 1);
    control | quote | backslash
}

/// Writes the escape of `bytes[i]`, if it needs one, after the bytes since
/// `start`.
fn escape(out: &mut Vec<u8>, bytes: &[u8], start: &mut usize, i: usize) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let b = bytes[i];
    let escape: &[u8] = match b {
        b'"' => b"\\\"",
        b'\\' => b"\\\\",
        b'\n' => b"\\n",
        b'\r' => b"\\r",
        b'\t' => b"\\t",
        0x08 => b"\\b",
        0x0c => b"\\f",
        0..=0x1f => b"",
        _ => return,
    };
    out.extend_from_slice(&bytes[*start..i]);
    if escape.is_empty() {
        out.extend_from_slice(b"\\u00");
        out.push(HEX[usize::from(b >> 4)]);
        out.push(HEX[usize::from(b & 15)]);
    } else {
        out.extend_from_slice(escape);
    }
    *start = i + 1;
}

/// A JSON object written member by member, in the order given. Names are
/// constants of the caller's, written as they are: they must need no escape.
pub struct Object<'a> {
    out: &'a mut Vec<u8>,
    first: bool,
}

impl<'a> Object<'a> {
    pub fn new(out: &'a mut Vec<u8>) -> Self {
        out.push(b'{');
        Object { out, first: true }
    }

    fn name(&mut self, name: &str) {
        debug_assert!(!name.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\'));
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
        self.out.push(b'"');
        self.out.extend_from_slice(name.as_bytes());
        self.out.extend_from_slice(b"\":");
    }

    fn null(&mut self) {
        self.out.extend_from_slice(b"null");
    }

    pub fn str(&mut self, name: &str, value: Option<&str>) {
        self.name(name);
        match value {
            Some(s) => push_string(self.out, s),
            None => self.null(),
        }
    }

    pub fn u64(&mut self, name: &str, value: Option<u64>) {
        self.name(name);
        match value {
            Some(n) => self.out.extend_from_slice(decimal(n, &mut [0; 20])),
            None => self.null(),
        }
    }

    pub fn bool(&mut self, name: &str, value: Option<bool>) {
        self.name(name);
        self.out.extend_from_slice(match value {
            Some(true) => b"true",
            Some(false) => b"false",
            None => b"null",
        });
    }

    /// A float as serde_json writes one (shortest round trip; `null` when
    /// not finite).
    pub fn f64(&mut self, name: &str, value: Option<f64>) {
        self.name(name);
        // Writing a float into a `Vec` cannot fail; on the impossible error
        // the member still gets a value.
        if serde_json::to_writer(&mut *self.out, &value).is_err() {
            self.null();
        }
    }

    pub fn end(self) {
        self.out.push(b'}');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_written_as_serde_json_writes_them() {
        let all: String = (0u8..0x80).map(char::from).collect();
        for s in [
            "",
            "plain",
            "quote \" back \\ slash",
            "é ünï 😀",
            all.as_str(),
        ] {
            let mut out = Vec::new();
            push_string(&mut out, s);
            assert_eq!(out, serde_json::to_vec(s).unwrap(), "{s:?}");
        }
        // Every byte at every place in an eight-byte word, across two, and
        // in the last few bytes that are not a whole word.
        for c in (0u8..0x80).map(char::from).chain(['é', '😀']) {
            for at in 0..17 {
                for after in ["", "b", "bb", "é", "é b", "é b".repeat(3).as_str()] {
                    let s = format!("{}{c}{after}", "a".repeat(at));
                    let mut out = Vec::new();
                    push_string(&mut out, &s);
                    assert_eq!(out, serde_json::to_vec(&s).unwrap(), "{s:?}");
                }
            }
        }
    }

    #[test]
    fn objects_are_written_as_serde_json_writes_them() {
        #[derive(serde::Serialize)]
        struct Like<'a> {
            s: Option<&'a str>,
            n: Option<u64>,
            b: Option<bool>,
            f: Option<f64>,
        }
        let floats = [
            None,
            Some(0.0),
            Some(-0.0),
            Some(1.5),
            Some(0.000_002_5),
            Some(1e-7),
            Some(1e21),
            Some(123_456.789),
            Some(f64::NAN),
            Some(f64::INFINITY),
            Some(f64::NEG_INFINITY),
            Some(f64::MIN_POSITIVE),
            Some(f64::MAX),
        ];
        for (i, f) in floats.into_iter().enumerate() {
            let like = Like {
                s: [None, Some(""), Some("a \"b\" \\ \n é")][i % 3],
                n: [None, Some(0), Some(u64::MAX)][i % 3],
                b: [None, Some(true), Some(false)][i % 3],
                f,
            };
            let mut out = Vec::new();
            let mut o = Object::new(&mut out);
            o.str("s", like.s);
            o.u64("n", like.n);
            o.bool("b", like.b);
            o.f64("f", like.f);
            o.end();
            assert_eq!(
                String::from_utf8(out).unwrap(),
                serde_json::to_string(&like).unwrap()
            );
        }
        let mut out = Vec::new();
        Object::new(&mut out).end();
        assert_eq!(out, b"{}");
    }
}
