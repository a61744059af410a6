//! Local counters: one set for every worker of the Envoy, in shared data,
//! updated with compare-and-swap so that no update is lost between workers.
//!
//! Envoy's shared data has no "create if absent" and a write to a missing
//! key always succeeds, so two workers that both see a counter missing would
//! both create it and one count would be lost. Counters therefore live in
//! slots created when the filter starts ([`create_slots`]), before requests
//! arrive; every later write to a slot is a compare-and-swap. A slot holds
//! the counters of one rule for the consumers that hash to it, each entry
//! naming its consumer, its limit (a tag for the kind and window) and the
//! start of the window it counts: a request's limits of one rule are all
//! reserved with one read and one write ([`reserve_all`]). A counter from an
//! earlier window reads as zero and is dropped at the next write, so the
//! store needs no sweeping to stay right and its size is bounded by the
//! number of active consumers, not by time.

use crate::boundary::{CasError, SharedData};

/// Slots per rule: spreads consumers so that workers rarely contend on one
/// key, while the slots of a rule stay few enough to create up front.
pub const SLOTS: u64 = 64;
/// Compare-and-swap attempts before giving up (contention that high means
/// dozens of workers on one slot at once).
const ATTEMPTS: usize = 256;

/// One counter's place: the slot key, the consumer's hash within it, and
/// the limit's tag.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Place {
    pub key: String,
    pub subject: u64,
    pub tag: u64,
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

/// The slot key prefix of a rule's counters: `aigw.rl/<rule>`.
pub fn prefix(rule: &str) -> String {
    format!("aigw.rl/{rule}")
}

pub fn place(prefix: &str, tag: u64, subject: &str) -> Place {
    place_in(&[prefix], tag, subject)
}

/// [`place`] of a rule's counter, `aigw.rl/<rule>/<slot>`, without
/// composing the prefix first: this runs for every rule of every request.
pub fn place_of(rule: &str, tag: u64, subject: &str) -> Place {
    place_in(&["aigw.rl/", rule], tag, subject)
}

/// The slot of `subject` under the prefix `parts` make, written in one string.
fn place_in(parts: &[&str], tag: u64, subject: &str) -> Place {
    let subject = hash(subject);
    let slot = subject % SLOTS;
    let mut key = String::with_capacity(parts.iter().map(|p| p.len()).sum::<usize>() + 4);
    for part in parts {
        key.push_str(part);
    }
    key.push('/');
    crate::wire::push_decimal(&mut key, slot);
    Place { key, subject, tag }
}

/// Creates the slots of a rule that are not there yet.
pub fn create_slots(shared: &mut dyn SharedData, prefix: &str) {
    for i in 0..SLOTS {
        let key = format!("{prefix}/{i}");
        if shared.get(&key).is_none() {
            let _ = shared.set(&key, &[VERSION], None);
        }
    }
}

/// One counter in a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    subject: u64,
    tag: u64,
    window: u64,
    count: u64,
}

impl Entry {
    fn is(&self, subject: u64, tag: u64, window: u64) -> bool {
        self.subject == subject && self.tag == tag && self.window == window
    }
}

const ENTRY: usize = 32;
/// The first byte of every slot. A slot is never empty: the SDK reads an
/// empty shared-data value back as no value at all.
const VERSION: u8 = 2;

fn decode(bytes: &[u8]) -> Vec<Entry> {
    let Some((&VERSION, bytes)) = bytes.split_first() else {
        return Vec::new();
    };
    bytes
        .chunks_exact(ENTRY)
        .filter_map(|c| {
            let n = |i: usize| -> Option<u64> {
                Some(u64::from_le_bytes(c.get(i..i + 8)?.try_into().ok()?))
            };
            Some(Entry {
                subject: n(0)?,
                tag: n(8)?,
                window: n(16)?,
                count: n(24)?,
            })
        })
        .collect()
}

fn encode(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + entries.len() * ENTRY);
    out.push(VERSION);
    for e in entries {
        for n in [e.subject, e.tag, e.window, e.count] {
            out.extend_from_slice(&n.to_le_bytes());
        }
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
                .find(|e| e.is(place.subject, place.tag, window))
                .map_or(0, |e| e.count)
        })
        .unwrap_or(0)
}

