//! Local counters: one set for every worker of the Envoy, in shared data,
//! updated with compare-and-swap so that no update is lost between workers.
//!
//! Envoy's shared data has no "create if absent" and a write to a missing
//! key always succeeds, so two workers that both see a counter missing would
//! both create it and one count would be lost. Counters therefore live in
//! slots created when the filter starts ([`create_slots`]), before requests
//! arrive; every later write to a slot is a compare-and-swap. A slot holds
//! the counters of the consumers that hash to it, each with the start of the
//! window it counts; a counter from an earlier window reads as zero and is
//! dropped at the next write, so the store needs no sweeping and its size is
//! bounded by the number of active consumers, not by time.

use crate::boundary::{CasError, SharedData};

/// Slots per (rule, kind, window): spreads consumers so that workers rarely
/// contend on one key, while the slots of a limit stay few enough to create up front.
pub const SLOTS: u64 = 64;
/// Compare-and-swap attempts before giving up (contention that high means
/// dozens of workers on one slot at once).
const ATTEMPTS: usize = 256;

/// One counter's place: the slot key and the consumer's hash within it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Place {
    pub key: String,
    pub subject: u64,
}

/// FNV-1a, 64-bit: stable across workers and restarts (`std`'s hasher is seeded).
pub fn hash(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The slot key prefix of a counter kind: `aigw.rl/<rule>/<kind>_per_<window>`.
pub fn prefix(rule: &str, counter: &str) -> String {
    format!("aigw.rl/{rule}/{counter}")
}

pub fn place(prefix: &str, subject: &str) -> Place {
    place_in(&[prefix], subject)
}

/// [`place`] of a limit's counter, `aigw.rl/<rule>/<kind>_per_<window>/<slot>`,
/// without composing the prefix first: this runs for every limit of every
/// request.
pub fn place_of(rule: &str, kind: &str, window: &str, subject: &str) -> Place {
    place_in(&["aigw.rl/", rule, "/", kind, "_per_", window], subject)
}

/// The slot of `subject` under the prefix `parts` make, written in one string.
fn place_in(parts: &[&str], subject: &str) -> Place {
    let subject = hash(subject);
    let slot = subject % SLOTS;
    let mut key = String::with_capacity(parts.iter().map(|p| p.len()).sum::<usize>() + 4);
    for part in parts {
        key.push_str(part);
    }
    key.push('/');
    super::push_number(&mut key, slot);
    Place { key, subject }
}

/// Creates the slots of a counter kind that are not there yet.
pub fn create_slots(shared: &mut dyn SharedData, prefix: &str) {
    for i in 0..SLOTS {
        let key = format!("{prefix}/{i}");
        if shared.get(&key).is_none() {
            let _ = shared.set(&key, &[VERSION], None);
        }
    }
}

const ENTRY: usize = 24;
/// The first byte of every slot. A slot is never empty: the SDK reads an
/// empty shared-data value back as no value at all.
const VERSION: u8 = 1;

/// (subject, window start, count) entries.
fn decode(bytes: &[u8]) -> Vec<(u64, u64, u64)> {
    let Some((&VERSION, bytes)) = bytes.split_first() else {
        return Vec::new();
    };
    bytes
        .chunks_exact(ENTRY)
        .filter_map(|c| {
            let n = |i: usize| -> Option<u64> {
                Some(u64::from_le_bytes(c.get(i..i + 8)?.try_into().ok()?))
            };
            Some((n(0)?, n(8)?, n(16)?))
        })
        .collect()
}

fn encode(entries: &[(u64, u64, u64)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + entries.len() * ENTRY);
    out.push(VERSION);
    for (s, w, c) in entries {
        out.extend_from_slice(&s.to_le_bytes());
        out.extend_from_slice(&w.to_le_bytes());
        out.extend_from_slice(&c.to_le_bytes());
    }
    out
}

/// Why a change did not happen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// Adding would pass `max`; the count now.
    Full(u64),
    /// The store failed or stayed contended past every attempt.
    Store,
}

/// Reads the count of a subject in the window that starts at `window`.
pub fn read(shared: &dyn SharedData, place: &Place, window: u64) -> u64 {
    shared
        .get(&place.key)
        .map(|(v, _)| {
            decode(&v)
                .iter()
                .find(|(s, w, _)| *s == place.subject && *w == window)
                .map_or(0, |e| e.2)
        })
        .unwrap_or(0)
}

/// Changes a subject's count in the window starting at `window` by `delta`,
/// refusing an increase past `max`; returns the new count.
///
/// Entries of windows before `current` are dropped on the way. A change to a
/// window that is no longer stored (it rolled over) does nothing and returns 0.
pub fn change(
    shared: &mut dyn SharedData,
    place: &Place,
    window: u64,
    current: u64,
    delta: i64,
    max: Option<u64>,
) -> Result<u64, Refused> {
    update(shared, place, window, current, &mut |count| {
        if delta < 0 {
            return Ok(count.saturating_sub(delta.unsigned_abs()));
        }
        let new = count.saturating_add(delta.unsigned_abs());
        match max {
            Some(max) if new > max => Err(Refused::Full(count)),
            _ => Ok(new),
        }
    })
}

/// Adds to a subject's count in the current window an amount that depends
/// on the count (`amount(count)`), refusing past `max`, in one
/// compare-and-swap: returns (the amount added, the new count).
pub fn reserve(
    shared: &mut dyn SharedData,
    place: &Place,
    window: u64,
    max: u64,
    amount: &dyn Fn(u64) -> u64,
) -> Result<(u64, u64), Refused> {
    let mut added = 0;
    let new = update(shared, place, window, window, &mut |count| {
        added = amount(count);
        let new = count.saturating_add(added);
        if new > max {
            Err(Refused::Full(count))
        } else {
            Ok(new)
        }
    })?;
    Ok((added, new))
}

