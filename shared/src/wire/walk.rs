//! Walks one complete JSON document in place, checking its grammar as it
//! goes, so that a reader can pick a few members out of a small document
//! without building it.
//!
//! A streamed answer is hundreds of small events, and a stage reads a
//! handful of members of each. serde's derived readers pay for every key
//! they match and every value they skip through generic visitors. The
//! walker is a byte loop: a reader asks for the members it wants and skips
//! the rest, and the document is rejected, as serde rejects it, when its
//! grammar is wrong anywhere (trailing bytes included). For the meter's
//! events it costs about a quarter less than serde did (natively 32.4k →
//! 23.6k instructions per 7-event answer; `--rows token-meter` stream
//! 478.6k → 462.6k).
//!
//! What it does not check, serde does not either where the values are
//! skipped: the UTF-8 of skipped strings and the code points of their
//! `\u` escapes. Strings a reader takes ([`Walker::str`],
//! [`Walker::text_len`]) are checked as serde checks a `str`, and so are
//! the escapes of keys ([`Key::name`]).

use std::borrow::Cow;

/// The document is not JSON, or not of the shape the reader asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bad;

pub type Walked<T> = Result<T, Bad>;

/// The bytes that end a run of plain string bytes: the quote, the
/// backslash and the control characters (which JSON does not allow there).
const SPECIAL: [bool; 256] = {
    let mut t = [false; 256];
    let mut c = 0;
    while c < 0x20 {
        t[c] = true;
        c += 1;
    }
    t[b'"' as usize] = true;
    t[b'\\' as usize] = true;
    t
};

/// How many plain string bytes `rest` starts with (`None`: all of it is
/// plain, the string does not end in it).
/// The first bytes are tested one by one, since most strings of an event
/// (keys, ids, a delta's few words) end within them; a longer run (a
/// prompt's text) goes by a word at a time, several times faster per byte
/// (the word test is [`super::json_out::specials`]).
fn plain_len(rest: &[u8]) -> Option<usize> {
    const BYTEWISE: usize = 16;
    let head = rest.get(..BYTEWISE).unwrap_or(rest);
    if let Some(i) = head.iter().position(|&c| SPECIAL[usize::from(c)]) {
        return Some(i);
    }
    let mut at = head.len();
    let mut words = rest[at..].chunks_exact(8);
    for word in &mut words {
        let Ok(word) = <[u8; 8]>::try_from(word) else {
            break;
        };
        let flags = super::json_out::specials(u64::from_le_bytes(word));
        if flags != 0 {
            return Some(at + (flags.trailing_zeros() / 8) as usize);
        }
        at += 8;
    }
    let tail = words.remainder();
    tail.iter()
        .position(|&c| SPECIAL[usize::from(c)])
        .map(|i| at + i)
}

/// serde_json's recursion limit: deeper documents are refused, not walked.
const MAX_DEPTH: u32 = 128;

/// A position in a document.
pub struct Walker<'a> {
    b: &'a [u8],
    i: usize,
    depth: u32,
}

/// An object member's key, as written between its quotes.
#[derive(Clone, Copy)]
pub struct Key<'a> {
    raw: &'a [u8],
    escaped: bool,
}

impl<'a> Key<'a> {
    /// The key's bytes decoded; borrowed unless it holds escapes. A key
    /// whose escapes are not text (a lone surrogate) is refused, as serde
    /// refuses it where it reads a struct's keys. A key without escapes is
    /// not checked for UTF-8: bytes that are not UTF-8 match none of a
    /// reader's (ASCII) names, so its member is skipped where serde would
    /// refuse the document. Checking every key cost the meter and the
    /// screen about 2.7k instructions each per 7-event answer (natively),
    /// for input no provider sends.
    pub fn name(&self) -> Walked<Cow<'a, [u8]>> {
        if self.escaped {
            unescape(self.raw).map(|k| Cow::Owned(k.into_bytes()))
        } else {
            Ok(Cow::Borrowed(self.raw))
        }
    }
}

