//! Entries and the local store.
//!
//! An [`Entry`] is one cached answer: the JSON body the provider would have
//! sent without streaming (a streamed answer is assembled into it), with its
//! key, times and the tokens it saves. Its encoding is text (a header line,
//! then the body), versioned and checked: the same bytes go into Envoy's
//! shared data and into Redis, and a corrupt, truncated or foreign value
//! decodes to nothing, which is a miss that the next store overwrites.
//!
//! The local store lives in proxy-wasm shared data, which every worker of the
//! `vm_id` sees. Shared data has no delete and no transactions across keys,
//! so the store is set-associative: the key picks one of `shards` values,
//! each holding at most [`WAYS`] entries and `max_bytes / shards` bytes, and
//! every store rewrites that one value with compare-and-swap. A shard is
//! therefore always whole and within its budget, whatever the workers do at
//! the same time, and the sum of the shard budgets is the configured bound:
//! it is never exceeded, not even for a moment. Within a shard the least
//! recently used entry goes first (expired ones before that); each record
//! carries its key and stale deadline in a binary header, so choosing a
//! victim or finding an entry parses nothing and copies nothing. Recency lives
//! in a small side value per shard that hits write without compare-and-swap
//! (a lost update only makes eviction slightly less exact), so a hit never
//! copies a whole shard back. A record's header carries when it was stored,
//! which is its last use until a hit says otherwise: a store neither writes
//! the side value nor, when the shard has room, reads it.

use super::key::{hex, Key};
use crate::boundary::{CasError, SharedData};
use crate::wire::push_decimal;
use serde::Deserialize;

/// Entries per shard.
pub const WAYS: usize = 8;

const ENTRY_MAGIC: &str = "aigw-cache";
/// Bumped whenever the encoding changes: an entry of another version is a miss.
pub const FORMAT_VERSION: u32 = 2;
const SHARD_MAGIC: &[u8; 5] = b"AGCS\x03";

/// One cached answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub key: Key,
    pub created_ms: u64,
    /// Fresh until then.
    pub expires_ms: u64,
    /// Servable on upstream failure until then (`expires_ms` when there is no stale window).
    pub stale_until_ms: u64,
    /// Tokens a hit saves (the original answer's input + output).
    pub tokens: u64,
    /// The answer as JSON, as the provider sends it without streaming.
    pub body: Vec<u8>,
}

/// An entry's header line, a JSON object. Written here, not by serde: a
/// store writes one per miss and serde's derive took 4.6k instructions
/// natively to do it, the writer below 2.9k (the bytes are serde's, a test
/// checks). Read by serde: reading it in place with the walker was no
/// cheaper (7.3k against 7.1k per hit, natively).
#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
struct Meta {
    v: u32,
    key: String,
    created_ms: u64,
    expires_ms: u64,
    stale_until_ms: u64,
    tokens: u64,
    len: usize,
    sum: String,
}

/// Writes the header line of `entry`, whose body has checksum `sum`.
fn write_meta(out: &mut String, entry: &Entry, sum: &str) {
    // The strings are hex digits: nothing to escape.
    let numbers = [
        ("{\"v\":", u64::from(FORMAT_VERSION)),
        (",\"created_ms\":", entry.created_ms),
        (",\"expires_ms\":", entry.expires_ms),
        (",\"stale_until_ms\":", entry.stale_until_ms),
        (",\"tokens\":", entry.tokens),
        (",\"len\":", entry.body.len() as u64),
    ];
    for (i, (name, n)) in numbers.into_iter().enumerate() {
        out.push_str(name);
        push_decimal(out, n);
        if i == 0 {
            out.push_str(",\"key\":\"");
            out.push_str(&entry.key.hex());
            out.push('"');
        }
    }
    out.push_str(",\"sum\":\"");
    out.push_str(sum);
    out.push_str("\"}");
}

/// Catches a truncated or corrupt body, not an adversary (the key is a
/// BLAKE3 digest): a 64-bit multiply-xorshift over 8-byte words, a few
/// instructions a word where SHA-256 took about twenty a byte, and stable
/// across builds, since Redis keeps entries across upgrades.
fn checksum(body: &[u8]) -> String {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut h = K ^ body.len() as u64;
    let mut words = body.chunks_exact(8);
    for w in &mut words {
        let mut b = [0u8; 8];
        b.copy_from_slice(w);
        h = (h ^ u64::from_le_bytes(b)).wrapping_mul(K);
        h ^= h >> 29;
    }
    let mut tail = [0u8; 8];
    tail[..words.remainder().len()].copy_from_slice(words.remainder());
    h = (h ^ u64::from_le_bytes(tail)).wrapping_mul(K);
    h ^= h >> 32;
    hex(&h.to_le_bytes())
}

