//! Decompressing a response body as it streams, to read it — never to rewrite it.
//!
//! The meter asks upstreams for `identity` encoding, but some send gzip
//! anyway. The compressed bytes still go to the client untouched; a copy is
//! inflated here so the usage inside can be read. Three properties shape it:
//!
//! - **Bounded memory.** Output leaves in pieces of at most [`PIECE`] bytes,
//!   each handed to the reader before the next is inflated, so one chunk of a
//!   decompression bomb never exists inflated in the VM.
//! - **Bounded work.** Each response has a budget of inflated bytes; once it
//!   is spent the decoder says [`Fed::OverBudget`] and the caller stops
//!   reading (the answer still reaches the client untouched).
//! - **Nothing lost before a corrupt point.** Every byte inflated before the
//!   stream turns out corrupt has already been handed over when
//!   [`Fed::Corrupt`] is returned: it often holds the usage.
//!
//! That last one is why this drives flate2's raw [`Decompress`] instead of its
//! `write::{GzDecoder, MultiGzDecoder}`: those keep the output of a write that
//! fails in a private buffer, out of reach. Gzip's member framing (RFC 1952:
//! header, deflate data, 8-byte trailer) is read here, and a body of several
//! members (which `cat a.gz b.gz` makes, and some servers send) is read to
//! its end. CRCs are not checked: nothing inflated here is passed on.

use flate2::{Decompress, FlushDecompress, Status};

/// Largest piece of output handed over at once.
pub const PIECE: usize = 16 * 1024;

/// A gzip header longer than this (it can carry a file name and a comment)
/// is taken for garbage.
const MAX_GZIP_HEADER: usize = 64 * 1024;

/// What feeding a chunk came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fed {
    /// All of the chunk was read; more may follow.
    More,
    /// The budget of inflated bytes is spent: read no further.
    OverBudget,
    /// The stream is corrupt (or has bytes after its end that are not another
    /// gzip member); everything before that point was handed over.
    Corrupt,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Gzip,
    Zlib,
}

/// Where in the compressed stream the decoder is.
#[derive(Debug)]
enum Part {
    /// Bytes of a gzip member's header, gathered until it is complete.
    GzipHeader(Vec<u8>),
    Deflate,
    /// Bytes of a gzip member's trailer (CRC-32 and size) still to skip.
    GzipTrailer(usize),
    /// The zlib stream ended: anything after it is ignored.
    Ended,
}

pub struct Decoder {
    format: Format,
    part: Part,
    inflate: Decompress,
    out: Vec<u8>,
    /// Inflated bytes this response may still produce.
    budget: u64,
}

impl Decoder {
    /// A decoder for a `content-encoding` value that inflates at most
    /// `budget` bytes; `None` if it is not an encoding we can read.
    pub fn for_encoding(encoding: &str, budget: u64) -> Option<Decoder> {
        let format = match encoding.trim().to_ascii_lowercase().as_str() {
            "gzip" | "x-gzip" => Format::Gzip,
            // HTTP's "deflate" is the zlib format (RFC 9110 §8.4.1.2).
            "deflate" => Format::Zlib,
            _ => return None,
        };
        Some(Decoder {
            format,
            part: match format {
                Format::Gzip => Part::GzipHeader(Vec::new()),
                Format::Zlib => Part::Deflate,
            },
            inflate: Decompress::new(format == Format::Zlib),
            out: vec![0; PIECE],
            budget,
        })
    }

    /// Inflates `input`, handing the output to `sink` in pieces of at most
    /// [`PIECE`] bytes. After anything but [`Fed::More`], feed no more.
    pub fn feed(&mut self, mut input: &[u8], mut sink: impl FnMut(&[u8])) -> Fed {
        while !input.is_empty() {
            match &mut self.part {
                Part::GzipHeader(header) => {
                    let had = header.len();
                    let take = input.len().min(MAX_GZIP_HEADER - had);
                    header.extend_from_slice(&input[..take]);
                    match gzip_header_len(header) {
                        Err(()) => return Fed::Corrupt,
                        // The header was incomplete with `had` bytes, so `len > had`.
                        Ok(Some(len)) => {
                            input = &input[len - had..];
                            self.inflate.reset(false);
                            self.part = Part::Deflate;
                        }
                        Ok(None) if header.len() >= MAX_GZIP_HEADER => return Fed::Corrupt,
                        Ok(None) => input = &input[take..],
                    }
                }
                Part::Deflate => match self.inflate_some(&mut input, &mut sink) {
                    Some(fed) => return fed,
                    None => {
                        self.part = match self.format {
                            Format::Gzip => Part::GzipTrailer(8),
                            Format::Zlib => Part::Ended,
                        }
                    }
                },
                Part::GzipTrailer(left) => {
                    let skip = (*left).min(input.len());
                    input = &input[skip..];
                    *left -= skip;
                    if *left == 0 {
                        // Another member may follow.
                        self.part = Part::GzipHeader(Vec::new());
                    }
                }
                Part::Ended => return Fed::More,
            }
        }
        Fed::More
    }