impl<'a> Walker<'a> {
    fn new(b: &'a [u8]) -> Walker<'a> {
        Walker { b, i: 0, depth: 0 }
    }

    /// Reads the whole document with `read`, which must consume exactly one
    /// value; only whitespace may follow it.
    pub fn document<T>(b: &'a [u8], read: impl FnOnce(&mut Walker<'a>) -> Walked<T>) -> Walked<T> {
        let mut w = Walker::new(b);
        let out = read(&mut w)?;
        w.ws();
        if w.i == w.b.len() {
            Ok(out)
        } else {
            Err(Bad)
        }
    }

    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.b.get(self.i) {
            self.i += 1;
        }
    }

    /// The first byte of the next value, after whitespace.
    fn peek(&mut self) -> Option<u8> {
        self.ws();
        self.b.get(self.i).copied()
    }

    fn eat(&mut self, byte: u8) -> bool {
        self.ws();
        if self.b.get(self.i) == Some(&byte) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    /// Whether the next value is `null` (consumed if so).
    pub fn null(&mut self) -> Walked<bool> {
        if self.peek() != Some(b'n') {
            return Ok(false);
        }
        self.literal(b"null")?;
        Ok(true)
    }

    fn literal(&mut self, word: &[u8]) -> Walked<()> {
        if self.b[self.i..].starts_with(word) {
            self.i += word.len();
            Ok(())
        } else {
            Err(Bad)
        }
    }

    /// Skips one value, checking its grammar; returns the bytes it spans.
    pub fn skip(&mut self) -> Walked<&'a [u8]> {
        self.ws();
        let start = self.i;
        match self.peek().ok_or(Bad)? {
            b'{' => self.object(|w, _| w.skip().map(drop))?,
            b'[' => self.array(|w| w.skip().map(drop))?,
            b'"' => {
                self.string()?;
            }
            b't' => self.literal(b"true")?,
            b'f' => self.literal(b"false")?,
            b'n' => self.literal(b"null")?,
            _ => self.number()?,
        }
        Ok(&self.b[start..self.i])
    }

    /// Skips one value as serde reads one: keys and strings checked for
    /// UTF-8 and their escapes, numbers that are not plain integers for
    /// `f64`'s range. What [`Walker::skip`] passes over unchecked (a lone
    /// surrogate, `1e400`), serde refuses anywhere in a document, and a
    /// reader that must refuse what serde refuses skips with this.
    pub fn skip_checked(&mut self) -> Walked<()> {
        match self.peek().ok_or(Bad)? {
            b'{' => self.object(|w, k| {
                std::str::from_utf8(&k.name()?).map_err(|_| Bad)?;
                w.skip_checked()
            }),
            b'[' => self.array(Walker::skip_checked),
            b'"' => self.str().map(drop),
            b't' | b'f' | b'n' => self.skip().map(drop),
            _ => {
                let n = self.skip()?;
                if uint(n).is_none() {
                    serde_json::from_slice::<serde_json::Number>(n).map_err(|_| Bad)?;
                }
                Ok(())
            }
        }
    }

    fn number(&mut self) -> Walked<()> {
        let digits = |w: &mut Walker<'_>| {
            let from = w.i;
            while w.b.get(w.i).is_some_and(u8::is_ascii_digit) {
                w.i += 1;
            }
            w.i - from
        };
        if self.b.get(self.i) == Some(&b'-') {
            self.i += 1;
        }
        match self.b.get(self.i) {
            Some(b'0') => self.i += 1,
            Some(b'1'..=b'9') => {
                digits(self);
            }
            _ => return Err(Bad),
        }
        if self.b.get(self.i) == Some(&b'.') {
            self.i += 1;
            if digits(self) == 0 {
                return Err(Bad);
            }
        }
        if let Some(b'e' | b'E') = self.b.get(self.i) {
            self.i += 1;
            if let Some(b'+' | b'-') = self.b.get(self.i) {
                self.i += 1;
            }
            if digits(self) == 0 {
                return Err(Bad);
            }
        }
        Ok(())
    }

    /// Skips a string at the cursor (its opening quote); returns what lies
    /// between the quotes and whether it holds escapes.
    fn string(&mut self) -> Walked<(&'a [u8], bool)> {
        if !self.eat(b'"') {
            return Err(Bad);
        }
        let start = self.i;
        let mut escaped = false;
        loop {
            let rest = self.b.get(self.i..).unwrap_or_default();
            self.i += plain_len(rest).ok_or(Bad)?;
            match self.b[self.i] {
                b'"' => {
                    let raw = &self.b[start..self.i];
                    self.i += 1;
                    return Ok((raw, escaped));
                }
                b'\\' => {
                    escaped = true;
                    match *self.b.get(self.i + 1).ok_or(Bad)? {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => self.i += 2,
                        b'u' => {
                            let hex = self.b.get(self.i + 2..self.i + 6).ok_or(Bad)?;
                            if !hex.iter().all(u8::is_ascii_hexdigit) {
                                return Err(Bad);
                            }
                            self.i += 6;
                        }
                        _ => return Err(Bad),
                    }
                }
                // A control character.
                _ => return Err(Bad),
            }
        }
    }

    /// A string value, borrowed when it holds no escape (so a borrowed
    /// one is as it is written).
    pub fn str(&mut self) -> Walked<Cow<'a, str>> {
        let (raw, escaped) = self.string()?;
        if escaped {
            unescape(raw).map(Cow::Owned)
        } else {
            std::str::from_utf8(raw).map(Cow::Borrowed).map_err(|_| Bad)
        }
    }

    /// A number read as serde reads a `u64`: an integer without sign,
    /// fraction or exponent that fits.
    pub fn u64(&mut self) -> Walked<u64> {
        match self.peek() {
            Some(b'0'..=b'9') => uint(self.skip()?).ok_or(Bad),
            _ => Err(Bad),
        }
    }

    /// Whether the next value is a string.
    pub fn is_str(&mut self) -> bool {
        self.peek() == Some(b'"')
    }

    /// Whether the next value is an object.
    pub fn is_object(&mut self) -> bool {
        self.peek() == Some(b'{')
    }

    /// Whether the next value is an array.
    pub fn is_array(&mut self) -> bool {
        self.peek() == Some(b'[')
    }

    /// A string value and where it lies in the document, its quotes
    /// included: what a reader that rewrites it in place replaces.
    pub fn spanned_str(&mut self) -> Walked<(std::ops::Range<usize>, Cow<'a, str>)> {
        self.ws();
        let start = self.i;
        let s = self.str()?;
        Ok((start..self.i, s))
    }

    /// `null` (none) or a boolean.
    pub fn opt_bool(&mut self) -> Walked<Option<bool>> {
        match self.peek() {
            Some(b'n') => self.literal(b"null").map(|()| None),
            Some(b't') => self.literal(b"true").map(|()| Some(true)),
            Some(b'f') => self.literal(b"false").map(|()| Some(false)),
            _ => Err(Bad),
        }
    }

    /// `null` or a string.
    pub fn opt_str(&mut self) -> Walked<Option<Cow<'a, str>>> {
        if self.null()? {
            return Ok(None);
        }
        self.str().map(Some)
    }

    /// Walks an object, calling `member` with each key; `member` must
    /// consume the member's value.
    pub fn object(
        &mut self,
        mut member: impl FnMut(&mut Self, Key<'a>) -> Walked<()>,
    ) -> Walked<()> {
        self.sequence(b'{', b'}', |w| {
            let (raw, escaped) = w.string()?;
            if !w.eat(b':') {
                return Err(Bad);
            }
            member(w, Key { raw, escaped })
        })
    }

    /// Walks an array, calling `element` for each element, which it must consume.
    pub fn array(&mut self, element: impl FnMut(&mut Self) -> Walked<()>) -> Walked<()> {
        self.sequence(b'[', b']', element)
    }

    /// `open`, items separated by commas, `close`.
    fn sequence(
        &mut self,
        open: u8,
        close: u8,
        mut item: impl FnMut(&mut Self) -> Walked<()>,
    ) -> Walked<()> {
        if !self.eat(open) {
            return Err(Bad);
        }
        self.enter()?;
        if !self.eat(close) {
            loop {
                item(self)?;
                if self.eat(close) {
                    break;
                }
                if !self.eat(b',') {
                    return Err(Bad);
                }
            }
        }
        self.depth -= 1;
        Ok(())
    }

    fn enter(&mut self) -> Walked<()> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            Err(Bad)
        } else {
            Ok(())
        }
    }

    /// The bytes of the text a value carries, as [`super::request`]'s
    /// estimate counts them: strings count (decoded); arrays add up their
    /// elements; objects add up only the members whose key names text.
    pub fn text_len(&mut self) -> Walked<u64> {
        self.text_len_of(true)
    }

    /// [`Walker::text_len`], refusing a number where it counts text. serde
    /// reads such a number as a value, and refuses one out of `f64`'s
    /// range (`1e400`), which the walker's grammar does not tell; a reader
    /// that must refuse what serde refuses leaves those values to serde.
    pub fn text_len_without_numbers(&mut self) -> Walked<u64> {
        self.text_len_of(false)
    }

    fn text_len_of(&mut self, numbers: bool) -> Walked<u64> {
        match self.peek().ok_or(Bad)? {
            b'"' => Ok(self.str()?.len() as u64),
            b'[' => {
                let mut n = 0;
                self.array(|w| {
                    n += w.text_len_of(numbers)?;
                    Ok(())
                })?;
                Ok(n)
            }
            b'{' => {
                let mut n = 0;
                self.object(|w, k| {
                    let key = k.name()?;
                    if std::str::from_utf8(&key).is_ok_and(super::request::is_text_key) {
                        n += w.text_len_of(numbers)?;
                        Ok(())
                    } else {
                        w.skip().map(drop)
                    }
                })?;
                Ok(n)
            }
            b'-' | b'0'..=b'9' if !numbers => Err(Bad),
            _ => self.skip().map(|_| 0),
        }
    }
}