impl Entry {
    pub fn encode(&self) -> Vec<u8> {
        let mut meta = String::with_capacity(192);
        write_meta(&mut meta, self, &checksum(&self.body));
        let mut out = Vec::with_capacity(ENTRY_MAGIC.len() + meta.len() + self.body.len() + 2);
        out.extend_from_slice(ENTRY_MAGIC.as_bytes());
        out.push(b' ');
        out.extend_from_slice(meta.as_bytes());
        out.push(b'\n');
        out.extend_from_slice(&self.body);
        out
    }

    /// The entry, if the bytes are one of this version, whole, for `key`.
    pub fn decode(bytes: &[u8], key: &Key) -> Option<Entry> {
        let rest = bytes
            .strip_prefix(ENTRY_MAGIC.as_bytes())?
            .strip_prefix(b" ")?;
        let nl = rest.iter().position(|b| *b == b'\n')?;
        let meta: Meta = serde_json::from_slice(&rest[..nl]).ok()?;
        let body = &rest[nl + 1..];
        if meta.v != FORMAT_VERSION
            || meta.key != key.hex()
            || meta.len != body.len()
            || meta.sum != checksum(body)
        {
            return None;
        }
        Some(Entry {
            key: *key,
            created_ms: meta.created_ms,
            expires_ms: meta.expires_ms,
            stale_until_ms: meta.stale_until_ms,
            tokens: meta.tokens,
            body: body.to_vec(),
        })
    }

    pub fn is_fresh(&self, now_ms: u64) -> bool {
        now_ms < self.expires_ms
    }
}

/// One entry of a shard, borrowed from the shard's bytes: what eviction
/// needs is in a fixed binary header, so no entry is parsed or copied to
/// find one or to choose a victim.
struct Record<'a> {
    key: &'a [u8],
    stale_until_ms: u64,
    stored_ms: u64,
    entry: &'a [u8],
}

/// Per record: key (32), stale-until (8), stored-at (8), length (4), then the entry.
const RECORD_HEADER: usize = 32 + 8 + 8 + 4;

/// A shard's records; `None` for bytes that are not a whole shard.
fn decode_shard(bytes: &[u8]) -> Option<Vec<Record<'_>>> {
    let mut rest = bytes.strip_prefix(SHARD_MAGIC)?;
    let (&n, r) = rest.split_first()?;
    rest = r;
    let mut out = Vec::with_capacity(usize::from(n));
    for _ in 0..n {
        let head = rest.get(..RECORD_HEADER)?;
        let stale: [u8; 8] = head[32..40].try_into().ok()?;
        let stored: [u8; 8] = head[40..48].try_into().ok()?;
        let len: [u8; 4] = head[48..52].try_into().ok()?;
        let len = u32::from_le_bytes(len) as usize;
        let entry = rest.get(RECORD_HEADER..RECORD_HEADER.checked_add(len)?)?;
        out.push(Record {
            key: &head[..32],
            stale_until_ms: u64::from_le_bytes(stale),
            stored_ms: u64::from_le_bytes(stored),
            entry,
        });
        rest = &rest[RECORD_HEADER + len..];
    }
    rest.is_empty().then_some(out)
}

fn encode_shard(records: &[Record<'_>]) -> Vec<u8> {
    let size: usize = records.iter().map(|r| r.entry.len()).sum();
    let mut out = Vec::with_capacity(shard_overhead(records.len()) + size);
    out.extend_from_slice(SHARD_MAGIC);
    out.push(records.len() as u8);
    for r in records {
        out.extend_from_slice(r.key);
        out.extend_from_slice(&r.stale_until_ms.to_le_bytes());
        out.extend_from_slice(&r.stored_ms.to_le_bytes());
        out.extend_from_slice(&(r.entry.len() as u32).to_le_bytes());
        out.extend_from_slice(r.entry);
    }
    out
}

fn shard_overhead(n: usize) -> usize {
    SHARD_MAGIC.len() + 1 + RECORD_HEADER * n
}

/// What a store did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stored {
    pub stored: bool,
    /// Entries pushed out to make room (expired ones not counted).
    pub evicted: u64,
}

/// The local store's shape, from the configured bounds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Local {
    pub shards: usize,
    pub max_entries: usize,
    pub max_bytes: usize,
    prefix: String,
}

