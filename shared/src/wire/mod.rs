//! What LLM APIs send, and how to read it without holding it.
//!
//! Every stage reads the same wire formats: which API a request speaks
//! (`api`), the facts of its body (`request`), streamed answers (`sse`), the
//! top-level members of JSON answers (`json_scan`), compressed answers
//! (`decode`), the usage the providers report (`usage`), and a few members
//! of one small document read in place (`walk`), and JSON and decimals
//! written without the formatting machinery (`json_out`, `push_decimal`). They live
//! together because they are the parts every filter shares.

pub mod api;
pub mod decode;
pub mod json_out;
pub mod json_scan;
pub mod request;
pub mod sse;
pub mod usage;
pub mod walk;

/// Writes `n` in decimal, as `n.to_string()` would, without the formatting
/// machinery, which costs more than the digits on a per-request path (rate
/// limit headers, a cache entry's header line).
pub fn push_decimal(out: &mut String, n: u64) {
    // Digits are ASCII, so the check cannot fail; it is cheaper than
    // pushing them as chars one by one.
    out.push_str(std::str::from_utf8(decimal(n, &mut [0; 20])).unwrap_or("0"));
}

/// `n`'s decimal digits, written into the end of `digits`.
pub(crate) fn decimal(mut n: u64, digits: &mut [u8; 20]) -> &[u8] {
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &digits[i..]
}

#[cfg(test)]
mod tests {
    #[test]
    fn decimals_are_written_as_to_string_writes_them() {
        for n in [
            0,
            1,
            9,
            10,
            99,
            100,
            12_345,
            u64::from(u32::MAX),
            u64::MAX - 1,
            u64::MAX,
        ] {
            let mut s = String::from("x");
            super::push_decimal(&mut s, n);
            assert_eq!(s, format!("x{n}"));
        }
    }
}