/// Changes a subject's count in the window starting at `window` by `delta`,
/// refusing an increase past `max`; returns the new count.
///
/// Entries of the same limit from windows before `current` are dropped on
/// the way. A change to a window that is no longer stored (it rolled over)
/// does nothing and returns 0.
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

/// What [`reserve_all`] says of one ask: the amount added and the new
/// count, or why not.
pub type Reserved = Result<(u64, u64), Refused>;

/// One limit's part of [`reserve_all`]: add `amount(count)` to the counter
/// tagged `tag` in the window starting at `window` (the current one),
/// unless that passes `max`.
pub struct Ask<'a> {
    pub tag: u64,
    pub window: u64,
    pub max: u64,
    pub amount: &'a dyn Fn(u64) -> u64,
}

/// Reserves every limit of one rule for `subject` with one read and one
/// compare-and-swap of the rule's slot. Each ask's outcome is the amount
/// added and the new count, or `Full` with the count now. With
/// `all_or_nothing` (a rule that denies), one refusal writes nothing, so no
/// limit of a denied rule holds anything; without it (a shadow rule) the
/// asks that fit are written. The second value says whether the asks that
/// fit were written.
pub fn reserve_all(
    shared: &mut dyn SharedData,
    key: &str,
    subject: u64,
    asks: &[Ask<'_>],
    all_or_nothing: bool,
) -> (Vec<Reserved>, bool) {
    let failed = || (asks.iter().map(|_| Err(Refused::Store)).collect(), false);
    for _ in 0..ATTEMPTS {
        let Some((bytes, cas)) = shared.get(key) else {
            // Not created at start (a configuration that grew): create it now.
            if shared.set(key, &[VERSION], None).is_err() {
                return failed();
            }
            continue;
        };
        let mut entries = decode(&bytes);
        let mut outcomes = Vec::with_capacity(asks.len());
        for ask in asks {
            entries.retain(|e| e.tag != ask.tag || e.window >= ask.window);
            let at = entries
                .iter()
                .position(|e| e.is(subject, ask.tag, ask.window));
            let count = at.map_or(0, |i| entries[i].count);
            let added = (ask.amount)(count);
            let new = count.saturating_add(added);
            if new > ask.max {
                outcomes.push(Err(Refused::Full(count)));
                continue;
            }
            outcomes.push(Ok((added, new)));
            match at {
                Some(i) => entries[i].count = new,
                None => entries.push(Entry {
                    subject,
                    tag: ask.tag,
                    window: ask.window,
                    count: new,
                }),
            }
        }
        let refused = outcomes.iter().any(Result::is_err);
        if (refused && all_or_nothing) || outcomes.iter().all(Result::is_err) {
            return (outcomes, false);
        }
        match shared.set(key, &encode(&entries), Some(cas)) {
            Ok(()) => return (outcomes, true),
            Err(CasError::Mismatch) => continue,
            Err(CasError::Failed) => return failed(),
        }
    }
    failed()
}

/// Drops the entries of past windows from every slot of a rule (the
/// timer's sweep, for slots no request writes any more); `current` gives
/// the start of the current window of a tag, `None` for a tag no limit has
/// any more. Returns how many were dropped. A slot another worker writes
/// meanwhile is left for the next sweep.
pub fn sweep(
    shared: &mut dyn SharedData,
    prefix: &str,
    current: &dyn Fn(u64) -> Option<u64>,
) -> usize {
    let mut dropped = 0;
    for i in 0..SLOTS {
        let key = format!("{prefix}/{i}");
        let Some((bytes, cas)) = shared.get(&key) else {
            continue;
        };
        let mut entries = decode(&bytes);
        let before = entries.len();
        entries.retain(|e| current(e.tag).is_some_and(|c| e.window >= c));
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
        entries.retain(|e| e.tag != place.tag || e.window >= current);
        let at = entries
            .iter()
            .position(|e| e.is(place.subject, place.tag, window));
        if at.is_none() && window < current {
            return Ok(0);
        }
        let new = next(at.map_or(0, |i| entries[i].count))?;
        match at {
            Some(i) => entries[i].count = new,
            None => entries.push(Entry {
                subject: place.subject,
                tag: place.tag,
                window,
                count: new,
            }),
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
        let a = place("p", 1, "alice");
        let b = place("p", 1, "bob");
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
        let (a, b) = (place("w", 1, "alice"), place("w", 1, "bob"));
        // Another limit of the rule, with a longer window that started earlier.
        let long = place("w", 2, "alice");
        change(&mut s, &a, 60, 60, 3, None).unwrap();
        change(&mut s, &b, 120, 120, 4, None).unwrap();
        change(&mut s, &long, 0, 0, 9, None).unwrap();
        let current = |tag: u64| match tag {
            1 => Some(120),
            2 => Some(0),
            _ => None,
        };
        assert_eq!(sweep(&mut s, "w", &current), 1);
        assert_eq!(sweep(&mut s, "w", &current), 0);
        assert_eq!(read(&s, &long, 0), 9);
        // A tag no limit has any more goes.
        assert_eq!(sweep(&mut s, "w", &|tag| (tag == 1).then_some(120)), 1);
        assert_eq!(read(&s, &b, 120), 4);
    }

    #[test]
    fn a_missing_slot_is_created() {
        let mut s = FakeSharedData::default();
        let a = place("q", 1, "alice");
        assert_eq!(change(&mut s, &a, 0, 0, 1, Some(1)), Ok(1));
        assert_eq!(read(&s, &a, 0), 1);
    }

    #[test]
    fn a_rules_limits_are_reserved_in_one_write_all_or_nothing() {
        let mut s = FakeSharedData::default();
        create_slots(&mut s, "r");
        let (req, tok) = (place("r", 1, "alice"), place("r", 2, "alice"));
        let one = |_: u64| 1;
        let forty = |_: u64| 40;
        let asks = |max_tokens: u64| {
            [
                Ask {
                    tag: 1,
                    window: 60,
                    max: 10,
                    amount: &one,
                },
                Ask {
                    tag: 2,
                    window: 0,
                    max: max_tokens,
                    amount: &forty,
                },
            ]
        };
        assert_eq!(
            reserve_all(&mut s, &req.key, req.subject, &asks(100), true),
            (vec![Ok((1, 1)), Ok((40, 40))], true)
        );
        assert_eq!(
            reserve_all(&mut s, &req.key, req.subject, &asks(100), true),
            (vec![Ok((1, 2)), Ok((40, 80))], true)
        );
        // The tokens do not fit: the request count is not taken either.
        assert_eq!(
            reserve_all(&mut s, &req.key, req.subject, &asks(100), true),
            (vec![Ok((1, 3)), Err(Refused::Full(80))], false)
        );
        assert_eq!((read(&s, &req, 60), read(&s, &tok, 0)), (2, 80));
        // A shadow rule writes what fits.
        assert_eq!(
            reserve_all(&mut s, &req.key, req.subject, &asks(100), false),
            (vec![Ok((1, 3)), Err(Refused::Full(80))], true)
        );
        assert_eq!((read(&s, &req, 60), read(&s, &tok, 0)), (3, 80));
        // Each limit's window rolls on its own: a new minute, the same hour.
        let later = [
            Ask {
                tag: 1,
                window: 120,
                max: 10,
                amount: &one,
            },
            Ask {
                tag: 2,
                window: 0,
                max: 200,
                amount: &forty,
            },
        ];
        assert_eq!(
            reserve_all(&mut s, &req.key, req.subject, &later, true),
            (vec![Ok((1, 1)), Ok((40, 120))], true)
        );
        // Another consumer in the same slot counts apart.
        let bob = place("r", 1, "bob");
        let mut s2 = FakeSharedData::default();
        let key = req.key.clone();
        assert!(reserve_all(&mut s2, &key, bob.subject, &later, true).1);
        assert_eq!(
            reserve_all(&mut s2, &key, req.subject, &later, true).0[0],
            Ok((1, 1))
        );
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
                e.push(Entry {
                    subject: 7,
                    tag: 1,
                    window: 0,
                    count: 1,
                });
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
        let a = place("r", 1, "alice");
        create_slots(&mut s, "r");
        assert_eq!(change(&mut s, &a, 0, 0, 1, Some(10)), Ok(1));
        let (v, _) = s.inner.get(&a.key).unwrap();
        let e = decode(&v);
        assert_eq!(e.iter().filter(|x| x.subject == 7).count(), 5);
        assert_eq!(read(&s, &a, 0), 1);
    }
}