impl Local {
    pub fn new(max_entries: usize, max_bytes: usize) -> Local {
        let shards = max_entries.div_ceil(WAYS).max(1);
        Local {
            shards,
            max_entries,
            max_bytes,
            prefix: "aigw.cache".into(),
        }
    }

    /// The largest encoded entry a shard can hold.
    pub fn max_entry_bytes(&self) -> usize {
        self.shard_bytes(0).saturating_sub(shard_overhead(1))
    }

    fn shard_of(&self, key: &Key) -> usize {
        let mut b = [0u8; 8];
        b.copy_from_slice(&key.0[..8]);
        (u64::from_le_bytes(b) % self.shards as u64) as usize
    }

    fn shard_entries(&self, shard: usize) -> usize {
        let base = self.max_entries / self.shards;
        base + usize::from(shard < self.max_entries % self.shards)
    }

    fn shard_bytes(&self, _shard: usize) -> usize {
        self.max_bytes / self.shards
    }

    fn shard_key(&self, shard: usize) -> String {
        format!("{}.s.{shard}", self.prefix)
    }

    fn recency_key(&self, shard: usize) -> String {
        format!("{}.r.{shard}", self.prefix)
    }

    /// The entry for `key` (fresh or not: the caller decides), if there is a whole one.
    pub fn get(&self, shared: &mut dyn SharedData, key: &Key, now_ms: u64) -> Option<Entry> {
        let shard = self.shard_of(key);
        let (bytes, _) = shared.get(&self.shard_key(shard))?;
        let records = decode_shard(&bytes)?;
        let raw = records.iter().find(|r| r.key == key.0)?.entry;
        let entry = Entry::decode(raw, key)?;
        self.touch(shared, shard, key, now_ms);
        Some(entry)
    }

    fn recency(&self, shared: &dyn SharedData, shard: usize) -> Vec<([u8; 8], u64)> {
        let Some((bytes, _)) = shared.get(&self.recency_key(shard)) else {
            return Vec::new();
        };
        bytes
            .chunks_exact(16)
            .filter_map(|c| {
                let k: [u8; 8] = c[..8].try_into().ok()?;
                let t: [u8; 8] = c[8..].try_into().ok()?;
                Some((k, u64::from_le_bytes(t)))
            })
            .take(WAYS * 2)
            .collect()
    }

    fn write_recency(&self, shared: &mut dyn SharedData, shard: usize, r: &[([u8; 8], u64)]) {
        let mut out = Vec::with_capacity(r.len() * 16);
        for (k, t) in r {
            out.extend_from_slice(k);
            out.extend_from_slice(&t.to_le_bytes());
        }
        let _ = shared.set(&self.recency_key(shard), &out, None);
    }

    /// Marks `key` used now (a hit): the only writer of the recency hints.
    fn touch(&self, shared: &mut dyn SharedData, shard: usize, key: &Key, now_ms: u64) {
        let mut r = self.recency(shared, shard);
        let id = short(key);
        r.retain(|(k, _)| *k != id);
        r.push((id, now_ms));
        if r.len() > WAYS * 2 {
            r.sort_by_key(|(_, t)| std::cmp::Reverse(*t));
            r.truncate(WAYS * 2);
        }
        self.write_recency(shared, shard, &r);
    }

    /// Stores an entry, evicting what it must; never past the bounds.
    pub fn put(&self, shared: &mut dyn SharedData, entry: &Entry, now_ms: u64) -> Stored {
        let shard = self.shard_of(&entry.key);
        let encoded = entry.encode();
        let budget = self.shard_bytes(shard);
        let ways = self.shard_entries(shard);
        if ways == 0 || encoded.len() + shard_overhead(1) > budget {
            return Stored::default();
        }
        for _ in 0..8 {
            let (current, cas) = match shared.get(&self.shard_key(shard)) {
                Some((b, cas)) => (b, Some(cas)),
                // Never written: the first write must not race another first write.
                None => (Vec::new(), Some(0)),
            };
            // A corrupt shard holds nothing worth keeping: it is overwritten.
            let records = decode_shard(&current).unwrap_or_default();
            // Keep the others that are still servable (fresh or stale).
            let mut kept: Vec<Record<'_>> = records
                .into_iter()
                .filter(|r| r.key != entry.key.0 && r.stale_until_ms > now_ms)
                .collect();
            let fits = |kept: &[Record<'_>]| {
                let bytes: usize = kept.iter().map(|r| r.entry.len()).sum::<usize>()
                    + encoded.len()
                    + shard_overhead(kept.len() + 1);
                kept.len() < ways && bytes <= budget
            };
            let mut evicted = 0;
            if !fits(&kept) {
                // Something must go: the least recently used, by the hits'
                // hints, else by when it was stored.
                let recency = self.recency(shared, shard);
                let last_used = |r: &Record<'_>| -> u64 {
                    recency
                        .iter()
                        .find(|(k, _)| r.key.get(8..16) == Some(&k[..]))
                        .map_or(0, |(_, t)| *t)
                        .max(r.stored_ms)
                };
                kept.sort_by_cached_key(|r| std::cmp::Reverse(last_used(r)));
                while !fits(&kept) && kept.pop().is_some() {
                    evicted += 1;
                }
            }
            let mut all = kept;
            all.push(Record {
                key: &entry.key.0,
                stale_until_ms: entry.stale_until_ms,
                stored_ms: now_ms,
                entry: &encoded,
            });
            let value = encode_shard(&all);
            match shared.set(&self.shard_key(shard), &value, cas) {
                Ok(()) => {
                    return Stored {
                        stored: true,
                        evicted,
                    };
                }
                Err(CasError::Mismatch) => continue,
                Err(CasError::Failed) => return Stored::default(),
            }
        }
        Stored::default()
    }
}