/// Drops the entries of windows before `current` from every slot of a
/// counter kind (the timer's sweep, for slots no request writes any more);
/// returns how many were dropped. A slot another worker writes meanwhile
/// is left for the next sweep.
pub fn sweep(shared: &mut dyn SharedData, prefix: &str, current: u64) -> usize {
    let mut dropped = 0;
    for i in 0..SLOTS {
        let key = format!("{prefix}/{i}");
        let Some((bytes, cas)) = shared.get(&key) else {
            continue;
        };
        let mut entries = decode(&bytes);
        let before = entries.len();
        entries.retain(|(_, w, _)| *w >= current);
        if entries.len() < before && shared.set(&key, &encode(&entries), Some(cas)).is_ok() {
            dropped += before - entries.len();
        }
    }
    dropped
}

/// The compare-and-swap loop: `next` maps the count now to the count to write.
fn update(
    shared: &mut dyn SharedData,
    place: &Place,
    window: u64,
    current: u64,
    next: &mut dyn FnMut(u64) -> Result<u64, Refused>,
) -> Result<u64, Refused> {
    for _ in 0..ATTEMPTS {
        let Some((bytes, cas)) = shared.get(&place.key) else {
            // Not created at start (a configuration that grew): create it now.
            // The race this invites is the one create_slots avoids, once per slot.
            shared
                .set(&place.key, &[VERSION], None)
                .map_err(|_| Refused::Store)?;
            continue;
        };
        let mut entries = decode(&bytes);
        entries.retain(|(_, w, _)| *w >= current);
        let at = entries
            .iter()
            .position(|(s, w, _)| *s == place.subject && *w == window);
        if at.is_none() && window < current {
            return Ok(0);
        }
        let new = next(at.map_or(0, |i| entries[i].2))?;
        match at {
            Some(i) => entries[i].2 = new,
            None => entries.push((place.subject, window, new)),
        }
        match shared.set(&place.key, &encode(&entries), Some(cas)) {
            Ok(()) => return Ok(new),
            Err(CasError::Mismatch) => continue,
            Err(CasError::Failed) => return Err(Refused::Store),
        }
    }
    Err(Refused::Store)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boundary::FakeSharedData;

    #[test]
    fn counts_stop_at_the_limit_and_roll_with_the_window() {
        let mut s = FakeSharedData::default();
        create_slots(&mut s, "p");
        let a = place("p", "alice");
        let b = place("p", "bob");
        for i in 1..=3 {
            assert_eq!(change(&mut s, &a, 60, 60, 1, Some(3)), Ok(i));
        }
        assert_eq!(
            change(&mut s, &a, 60, 60, 1, Some(3)),
            Err(Refused::Full(3))
        );
        assert_eq!(change(&mut s, &b, 60, 60, 2, Some(3)), Ok(2));
        assert_eq!(read(&s, &a, 60), 3);
        // Refund, then the next window starts from zero.
        assert_eq!(change(&mut s, &a, 60, 60, -2, None), Ok(1));
        assert_eq!(change(&mut s, &a, 120, 120, 3, Some(3)), Ok(3));
        assert_eq!(read(&s, &a, 60), 0);
        // A refund to a window gone does nothing.
        assert_eq!(change(&mut s, &b, 60, 120, -2, None), Ok(0));
        // Excess past the limit is charged when no max is given.
        assert_eq!(change(&mut s, &a, 120, 120, 5, None), Ok(8));
        assert_eq!(change(&mut s, &a, 120, 120, -100, None), Ok(0));
    }

    #[test]
    fn a_sweep_drops_only_past_windows() {
        let mut s = FakeSharedData::default();
        create_slots(&mut s, "w");
        let (a, b) = (place("w", "alice"), place("w", "bob"));
        change(&mut s, &a, 60, 60, 3, None).unwrap();
        change(&mut s, &b, 120, 120, 4, None).unwrap();
        assert_eq!(sweep(&mut s, "w", 120), 1);
        assert_eq!(sweep(&mut s, "w", 120), 0);
        assert_eq!(read(&s, &b, 120), 4);
    }

    #[test]
    fn a_missing_slot_is_created() {
        let mut s = FakeSharedData::default();
        let a = place("q", "alice");
        assert_eq!(change(&mut s, &a, 0, 0, 1, Some(1)), Ok(1));
        assert_eq!(read(&s, &a, 0), 1);
    }

    /// A store where another worker writes between every read and write.
    struct Contended {
        inner: FakeSharedData,
        interfere: u32,
    }

    impl SharedData for Contended {
        fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
            self.inner.get(key)
        }
        fn set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), CasError> {
            if self.interfere > 0 && cas.is_some() {
                self.interfere -= 1;
                // The other worker's write: one count for someone else.
                let (v, c) = self.inner.get(key).unwrap_or_default();
                let mut e = decode(&v);
                e.push((7, 0, 1));
                self.inner.set(key, &encode(&e), Some(c)).unwrap();
            }
            self.inner.set(key, value, cas)
        }
    }

    #[test]
    fn a_lost_race_is_retried_and_loses_no_count() {
        let mut s = Contended {
            inner: FakeSharedData::default(),
            interfere: 5,
        };
        let a = place("r", "alice");
        create_slots(&mut s, "r");
        assert_eq!(change(&mut s, &a, 0, 0, 1, Some(10)), Ok(1));
        let (v, _) = s.inner.get(&a.key).unwrap();
        let e = decode(&v);
        assert_eq!(e.iter().filter(|x| x.0 == 7).count(), 5);
        assert_eq!(read(&s, &a, 0), 1);
    }
}