    /// Inflates deflate data from `input` until it is used up (`Some(More)`),
    /// the deflate stream ends (`None`, `input` left after it), or reading must
    /// stop.
    fn inflate_some(&mut self, input: &mut &[u8], sink: &mut impl FnMut(&[u8])) -> Option<Fed> {
        loop {
            let room = usize::try_from(self.budget)
                .unwrap_or(usize::MAX)
                .min(PIECE);
            if room == 0 {
                return Some(Fed::OverBudget);
            }
            let (in_before, out_before) = (self.inflate.total_in(), self.inflate.total_out());
            let status =
                self.inflate
                    .decompress(input, &mut self.out[..room], FlushDecompress::None);
            let used = usize::try_from(self.inflate.total_in() - in_before).unwrap_or(0);
            let made = usize::try_from(self.inflate.total_out() - out_before).unwrap_or(0);
            // Hand over what was inflated before looking at the status: on a
            // corrupt stream it is the last good output.
            if made > 0 {
                sink(&self.out[..made]);
                self.budget = self.budget.saturating_sub(made as u64);
            }
            *input = input.get(used..).unwrap_or(&[]);
            match status {
                Err(_) => return Some(Fed::Corrupt),
                Ok(Status::StreamEnd) => return None,
                // A full piece may mean more output is waiting inside.
                Ok(_) if made == room => {}
                Ok(_) if input.is_empty() => return Some(Fed::More),
                // Input left, room left, nothing done: the stream cannot go on.
                Ok(_) if used == 0 && made == 0 => return Some(Fed::Corrupt),
                Ok(_) => {}
            }
        }
    }
}

