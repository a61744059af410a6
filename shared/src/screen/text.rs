//! The text detectors read: NFKC-normalised, whitespace folded, with a map
//! back to the bytes the user sent.
//!
//! Matching after normalisation is what makes `ｐａｓｓｗｏｒｄ` and
//! `pass\n\t word` hit the same rules as their plain forms; redaction must
//! still cut the original text, so each normalised byte remembers the
//! original span it came from. Normalisation works on groups (a starter and
//! the combining marks after it), the unit NFKC composes within, so a group
//! maps to one original span. Plain ASCII without whitespace runs, the common
//! case, is borrowed as it is and needs no map.

use std::borrow::Cow;
use unicode_normalization::char::is_combining_mark;
use unicode_normalization::UnicodeNormalization;

/// Normalised text and where each of its bytes came from.
#[derive(Debug)]
pub struct Normalized<'a> {
    pub text: Cow<'a, str>,
    /// Per normalised byte, the original span of its group; `None` when the
    /// text is the original.
    spans: Option<Vec<(u32, u32)>>,
    original_len: usize,
}

/// ASCII with no whitespace but single spaces. Most prompts are, and a
/// prompt is read whole on every request, so this runs eight bytes at a
/// time: a word with no byte of 0x80 or over and none under 0x20 can only
/// fail on two spaces in a row, found with a mask of its spaces. A word with
/// either kind of byte is read byte by byte, since only some control bytes
/// (the whitespace ones) make a text not plain.
fn plain(s: &str) -> bool {
    const ONES: u64 = u64::from_le_bytes([1; 8]);
    const HIGH: u64 = ONES << 7;
    let mut space = false;
    let mut words = s.as_bytes().chunks_exact(8);
    for word in &mut words {
        let mut b = [0u8; 8];
        b.copy_from_slice(word);
        let w = u64::from_le_bytes(b);
        // `w - 0x20…` borrows into a byte's high bit only below 0x20: the
        // classic "has a byte less than n", exact in whether any byte is.
        if (w | (w.wrapping_sub(ONES * 0x20) & !w)) & HIGH != 0 {
            if !word.iter().all(|&c| plain_byte(c, &mut space)) {
                return false;
            }
            continue;
        }
        // The high bit of each byte that is a space (exact, no carries:
        // each byte's low seven bits plus 0x7f stay within the byte).
        let x = w ^ (ONES * u64::from(b' '));
        let spaces = !(((x & !HIGH) + !HIGH) | x) & HIGH;
        if spaces & ((spaces << 8) | (u64::from(space) << 7)) != 0 {
            return false;
        }
        space = spaces >> 63 != 0;
    }
    words.remainder().iter().all(|&c| plain_byte(c, &mut space))
}

/// One byte of [`plain`]; `space` says whether the byte before was a space.
fn plain_byte(c: u8, space: &mut bool) -> bool {
    if c >= 0x80 || matches!(c, b'\t' | b'\n' | b'\r' | 0x0b | 0x0c) || (*space && c == b' ') {
        return false;
    }
    *space = c == b' ';
    true
}