fn short(key: &Key) -> [u8; 8] {
    let mut b = [0u8; 8];
    b.copy_from_slice(&key.0[8..16]);
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boundary::FakeSharedData;
    use sha2::{Digest, Sha256};

    fn key(n: u64) -> Key {
        Key(Sha256::digest(n.to_le_bytes()).into())
    }

    #[test]
    fn the_header_line_is_the_one_serde_wrote() {
        for (n, now, len, tokens) in [
            (1, 0, 0, 0),
            (2, 1_700_000_000_123, 417, 212),
            (3, u64::MAX - 200_000, 9, u64::MAX),
        ] {
            let mut e = entry(n, now, len);
            e.tokens = tokens;
            e.expires_ms = now.saturating_add(1);
            let encoded = e.encode();
            let line = encoded.strip_prefix(b"aigw-cache ").unwrap();
            let line = &line[..line.iter().position(|b| *b == b'\n').unwrap()];
            // What serde's derive writes, the writer must write.
            let serde = serde_json::to_string(&Meta {
                v: FORMAT_VERSION,
                key: e.key.hex(),
                created_ms: e.created_ms,
                expires_ms: e.expires_ms,
                stale_until_ms: e.stale_until_ms,
                tokens: e.tokens,
                len: e.body.len(),
                sum: checksum(&e.body),
            })
            .unwrap();
            assert_eq!(String::from_utf8_lossy(line), serde);
            assert_eq!(Entry::decode(&encoded, &e.key), Some(e));
        }
    }

    fn entry(n: u64, now: u64, body_len: usize) -> Entry {
        Entry {
            key: key(n),
            created_ms: now,
            expires_ms: now + 60_000,
            stale_until_ms: now + 120_000,
            tokens: 7,
            body: vec![b'x'; body_len],
        }
    }

    /// All bytes the store holds in shared data (shards and recency).
    fn held(local: &Local, shared: &FakeSharedData) -> (usize, usize) {
        let mut bytes = 0;
        let mut entries = 0;
        for s in 0..local.shards {
            if let Some((b, _)) = shared.get(&local.shard_key(s)) {
                bytes += b.len();
                entries += decode_shard(&b).unwrap().len();
            }
        }
        (bytes, entries)
    }

    #[test]
    fn entries_round_trip_and_anything_else_is_a_miss() {
        let e = entry(1, 1000, 40);
        let bytes = e.encode();
        assert_eq!(Entry::decode(&bytes, &e.key), Some(e.clone()));
        assert_eq!(Entry::decode(&bytes, &key(2)), None, "another key");
        assert_eq!(
            Entry::decode(&bytes[..bytes.len() - 1], &e.key),
            None,
            "truncated"
        );
        let mut flipped = bytes.clone();
        let last = flipped.len() - 1;
        flipped[last] = b'y';
        assert_eq!(Entry::decode(&flipped, &e.key), None, "corrupt body");
        let other = String::from_utf8(bytes.clone())
            .unwrap()
            .replace("{\"v\":2,", "{\"v\":1,");
        assert_eq!(
            Entry::decode(other.as_bytes(), &e.key),
            None,
            "other version"
        );
        assert_eq!(Entry::decode(b"", &e.key), None);
        assert_eq!(Entry::decode(b"aigw-cache {}\n", &e.key), None);
    }

    #[test]
    fn a_store_leaves_recency_to_hits_and_evicts_the_least_recently_used() {
        // One shard of two ways.
        let local = Local::new(2, 1 << 16);
        let mut shared = FakeSharedData::default();
        assert!(local.put(&mut shared, &entry(1, 10, 10), 10).stored);
        assert!(local.put(&mut shared, &entry(2, 20, 10), 20).stored);
        // With room, a store neither reads nor writes the recency hints.
        assert!(shared.get(&local.recency_key(0)).is_none());
        // Full, with no hits: the one stored first goes.
        let third = local.put(&mut shared, &entry(3, 30, 10), 30);
        assert_eq!(third.evicted, 1);
        assert_eq!(local.get(&mut shared, &key(1), 31), None);
        // 3 was stored after 2, but 2 was used since: 3 goes next.
        assert!(local.get(&mut shared, &key(2), 40).is_some());
        assert!(local.put(&mut shared, &entry(4, 50, 10), 50).stored);
        assert!(local.get(&mut shared, &key(3), 51).is_none());
        assert!(local.get(&mut shared, &key(2), 52).is_some());
        assert!(local.get(&mut shared, &key(4), 53).is_some());
    }

    #[test]
    fn a_corrupt_shard_is_a_miss_and_is_overwritten() {
        let local = Local::new(8, 1 << 16);
        let mut shared = FakeSharedData::default();
        let e = entry(1, 0, 10);
        shared
            .set(&local.shard_key(0), b"AGCS\x03\x05garbage", None)
            .unwrap();
        assert_eq!(local.get(&mut shared, &e.key, 0), None);
        assert!(local.put(&mut shared, &e, 0).stored);
        assert_eq!(local.get(&mut shared, &e.key, 1), Some(e.clone()));
        // A whole shard whose entry was damaged: a miss, then overwritten.
        let (mut bytes, _) = shared.get(&local.shard_key(0)).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        shared.set(&local.shard_key(0), &bytes, None).unwrap();
        assert_eq!(local.get(&mut shared, &e.key, 2), None);
        assert!(local.put(&mut shared, &e, 3).stored);
        assert_eq!(local.get(&mut shared, &e.key, 4), Some(e));
    }

    #[test]
    fn ten_times_the_capacity_stays_in_bounds_and_keeps_the_hot_set() {
        let max_entries = 64;
        let max_bytes = 64 * 700;
        let local = Local::new(max_entries, max_bytes);
        let mut shared = FakeSharedData::default();
        let hot: Vec<u64> = (0..8).collect();
        let mut now = 1_000;
        for k in &hot {
            assert!(local.put(&mut shared, &entry(*k, now, 300), now).stored);
        }
        let (mut hits, mut lookups, mut evicted) = (0, 0, 0);
        for cold in 1000..1000 + 10 * max_entries as u64 {
            now += 1;
            // The hot set is asked for between every cold store.
            for k in &hot {
                lookups += 1;
                match local.get(&mut shared, &key(*k), now) {
                    Some(_) => hits += 1,
                    None => {
                        local.put(&mut shared, &entry(*k, now, 300), now);
                    }
                }
            }
            let s = local.put(
                &mut shared,
                &entry(cold, now, 200 + (cold % 300) as usize),
                now,
            );
            assert!(s.stored);
            evicted += s.evicted;
            let (bytes, entries) = held(&local, &shared);
            assert!(bytes <= max_bytes, "{bytes} > {max_bytes}");
            assert!(entries <= max_entries, "{entries} > {max_entries}");
        }
        let rate = hits as f64 / lookups as f64;
        assert!(rate > 0.99, "hot-set hit rate {rate}");
        assert!(evicted >= 9 * max_entries as u64 - 8, "evicted {evicted}");
        let (_, entries) = held(&local, &shared);
        assert!(entries > max_entries / 2, "the store is used: {entries}");
    }

    #[test]
    fn expired_entries_make_room_first_and_oversized_ones_are_refused() {
        let local = Local::new(8, 8 * 400);
        let mut shared = FakeSharedData::default();
        assert!(!local.put(&mut shared, &entry(1, 0, 5000), 0).stored);
        assert!(local.max_entry_bytes() < 8 * 400);
        for n in 0..8 {
            assert!(local.put(&mut shared, &entry(n, 0, 100), 0).stored);
        }
        // All eight are past their stale window now: none is evicted, all are dropped.
        let s = local.put(&mut shared, &entry(100, 200_000, 100), 200_000);
        assert_eq!(
            s,
            Stored {
                stored: true,
                evicted: 0
            }
        );
        assert_eq!(held(&local, &shared).1, 1);
    }
}