/// The length of the gzip member header at the start of `b` (RFC 1952 §2.3):
/// `Ok(None)` while incomplete, `Err` when it is not one.
fn gzip_header_len(b: &[u8]) -> Result<Option<usize>, ()> {
    const FHCRC: u8 = 2;
    const FEXTRA: u8 = 4;
    const FNAME: u8 = 8;
    const FCOMMENT: u8 = 16;
    // Magic, then CM = 8 (deflate).
    for (i, want) in [0x1f, 0x8b, 8].into_iter().enumerate() {
        match b.get(i) {
            Some(&got) if got != want => return Err(()),
            None => return Ok(None),
            Some(_) => {}
        }
    }
    let Some(&flags) = b.get(3) else {
        return Ok(None);
    };
    if flags & 0xe0 != 0 {
        return Err(());
    }
    let mut len = 10;
    if flags & FEXTRA != 0 {
        let Some(x) = b.get(len..len + 2) else {
            return Ok(None);
        };
        len += 2 + usize::from(u16::from_le_bytes([x[0], x[1]]));
    }
    for flag in [FNAME, FCOMMENT] {
        if flags & flag != 0 {
            match b.get(len..).and_then(|rest| memchr::memchr(0, rest)) {
                Some(zero) => len += zero + 1,
                None => return Ok(None),
            }
        }
    }
    if flags & FHCRC != 0 {
        len += 2;
    }
    Ok((b.len() >= len).then_some(len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::write::{GzEncoder, ZlibEncoder};
    use flate2::{Compression, GzBuilder};
    use std::io::Write;

    const NO_LIMIT: u64 = u64::MAX;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut gz = GzEncoder::new(Vec::new(), Compression::default());
        gz.write_all(data).unwrap();
        gz.finish().unwrap()
    }

    /// Feeds `compressed` in pieces of `split`; returns the output and the last answer.
    fn inflate(encoding: &str, budget: u64, compressed: &[u8], split: usize) -> (Vec<u8>, Fed) {
        let mut d = Decoder::for_encoding(encoding, budget).unwrap();
        let mut out = Vec::new();
        let mut fed = Fed::More;
        for piece in compressed.chunks(split) {
            fed = d.feed(piece, |b| out.extend_from_slice(b));
            if fed != Fed::More {
                break;
            }
        }
        (out, fed)
    }

    #[test]
    fn inflates_in_any_chunking() {
        let text = b"data: {\"usage\":{\"prompt_tokens\":3}}\n\n".repeat(200);
        let gz = gzip(&text);
        let mut zl = ZlibEncoder::new(Vec::new(), Compression::default());
        zl.write_all(&text).unwrap();
        let zl = zl.finish().unwrap();
        // A header with every optional field.
        let mut named = GzBuilder::new()
            .filename("usage.json")
            .comment("a comment")
            .extra(vec![1, 2, 3])
            .write(Vec::new(), Compression::fast());
        named.write_all(&text).unwrap();
        let named = named.finish().unwrap();
        for split in [1, 7, 4096, usize::MAX] {
            let cases = [("gzip", &gz), ("deflate", &zl), ("x-gzip", &named)];
            for (encoding, compressed) in cases {
                let got = inflate(encoding, NO_LIMIT, compressed, split);
                assert_eq!(got, (text.clone(), Fed::More), "{encoding} split {split}");
            }
        }
        assert!(Decoder::for_encoding("br", NO_LIMIT).is_none());
    }

    #[test]
    fn every_gzip_member_is_read() {
        let first = b"data: {\"choices\":[{\"delta\":{\"content\":\"w0 \"}}]}\n\n".to_vec();
        let second = b"data: {\"usage\":{\"prompt_tokens\":3}}\n\n".to_vec();
        let two = [gzip(&first), gzip(&second)].concat();
        for split in [1, 5, usize::MAX] {
            let (out, fed) = inflate("gzip", NO_LIMIT, &two, split);
            assert_eq!(
                out,
                [first.clone(), second.clone()].concat(),
                "split {split}"
            );
            assert_eq!(fed, Fed::More);
        }
    }

    #[test]
    fn bombs_stop_at_the_budget_in_bounded_pieces() {
        let zeros = vec![0u8; 64 << 20];
        let mut gz = GzEncoder::new(Vec::new(), Compression::best());
        gz.write_all(&zeros).unwrap();
        let gz = gz.finish().unwrap();
        let budget = 4 << 20;
        let mut d = Decoder::for_encoding("gzip", budget).unwrap();
        let (mut largest, mut total) = (0, 0);
        // One chunk holding the whole bomb.
        let fed = d.feed(&gz, |b| {
            largest = largest.max(b.len());
            total += b.len();
        });
        assert_eq!(fed, Fed::OverBudget);
        assert_eq!(total as u64, budget);
        assert!(largest <= PIECE, "{largest}");
    }

    #[test]
    fn output_before_a_corrupt_point_is_handed_over() {
        let usage = b"{\"model\":\"m\",\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2}}";
        let mut body = gzip(usage);
        // The deflate data ends, then its trailer is cut and garbage follows:
        // not another member.
        body.truncate(body.len() - 4);
        body.extend_from_slice(b"garbage!");
        // Or the deflate data itself goes bad after the usage.
        let mut enc = GzEncoder::new(Vec::new(), Compression::fast());
        enc.write_all(usage).unwrap();
        enc.flush().unwrap();
        let mut cut = enc.get_ref().clone();
        cut.extend_from_slice(&[0xff; 64]);
        for (name, compressed) in [("bad trailer", &body), ("bad deflate", &cut)] {
            for split in [1, 3, usize::MAX] {
                let (out, fed) = inflate("gzip", NO_LIMIT, compressed, split);
                assert_eq!(out, usage, "{name} split {split}");
                assert_eq!(fed, Fed::Corrupt, "{name} split {split}");
            }
        }
    }

    proptest::proptest! {
        /// Any bytes, cut anywhere, after a gzip start or not: never a panic,
        /// never more than the budget, and a valid body's output is always a
        /// prefix of its text, whole once all of it is fed.
        #[test]
        fn any_input_any_cut_is_safe(
            garbage in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
            cut in 0usize..400,
            split in 1usize..50,
            budget in 0u64..3000,
        ) {
            let text = b"data: {\"usage\":{\"prompt_tokens\":3}}\n\n".repeat(50);
            let valid = gzip(&text);
            let cut = cut.min(valid.len());
            // (input, its output is a prefix of the text, it is all of it)
            let cases = [
                (garbage.clone(), false, false),
                // Bytes after a cut may read as more deflate data: anything
                // may come out, within the budget.
                ([&valid[..cut], &garbage[..]].concat(), false, false),
                (valid[..cut].to_vec(), true, false),
                (valid.clone(), true, true),
            ];
            for (input, prefix, whole) in cases {
                let (out, fed) = inflate("gzip", budget, &input, split);
                proptest::prop_assert!(out.len() as u64 <= budget);
                if prefix {
                    proptest::prop_assert!(text.starts_with(&out));
                }
                if whole && budget > text.len() as u64 {
                    proptest::prop_assert_eq!((out.len(), fed), (text.len(), Fed::More));
                }
            }
        }
    }

    #[test]
    fn not_gzip_is_corrupt_not_a_panic() {
        let cases: &[&[u8]] = &[
            b"this is not gzip at all",
            &[0x1f, 0x8b, 7],
            &[0x1f, 0x8b, 8, 0xe0, 0, 0, 0, 0, 0, 0],
        ];
        for input in cases {
            let (out, fed) = inflate("gzip", NO_LIMIT, input, usize::MAX);
            assert_eq!((out.len(), fed), (0, Fed::Corrupt), "{input:?}");
        }
        // A header cut short is only incomplete.
        assert_eq!(inflate("gzip", NO_LIMIT, &[0x1f, 0x8b], 1).1, Fed::More);
    }
}