impl<'a> Normalized<'a> {
    pub fn new(original: &'a str) -> Normalized<'a> {
        if plain(original) {
            return Normalized {
                text: Cow::Borrowed(original),
                spans: None,
                original_len: original.len(),
            };
        }
        let mut text = String::with_capacity(original.len());
        let mut spans: Vec<(u32, u32)> = Vec::with_capacity(original.len());
        let mut folded_space = false;
        let mut chars = original.char_indices().peekable();
        let mut group = String::new();
        while let Some((start, c)) = chars.next() {
            let span = (start as u32, (start + c.len_utf8()) as u32);
            let next_is_mark = chars.peek().is_some_and(|&(_, m)| is_combining_mark(m));
            if c.is_ascii() && !next_is_mark {
                // ASCII is its own NFKC form: only whitespace changes.
                if c.is_whitespace() {
                    if folded_space {
                        if let Some(last) = spans.last_mut() {
                            last.1 = span.1;
                        }
                    } else {
                        folded_space = true;
                        text.push(' ');
                        spans.push(span);
                    }
                } else {
                    folded_space = false;
                    text.push(c);
                    spans.push(span);
                }
                continue;
            }
            group.clear();
            group.push(c);
            let mut end = start + c.len_utf8();
            while let Some(&(i, m)) = chars.peek() {
                if !is_combining_mark(m) {
                    break;
                }
                group.push(m);
                end = i + m.len_utf8();
                chars.next();
            }
            let span = (start as u32, end as u32);
            for n in group.nfkc() {
                if n.is_whitespace() {
                    if folded_space {
                        // One space stands for the whole run: it maps to all of it.
                        if let Some(last) = spans.last_mut() {
                            last.1 = span.1;
                        }
                        continue;
                    }
                    folded_space = true;
                    text.push(' ');
                    spans.push(span);
                } else {
                    folded_space = false;
                    let mut buf = [0u8; 4];
                    let s = n.encode_utf8(&mut buf);
                    text.push_str(s);
                    for _ in 0..s.len() {
                        spans.push(span);
                    }
                }
            }
        }
        Normalized {
            text: Cow::Owned(text),
            spans: Some(spans),
            original_len: original.len(),
        }
    }

    /// The original span of the normalised span `start..end`.
    pub fn original(&self, start: usize, end: usize) -> (usize, usize) {
        match &self.spans {
            None => (start, end),
            Some(spans) => {
                let a = self.original_start(start);
                let b = if end == 0 {
                    0
                } else {
                    spans
                        .get(end - 1)
                        .map_or(self.original_len, |s| s.1 as usize)
                };
                (a, b.max(a))
            }
        }
    }

    /// The original offset where the group holding normalised byte `at`
    /// starts (the end of the original for `at` past the end).
    pub fn original_start(&self, at: usize) -> usize {
        match &self.spans {
            None => at.min(self.original_len),
            Some(spans) => spans.get(at).map_or(self.original_len, |s| s.0 as usize),
        }
    }

    /// The first normalised offset whose group starts at or after original `at`.
    pub fn normalized_at(&self, at: usize) -> usize {
        match &self.spans {
            None => at.min(self.text.len()),
            Some(spans) => spans.partition_point(|s| (s.0 as usize) < at),
        }
    }
}

/// Start of the last group (a starter and its combining marks) of `s`: the
/// part a following combining mark could still change.
pub fn last_group_start(s: &str) -> usize {
    let mut at = s.len();
    for (i, c) in s.char_indices().rev() {
        at = i;
        if !is_combining_mark(c) {
            break;
        }
    }
    at
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_is_borrowed() {
        let n = Normalized::new("hello world");
        assert!(matches!(n.text, Cow::Borrowed(_)));
        assert_eq!(n.original(6, 11), (6, 11));
        for (s, is_plain) in [
            ("", true),
            (" a b ", true),
            ("a  b", false),
            ("a\tb", false),
            ("a\nb", false),
            ("a\x0bb", false),
            ("é", false),
            ("ends  ", false),
        ] {
            assert_eq!(plain(s), is_plain, "{s:?}");
        }
    }

    /// The byte-at-a-time definition the word-at-a-time one must agree with.
    fn plain_bytewise(s: &str) -> bool {
        let mut space = false;
        s.bytes().all(|c| plain_byte(c, &mut space))
    }

    proptest::proptest! {
        #[test]
        fn plain_reads_words_as_it_reads_bytes(
            s in proptest::collection::vec(
                proptest::sample::select(vec!["a", " ", "  ", "\t", "\n", "\r", "\x0b", "\x0c", "\x01", "\x1f", "\x7f", "é", "ｐ", "!", "~"]),
                0..40,
            )
        ) {
            let s = s.concat();
            proptest::prop_assert_eq!(plain(&s), plain_bytewise(&s), "{:?}", s);
        }
    }

    #[test]
    fn plain_finds_two_spaces_at_every_offset() {
        for at in 0..23 {
            let mut s = "x".repeat(24);
            assert!(plain(&s));
            s.replace_range(at..at + 2, "  ");
            assert!(!plain(&s), "two spaces at {at}");
            let mut s = "x".repeat(24);
            s.replace_range(at..at + 1, "\n");
            assert!(!plain(&s), "a newline at {at}");
            let mut s = "x ".repeat(12);
            s.replace_range(at..at + 1, "\x01");
            assert!(plain(&s), "a control byte that is not whitespace at {at}");
        }
    }

    #[test]
    fn folds_whitespace_and_compatibility_forms_and_maps_back() {
        let s = "ｐａｓｓ \n\t word ﬁx";
        let n = Normalized::new(s);
        assert_eq!(n.text, "pass word fix");
        let at = n.text.find("word").unwrap();
        let (a, b) = n.original(at, at + 4);
        assert_eq!(&s[a..b], "word");
        let (a, b) = n.original(4, 5);
        assert_eq!(&s[a..b], " \n\t ");
        // "i" of the ligature maps to the whole ligature.
        let (a, b) = n.original(n.text.len() - 2, n.text.len() - 1);
        assert_eq!(&s[a..b], "ﬁ");
        assert_eq!(n.normalized_at(s.find('w').unwrap()), at);
    }

    #[test]
    fn composes_combining_marks() {
        let n = Normalized::new("cafe\u{301} ok");
        assert_eq!(n.text, "café ok");
        assert_eq!(last_group_start("cafe\u{301}"), 3);
        assert_eq!(last_group_start("ab"), 1);
        assert_eq!(last_group_start(""), 0);
    }
}
