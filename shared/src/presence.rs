//! Which other filters publish facts in this Envoy, learnt as requests pass.
//!
//! With separate modules, reading a fact is a host call, and Envoy answers it
//! through its attribute machinery: about 12,000 instructions each, measured
//! with `./scripts/bench.sh --floor --instructions` (four reads cost more
//! than copying both header maps). The meter alone would pay that for the
//! facts of filters that are not there, on every request, about half of
//! what it costs; rate-limit's identity would pay it for a consumer that in
//! DESIGN order no filter before it names. So a stage reads a writer's
//! facts only once it has seen that writer publish one. It looks on every request of the VM's first
//! [`LEARN`], and then on one request in [`PROBE_EVERY`], so a filter added
//! later is found within that many requests; a writer once seen is read on
//! every request after. Each writer is recognised by the fact it writes on
//! every request it handles.

use std::cell::Cell;

/// The filters whose facts the meter reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Writer {
    /// A filter above this one that parsed the request body (`aigw.request`).
    Above,
    /// Whoever names the consumer (`aigw.consumer`: rate-limit's identity).
    Identity,
    /// rate-limit (`aigw.ratelimit`).
    RateLimit,
    /// prompt-cache (`aigw.cache`).
    Cache,
    /// content-screen (`aigw.screen`).
    Screen,
    /// token-meter (`aigw.usage`).
    Meter,
    /// model-router (`aigw.route`, with the model and provider it chose).
    Router,
}

/// Requests of a VM on which every fact is looked for.
pub const LEARN: u64 = 64;
/// After that, one request in this many looks for the writers not yet seen.
pub const PROBE_EVERY: u64 = 64;

/// What this VM has seen, shared by its requests.
#[derive(Clone, Debug, Default)]
pub struct Presence {
    seen: Cell<u8>,
    requests: Cell<u64>,
}

impl Presence {
    /// Called once per request: whether this request looks for every writer.
    pub fn begin(&self) -> bool {
        let n = self.requests.get();
        self.requests.set(n.saturating_add(1));
        n < LEARN || n % PROBE_EVERY == 0
    }

    /// Whether to read `w`'s facts on a request (`probing` from [`Presence::begin`]).
    pub fn wants(&self, w: Writer, probing: bool) -> bool {
        probing || self.seen.get() & (1 << w as u8) != 0
    }

    /// Notes that `w` published on this request.
    pub fn saw(&self, w: Writer) {
        self.seen.set(self.seen.get() | (1 << w as u8));
    }

    /// Reads `w`'s fact with `read` if it is wanted on this request, and
    /// notes what it finds.
    pub fn look<T>(&self, w: Writer, probing: bool, read: impl FnOnce() -> Option<T>) -> Option<T> {
        if !self.wants(w, probing) {
            return None;
        }
        let v = read();
        if v.is_some() {
            self.saw(w);
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_writer_once_seen_and_probes_for_the_others() {
        let p = Presence::default();
        let mut probes = 0;
        for i in 0..LEARN + 3 * PROBE_EVERY {
            let probing = p.begin();
            if i < LEARN {
                assert!(probing, "request {i} learns");
            }
            probes += u64::from(probing);
            if i == LEARN + 10 {
                assert!(!p.wants(Writer::Cache, probing));
                p.saw(Writer::Cache);
            }
            if i > LEARN + 10 {
                assert!(p.wants(Writer::Cache, probing), "seen once, read always");
            }
        }
        assert_eq!(
            probes,
            LEARN + 3,
            "one probe in {PROBE_EVERY} after learning"
        );
        assert!(!p.wants(Writer::Screen, false));
    }
}
