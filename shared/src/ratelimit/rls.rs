//! Envoy's rate limit service API (`envoy.service.ratelimit.v3`), the two
//! messages the filter sends and reads, in protobuf wire format by hand: a
//! few fields of two messages do not justify a code generator in the wasm
//! build. Field numbers are those of `rls.proto` and
//! `envoy/extensions/common/ratelimit/v3/ratelimit.proto`.

pub const SERVICE: &str = "envoy.service.ratelimit.v3.RateLimitService";
pub const METHOD: &str = "ShouldRateLimit";

/// `RateLimitRequest { domain = 1; descriptors = 2; hits_addend = 3 }`, each
/// descriptor `RateLimitDescriptor { entries = 1 { key = 1; value = 2 } }`.
pub fn encode_request(
    domain: &str,
    descriptors: &[Vec<(&str, &str)>],
    hits_addend: u32,
) -> Vec<u8> {
    let mut out = Vec::new();
    bytes_field(&mut out, 1, domain.as_bytes());
    for d in descriptors {
        let mut desc = Vec::new();
        for (k, v) in d {
            let mut entry = Vec::new();
            bytes_field(&mut entry, 1, k.as_bytes());
            bytes_field(&mut entry, 2, v.as_bytes());
            bytes_field(&mut desc, 1, &entry);
        }
        bytes_field(&mut out, 2, &desc);
    }
    if hits_addend > 0 {
        varint_field(&mut out, 3, u64::from(hits_addend));
    }
    out
}

/// `RateLimitResponse.Code`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Code {
    #[default]
    Unknown,
    Ok,
    OverLimit,
}

impl Code {
    fn from(v: u64) -> Code {
        match v {
            1 => Code::Ok,
            2 => Code::OverLimit,
            _ => Code::Unknown,
        }
    }
}

/// One `DescriptorStatus`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Status {
    pub code: Code,
    /// `current_limit.requests_per_unit`.
    pub limit: Option<u64>,
    /// `current_limit.unit` (1 second … 6 year).
    pub unit: Option<u64>,
    pub remaining: u64,
    pub reset_ms: Option<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Response {
    pub overall: Code,
    pub statuses: Vec<Status>,
}

/// Decodes a `RateLimitResponse`; `None` for bytes that are not one.
pub fn decode_response(bytes: &[u8]) -> Option<Response> {
    let mut r = Response::default();
    for f in Fields::new(bytes) {
        match f? {
            (1, Value::Varint(v)) => r.overall = Code::from(v),
            (2, Value::Bytes(b)) => r.statuses.push(decode_status(b)?),
            _ => {}
        }
    }
    Some(r)
}

