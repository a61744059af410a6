//! Decompressing a response body as it streams, to read it — never to rewrite it.
//!
//! The meter asks upstreams for `identity` encoding, but some send gzip
//! anyway. The compressed bytes still go to the client untouched; a copy is
//! inflated here, piece by piece, so the usage inside can be read. Input is
//! fed in small slices and the output drained after each, so one chunk of a
//! decompression bomb cannot make memory grow past a slice's worth of output.

use flate2::write::{GzDecoder, ZlibDecoder};
use std::io::Write;

/// Largest input slice fed at once; deflate expands at most ~1032:1.
const SLICE: usize = 1024;

pub enum Decoder {
    Gzip(GzDecoder<Vec<u8>>),
    Deflate(ZlibDecoder<Vec<u8>>),
}

impl Decoder {
    /// A decoder for a `content-encoding` value, `None` if it is not one we can read.
    pub fn for_encoding(encoding: &str) -> Option<Decoder> {
        match encoding.trim().to_ascii_lowercase().as_str() {
            "gzip" | "x-gzip" => Some(Decoder::Gzip(GzDecoder::new(Vec::new()))),
            "deflate" => Some(Decoder::Deflate(ZlibDecoder::new(Vec::new()))),
            _ => None,
        }
    }

    /// Inflates `input`, handing the output to `sink` in bounded pieces.
    /// `Err` once the stream is corrupt; the caller stops decoding then.
    pub fn feed(&mut self, input: &[u8], mut sink: impl FnMut(&[u8])) -> std::io::Result<()> {
        for piece in input.chunks(SLICE) {
            match self {
                Decoder::Gzip(d) => {
                    d.write_all(piece)?;
                    d.flush()?;
                    sink(d.get_ref());
                    d.get_mut().clear();
                }
                Decoder::Deflate(d) => {
                    d.write_all(piece)?;
                    d.flush()?;
                    sink(d.get_ref());
                    d.get_mut().clear();
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::write::{GzEncoder, ZlibEncoder};
    use flate2::Compression;

    fn inflate(mut d: Decoder, compressed: &[u8], split: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for piece in compressed.chunks(split) {
            d.feed(piece, |b| out.extend_from_slice(b)).unwrap();
        }
        out
    }

    #[test]
    fn inflates_in_any_chunking() {
        let text = b"data: {\"usage\":{\"prompt_tokens\":3}}\n\n".repeat(200);
        let mut gz = GzEncoder::new(Vec::new(), Compression::default());
        gz.write_all(&text).unwrap();
        let gz = gz.finish().unwrap();
        let mut zl = ZlibEncoder::new(Vec::new(), Compression::default());
        zl.write_all(&text).unwrap();
        let zl = zl.finish().unwrap();
        for split in [1, 7, 4096] {
            let d = Decoder::for_encoding("gzip").unwrap();
            assert_eq!(inflate(d, &gz, split), text, "gzip split {split}");
            let d = Decoder::for_encoding("deflate").unwrap();
            assert_eq!(inflate(d, &zl, split), text, "deflate split {split}");
        }
        assert!(Decoder::for_encoding("br").is_none());
    }

    #[test]
    fn bombs_come_out_in_bounded_pieces() {
        let zeros = vec![0u8; 8 << 20];
        let mut gz = GzEncoder::new(Vec::new(), Compression::best());
        gz.write_all(&zeros).unwrap();
        let gz = gz.finish().unwrap();
        let mut d = Decoder::for_encoding("gzip").unwrap();
        let (mut largest, mut total) = (0, 0);
        d.feed(&gz, |b| {
            largest = largest.max(b.len());
            total += b.len();
        })
        .unwrap();
        assert_eq!(total, zeros.len());
        assert!(largest <= SLICE * 1100, "{largest}");
    }

    #[test]
    fn corrupt_input_is_an_error_not_a_panic() {
        let mut d = Decoder::for_encoding("gzip").unwrap();
        assert!(d.feed(b"this is not gzip at all", |_| {}).is_err());
    }
}