/// Which of a reader's members it has met: serde refuses a member of a
/// struct written twice, and a reader refuses it with this.
#[derive(Default)]
pub struct Once(u16);

impl Once {
    /// `member` (a number below 16) is met; refused the second time.
    pub fn first(&mut self, member: u8) -> Walked<()> {
        let bit = 1 << member;
        if self.0 & bit != 0 {
            return Err(Bad);
        }
        self.0 |= bit;
        Ok(())
    }
}

/// The digits of an integer that fits a `u64`, as its number: a value's
/// bytes read as `Value::as_u64` reads them (none for any other value).
pub fn uint(n: &[u8]) -> Option<u64> {
    if !n.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(n).ok()?.parse().ok()
}

/// Decodes the escapes of a string's raw bytes, as serde does for a `str`
/// (a lone surrogate is refused).
fn unescape(raw: &[u8]) -> Walked<String> {
    let mut quoted = Vec::with_capacity(raw.len() + 2);
    quoted.push(b'"');
    quoted.extend_from_slice(raw);
    quoted.push(b'"');
    serde_json::from_slice(&quoted).map_err(|_| Bad)
}

/// For the readers' oracle tests: objects of fewer than `most` members
/// drawn from `member`, one in four broken.
#[cfg(test)]
pub(crate) fn objects_sometimes_broken(
    member: impl proptest::strategy::Strategy<Value = String>,
    most: usize,
) -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
    use proptest::prelude::*;
    (
        prop::collection::vec(member, 0..most),
        any::<u8>(),
        any::<usize>(),
    )
        .prop_map(|(m, b, at)| object_sometimes_broken(&m, b, at))
}