fn decode_status(bytes: &[u8]) -> Option<Status> {
    let mut s = Status::default();
    for f in Fields::new(bytes) {
        match f? {
            (1, Value::Varint(v)) => s.code = Code::from(v),
            (2, Value::Bytes(b)) => {
                for g in Fields::new(b) {
                    match g? {
                        (1, Value::Varint(v)) => s.limit = Some(v),
                        (2, Value::Varint(v)) => s.unit = Some(v),
                        _ => {}
                    }
                }
            }
            (3, Value::Varint(v)) => s.remaining = v,
            (4, Value::Bytes(b)) => {
                let (mut secs, mut nanos) = (0u64, 0u64);
                for g in Fields::new(b) {
                    match g? {
                        (1, Value::Varint(v)) => secs = v,
                        (2, Value::Varint(v)) => nanos = v,
                        _ => {}
                    }
                }
                s.reset_ms = Some(secs.saturating_mul(1000).saturating_add(nanos / 1_000_000));
            }
            _ => {}
        }
    }
    Some(s)
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn varint_field(out: &mut Vec<u8>, field: u32, v: u64) {
    varint(out, u64::from(field) << 3);
    varint(out, v);
}

fn bytes_field(out: &mut Vec<u8>, field: u32, b: &[u8]) {
    varint(out, (u64::from(field) << 3) | 2);
    varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

enum Value<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

/// The fields of one message, in order; an item is `None` where the bytes break.
struct Fields<'a> {
    rest: &'a [u8],
    broken: bool,
}

impl<'a> Fields<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Fields {
            rest: bytes,
            broken: false,
        }
    }

    fn varint(&mut self) -> Option<u64> {
        let mut v: u64 = 0;
        for i in 0..10 {
            let (&b, rest) = self.rest.split_first()?;
            self.rest = rest;
            v |= u64::from(b & 0x7f) << (7 * i);
            if b < 0x80 {
                return Some(v);
            }
        }
        None
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.rest.len() {
            return None;
        }
        let (a, b) = self.rest.split_at(n);
        self.rest = b;
        Some(a)
    }

    fn field(&mut self) -> Option<(u32, Value<'a>)> {
        let tag = self.varint()?;
        let number = u32::try_from(tag >> 3).ok()?;
        let value = match tag & 7 {
            0 => Value::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Value::Fixed
            }
            2 => {
                let n = usize::try_from(self.varint()?).ok()?;
                Value::Bytes(self.take(n)?)
            }
            5 => {
                self.take(4)?;
                Value::Fixed
            }
            _ => return None,
        };
        Some((number, value))
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = Option<(u32, Value<'a>)>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.broken || self.rest.is_empty() {
            return None;
        }
        let f = self.field();
        if f.is_none() {
            self.broken = true;
        }
        Some(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_encode_as_protoc_would() {
        let got = encode_request("aigw", &[vec![("rule", "r"), ("consumer", "al")]], 300);
        // Bytes as `protoc --encode` writes RateLimitRequest{domain:"aigw",
        // descriptors{entries{key:"rule" value:"r"} entries{key:"consumer" value:"al"}}, hits_addend:300}.
        let want: Vec<u8> = [
            &[0x0a, 4][..],
            b"aigw",
            &[0x12, 27, 0x0a, 9, 0x0a, 4],
            b"rule",
            &[0x12, 1],
            b"r",
            &[0x0a, 14, 0x0a, 8],
            b"consumer",
            &[0x12, 2],
            b"al",
            &[0x18, 0xac, 0x02],
        ]
        .concat();
        assert_eq!(got, want);
        // hits_addend 0 is "not set" (the service adds 1).
        assert_eq!(encode_request("d", &[], 0), vec![0x0a, 1, b'd']);
    }

    #[test]
    fn responses_decode_and_garbage_does_not() {
        // overall_code OVER_LIMIT, one status {code OVER_LIMIT, current_limit{60, MINUTE},
        // limit_remaining 0, duration_until_reset{12 s, 500 ms}}, plus an unknown field 9.
        let mut limit = Vec::new();
        varint_field(&mut limit, 1, 60);
        varint_field(&mut limit, 2, 2);
        let mut reset = Vec::new();
        varint_field(&mut reset, 1, 12);
        varint_field(&mut reset, 2, 500_000_000);
        let mut status = Vec::new();
        varint_field(&mut status, 1, 2);
        bytes_field(&mut status, 2, &limit);
        varint_field(&mut status, 3, 0);
        bytes_field(&mut status, 4, &reset);
        let mut bytes = Vec::new();
        varint_field(&mut bytes, 1, 2);
        bytes_field(&mut bytes, 2, &status);
        bytes_field(&mut bytes, 9, &[0]);
        let r = decode_response(&bytes).unwrap();
        assert_eq!(r.overall, Code::OverLimit);
        assert_eq!(
            r.statuses,
            vec![Status {
                code: Code::OverLimit,
                limit: Some(60),
                unit: Some(2),
                remaining: 0,
                reset_ms: Some(12_500),
            }]
        );
        assert_eq!(decode_response(&[]).unwrap().overall, Code::Unknown);
        assert!(decode_response(&[0x12, 50, 1]).is_none());
        assert!(decode_response(&[0xff]).is_none());
    }
}