/// An object of `members`, one in four broken, a byte changed or the rest
/// cut off (`b` and `at` choose how).
#[cfg(test)]
fn object_sometimes_broken(members: &[String], b: u8, at: usize) -> Vec<u8> {
    sometimes_broken(format!("{{{}}}", members.join(",")).into_bytes(), b, at)
}

/// A document, one time in four broken: a byte changed or the rest cut
/// off (`b` and `at` choose how).
#[cfg(test)]
pub(crate) fn sometimes_broken(mut doc: Vec<u8>, b: u8, at: usize) -> Vec<u8> {
    match b % 8 {
        0 => doc.truncate(at % doc.len()),
        1 => {
            let i = at % doc.len();
            doc[i] = b"{}[],:\"\\x0"[usize::from(b / 8) % 10];
        }
        _ => {}
    }
    doc
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde::de::IgnoredAny;

    fn valid(b: &[u8]) -> bool {
        Walker::document(b, |w| w.skip().map(drop)).is_ok()
    }

    #[test]
    fn grammar_is_serdes() {
        for ok in [
            &b"{}"[..],
            b" [ ] ",
            b"0",
            b"-0.5e+10",
            b"1E3",
            br#"{"a":[1,2,{"b":null}],"c":"\u00e9\n\"","d":true,"e":false}"#,
            "\"é\"".as_bytes(),
        ] {
            assert!(valid(ok), "{}", String::from_utf8_lossy(ok));
            assert!(serde_json::from_slice::<IgnoredAny>(ok).is_ok());
        }
        for bad in [
            &b""[..],
            b"{",
            b"{\"a\":1,}",
            b"[1,]",
            b"01",
            b"1.",
            b"-",
            b"1e",
            b"tru",
            b"nul",
            b"{\"a\" 1}",
            b"{a:1}",
            b"\"\\x\"",
            b"\"\\u12\"",
            b"\"a\nb\"",
            b"{} x",
            b"[1 2]",
            b"\"open",
        ] {
            assert!(!valid(bad), "{}", String::from_utf8_lossy(bad));
            assert!(serde_json::from_slice::<IgnoredAny>(bad).is_err());
        }
    }

    #[test]
    fn plain_runs_end_at_the_first_special_byte() {
        let plain = |hay: &[u8]| hay.iter().position(|&c| SPECIAL[usize::from(c)]);
        for len in 0..48 {
            let mut hay = vec![b'a'; len];
            assert_eq!(plain_len(&hay), None, "{len}");
            for at in 0..len {
                for special in [b'"', b'\\', 0x00, 0x1f, b'\n'] {
                    hay[at] = special;
                    assert_eq!(plain_len(&hay), Some(at), "{len} {at} {special}");
                    // A second special byte above the first changes nothing.
                    if let Some(above) = hay.get_mut(at + 3) {
                        *above = b'"';
                        assert_eq!(plain_len(&hay), Some(at));
                        hay[at + 3] = b'a';
                    }
                    hay[at] = b'a';
                }
                // Bytes next to the special ones are plain.
                for near in [0x20, b'!', b'#', b'[', b']', 0x7f, 0x80, 0xa2, 0xdc, 0xff] {
                    hay[at] = near;
                    assert_eq!(plain_len(&hay), None, "{len} {at} {near}");
                }
                hay[at] = b'a';
            }
            assert_eq!(plain_len(&hay), plain(&hay));
        }
    }

    #[test]
    fn deep_documents_are_refused() {
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        assert!(!valid(deep.as_bytes()));
        let fine = format!("{}{}", "[".repeat(100), "]".repeat(100));
        assert!(valid(fine.as_bytes()));
    }

    #[test]
    fn strings_are_read_as_serde_reads_them() {
        for s in [r#""plain""#, r#""a\"b\\c\/\u00e9\ud83d\ude00""#, r#""""#] {
            let mut w = Walker::new(s.as_bytes());
            let got = w.str().unwrap();
            assert_eq!(got, serde_json::from_str::<String>(s).unwrap());
            assert_eq!(matches!(got, Cow::Borrowed(_)), !s.contains('\\'));
        }
        // A lone surrogate is no string.
        assert!(Walker::new(br#""\ud800""#).str().is_err());
        assert!(Walker::new(b"\"\xff\"").str().is_err());
    }

    #[test]
    fn keys_with_escapes_match_their_decoded_name() {
        let doc = br#"{"\u0075sage":1,"model":2}"#;
        let mut seen = Vec::new();
        Walker::document(doc, |w| {
            w.object(|w, k| {
                seen.push(k.name()?.into_owned());
                w.skip().map(drop)
            })
        })
        .unwrap();
        assert_eq!(seen, [b"usage".to_vec(), b"model".to_vec()]);
    }

    #[test]
    fn integers_are_read_as_serde_reads_them() {
        let strict = |b: &[u8]| Walker::document(b, |w| w.u64()).ok();
        for n in [
            "0",
            "7",
            "18446744073709551615",
            "18446744073709551616",
            "-0",
            "-3",
            "1.0",
            "1e2",
            "null",
            "\"1\"",
            "[]",
        ] {
            assert_eq!(
                strict(n.as_bytes()),
                serde_json::from_str::<u64>(n).ok(),
                "{n}"
            );
        }
    }

    /// Bytes that are JSON, nearly JSON, or neither.
    fn jsonish() -> impl Strategy<Value = Vec<u8>> {
        let atom = prop_oneof![
            Just(b"null".to_vec()),
            Just(b"true".to_vec()),
            Just(b"fals".to_vec()),
            Just(b"-1.5e3".to_vec()),
            Just(b"01".to_vec()),
            Just(br#""s\n\u00e9""#.to_vec()),
            Just(br#""\q""#.to_vec()),
            Just(b"\"a\x01\"".to_vec()),
            Just(br#""\ud800""#.to_vec()),
            Just(b"\"\xff\"".to_vec()),
            Just(b"1e400".to_vec()),
            Just(b"123456789012345678901234567890".to_vec()),
            Just(b"-0".to_vec()),
        ];
        let tree = atom.prop_recursive(4, 32, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(|v| {
                    let mut o = b"[".to_vec();
                    o.extend(v.join(&b","[..]));
                    o.push(b']');
                    o
                }),
                prop::collection::vec(inner, 0..4).prop_map(|v| {
                    let mut o = b"{".to_vec();
                    for (i, x) in v.iter().enumerate() {
                        if i > 0 {
                            o.push(b',');
                        }
                        match i {
                            // Keys are strings too: now and then not text.
                            2 => o.extend_from_slice(b"\"\xfe\" : "),
                            3 => o.extend_from_slice(br#""\udc00" : "#),
                            _ => o.extend(format!("\"k{i}\" : ").into_bytes()),
                        }
                        o.extend(x);
                    }
                    o.push(b'}');
                    o
                }),
            ]
        });
        (tree, any::<u8>(), any::<usize>(), any::<bool>()).prop_map(|(mut t, b, at, cut)| {
            // Now and then one byte changes or the document stops short.
            if cut && !t.is_empty() {
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

    proptest! {
        #[test]
        fn plain_len_agrees_with_a_byte_search(hay in prop::collection::vec(
            // Mostly plain, so that runs reach the word loop.
            prop_oneof![
                30 => Just(b'a'),
                1 => prop::sample::select(vec![b'"', b'\\', 0x00, 0x1f, 0x20, 0x5b, 0x5d, 0x7f, 0xa2, 0xdc, 0xff]),
            ],
            0..80,
        )) {
            prop_assert_eq!(plain_len(&hay), hay.iter().position(|&c| SPECIAL[usize::from(c)]));
        }

        #[test]
        fn accepts_what_serde_accepts(doc in jsonish()) {
            prop_assert_eq!(
                valid(&doc),
                serde_json::from_slice::<IgnoredAny>(&doc).is_ok(),
                "{}", String::from_utf8_lossy(&doc)
            );
        }
    }
}
