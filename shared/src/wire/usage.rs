//! Token usage: what the providers report, and the one record we keep.
//!
//! Providers name the same counts differently (OpenAI `prompt_tokens`, the
//! Responses API and Anthropic `input_tokens`, Anthropic splits cached input
//! into `cache_read_input_tokens` and `cache_creation_input_tokens`). One wire
//! struct reads them all; [`Observed`] keeps, field by field, the *last* value
//! seen, because every provider that repeats usage in a stream repeats running
//! totals (vLLM on every chunk, Anthropic's cumulative `message_delta`), so
//! summing would count tokens twice. [`Observed::resolve`] turns what was seen
//! into a [`Usage`] whose `source` says how far it can be trusted; an unknown
//! count stays `None` and is never reported as zero.

use crate::wire::api::{Family, Operation};
use serde::{Deserialize, Serialize};

/// How a usage record was obtained.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UsageSource {
    /// The provider reported it, and the response was complete.
    Provider,
    /// Counted from the text seen (no usage, or a cut stream).
    Estimated,
    /// Nothing can be said (not an LLM call, an error, nothing seen).
    #[default]
    None,
}

impl UsageSource {
    pub fn as_str(self) -> &'static str {
        match self {
            UsageSource::Provider => "provider",
            UsageSource::Estimated => "estimated",
            UsageSource::None => "none",
        }
    }
}

/// The usage of one request. Cached input (read from a prompt cache) and
/// cache-write input (written to one) are parts of input, reasoning a part
/// of output.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    pub cached_input_tokens: Option<u64>,
    /// Anthropic's `cache_creation_input_tokens`; `None` where the provider
    /// does not report it. Absent in the JSON of older writers.
    #[serde(default)]
    pub cache_write_input_tokens: Option<u64>,
    pub reasoning_tokens: Option<u64>,
    pub source: UsageSource,
}

impl Usage {
    pub fn total_tokens(&self) -> Option<u64> {
        Some(self.input_tokens?.saturating_add(self.output_tokens?))
    }
}

/// A usage object as any supported provider writes it; unknown members are ignored.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct WireUsage {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
    #[serde(default)]
    prompt_tokens_details: Option<Details>,
    #[serde(default)]
    completion_tokens_details: Option<Details>,
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default)]
    input_tokens_details: Option<Details>,
    #[serde(default)]
    output_tokens_details: Option<Details>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize)]
struct Details {
    #[serde(default)]
    cached_tokens: Option<u64>,
    #[serde(default)]
    reasoning_tokens: Option<u64>,
}

/// Usage seen so far in one response, each field last-wins.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    prompt: Option<u64>,
    completion: Option<u64>,
    cached: Option<u64>,
    reasoning: Option<u64>,
    cache_creation: Option<u64>,
    cache_read: Option<u64>,
    /// Some usage object was seen.
    pub seen: bool,
    /// The provider's last word on usage was seen (final chunk, `message_delta`,
    /// `response.completed`, or a whole JSON body).
    pub final_seen: bool,
}

fn last<T: Copy>(slot: &mut Option<T>, value: Option<T>) {
    if value.is_some() {
        *slot = value;
    }
}

impl Observed {
    pub fn observe(&mut self, w: &WireUsage, is_final: bool) {
        self.seen = true;
        self.final_seen |= is_final;
        last(&mut self.prompt, w.prompt_tokens.or(w.input_tokens));
        last(
            &mut self.completion,
            w.completion_tokens.or(w.output_tokens),
        );
        let details_in = w.prompt_tokens_details.or(w.input_tokens_details);
        let details_out = w.completion_tokens_details.or(w.output_tokens_details);
        last(&mut self.cached, details_in.and_then(|d| d.cached_tokens));
        last(
            &mut self.reasoning,
            details_out.and_then(|d| d.reasoning_tokens),
        );
        last(&mut self.cache_creation, w.cache_creation_input_tokens);
        last(&mut self.cache_read, w.cache_read_input_tokens);
    }

    /// The provider's numbers, normalised: for Anthropic, input is
    /// `input_tokens + cache_creation_input_tokens + cache_read_input_tokens`
    /// and cached input is the cache reads.
    fn provider_usage(&self, family: Family, operation: Operation) -> Usage {
        let (input, cached, written) = match family {
            Family::Anthropic => (
                self.prompt.map(|p| {
                    p.saturating_add(self.cache_creation.unwrap_or(0))
                        .saturating_add(self.cache_read.unwrap_or(0))
                }),
                self.cache_read,
                self.cache_creation,
            ),
            Family::OpenAi | Family::Azure => (self.prompt, self.cached, None),
        };
        // Embeddings produce no output tokens; that zero is a fact, not a guess.
        let output = match operation {
            Operation::Embeddings => self.completion.or(input.map(|_| 0)),
            _ => self.completion,
        };
        Usage {
            input_tokens: input,
            output_tokens: output,
            cached_input_tokens: cached,
            cache_write_input_tokens: written,
            reasoning_tokens: self.reasoning,
            source: UsageSource::Provider,
        }
    }

    /// Decides the usage of a response.
    ///
    /// `complete`: the upstream ended the response normally. `estimate_*`:
    /// token estimates from the text seen, used where the provider said
    /// nothing or could not have said everything (a cut stream).
    pub fn resolve(
        &self,
        family: Family,
        operation: Operation,
        complete: bool,
        estimate_input: Option<u64>,
        estimate_output: Option<u64>,
    ) -> Usage {
        let reported = self.provider_usage(family, operation);
        let exact = self.seen
            && (self.final_seen || complete)
            && reported.input_tokens.is_some()
            && reported.output_tokens.is_some();
        if exact {
            return reported;
        }
        let input = reported.input_tokens.or(estimate_input);
        // A running total from a cut stream is a floor; the text seen may say more.
        let output = match (reported.output_tokens, estimate_output) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        if input.is_none() && output.is_none() {
            return Usage::default();
        }
        Usage {
            input_tokens: input,
            output_tokens: output,
            cached_input_tokens: reported.cached_input_tokens,
            cache_write_input_tokens: reported.cache_write_input_tokens,
            reasoning_tokens: reported.reasoning_tokens,
            source: UsageSource::Estimated,
        }
    }
}

/// Tokens in `bytes` of text, by the usual four-bytes-a-token rule of thumb.
pub fn estimate_tokens(bytes: u64) -> u64 {
    bytes.div_ceil(4)
}

#[cfg(test)]
#[allow(clippy::type_complexity)] // tables of cases read best inline
mod tests {
    use super::*;

    fn wire(json: &str) -> WireUsage {
        serde_json::from_str(json).unwrap()
    }

    fn usage(i: u64, o: u64, c: Option<u64>, r: Option<u64>, s: UsageSource) -> Usage {
        Usage {
            input_tokens: Some(i),
            output_tokens: Some(o),
            cached_input_tokens: c,
            cache_write_input_tokens: None,
            reasoning_tokens: r,
            source: s,
        }
    }

    #[test]
    fn normalises_each_provider() {
        use Family::*;
        use Operation::*;
        use UsageSource::Provider;
        let cases: &[(Family, Operation, &[&str], Usage)] = &[
            (
                OpenAi,
                Chat,
                &[
                    r#"{"prompt_tokens":10,"completion_tokens":5,"total_tokens":15,"prompt_tokens_details":{"cached_tokens":4},"completion_tokens_details":{"reasoning_tokens":2}}"#,
                ],
                usage(10, 5, Some(4), Some(2), Provider),
            ),
            (
                OpenAi,
                Chat,
                &[r#"{"prompt_tokens":10,"completion_tokens":5,"prompt_tokens_details":null}"#],
                usage(10, 5, None, None, Provider),
            ),
            (
                OpenAi,
                Responses,
                &[
                    r#"{"input_tokens":7,"input_tokens_details":{"cached_tokens":1},"output_tokens":3,"output_tokens_details":{"reasoning_tokens":1},"total_tokens":10}"#,
                ],
                usage(7, 3, Some(1), Some(1), Provider),
            ),
            (
                OpenAi,
                Embeddings,
                &[r#"{"prompt_tokens":8,"total_tokens":8}"#],
                usage(8, 0, None, None, Provider),
            ),
            // Anthropic: input is the sum of the three; output from the last message_delta.
            (
                Anthropic,
                Messages,
                &[
                    r#"{"input_tokens":5,"cache_creation_input_tokens":2,"cache_read_input_tokens":3,"output_tokens":1}"#,
                    r#"{"output_tokens":9}"#,
                    r#"{"output_tokens":12}"#,
                ],
                Usage {
                    cache_write_input_tokens: Some(2),
                    ..usage(10, 12, Some(3), None, Provider)
                },
            ),
            // vLLM running totals: the last one wins, never a sum.
            (
                OpenAi,
                Chat,
                &[
                    r#"{"prompt_tokens":4,"completion_tokens":1,"total_tokens":5}"#,
                    r#"{"prompt_tokens":4,"completion_tokens":2,"total_tokens":6}"#,
                    r#"{"prompt_tokens":4,"completion_tokens":3,"total_tokens":7}"#,
                ],
                usage(4, 3, None, None, Provider),
            ),
        ];
        for (family, op, seen, want) in cases {
            let mut o = Observed::default();
            for w in *seen {
                o.observe(&wire(w), false);
            }
            assert_eq!(
                o.resolve(*family, *op, true, Some(99), Some(99)),
                *want,
                "{seen:?}"
            );
        }
    }

    #[test]
    fn resolves_what_can_be_trusted() {
        use UsageSource::{Estimated, Provider};
        let full = r#"{"prompt_tokens":10,"completion_tokens":5}"#;
        let mut final_seen = Observed::default();
        final_seen.observe(&wire(full), true);
        let mut running = Observed::default();
        running.observe(&wire(full), false);
        let nothing = Observed::default();

        let f = Family::OpenAi;
        let op = Operation::Chat;
        // (observed, complete, est in, est out) -> usage
        let cases: &[(&Observed, bool, Option<u64>, Option<u64>, Usage)] = &[
            (
                &final_seen,
                false,
                Some(1),
                Some(1),
                usage(10, 5, None, None, Provider),
            ),
            (
                &running,
                true,
                None,
                None,
                usage(10, 5, None, None, Provider),
            ),
            // Cut after a running total: the text seen says more was produced.
            (
                &running,
                false,
                Some(1),
                Some(8),
                usage(10, 8, None, None, Estimated),
            ),
            (
                &running,
                false,
                Some(1),
                Some(2),
                usage(10, 5, None, None, Estimated),
            ),
            (
                &nothing,
                true,
                Some(3),
                Some(4),
                usage(3, 4, None, None, Estimated),
            ),
            (
                &nothing,
                false,
                Some(3),
                None,
                Usage {
                    input_tokens: Some(3),
                    source: Estimated,
                    ..Usage::default()
                },
            ),
            (&nothing, true, None, None, Usage::default()),
        ];
        for (i, (o, complete, ei, eo, want)) in cases.iter().enumerate() {
            assert_eq!(o.resolve(f, op, *complete, *ei, *eo), *want, "case {i}");
        }
    }

    #[test]
    fn absurd_counts_saturate_instead_of_overflowing() {
        let mut o = Observed::default();
        let max = u64::MAX;
        o.observe(
            &wire(&format!(
                r#"{{"input_tokens":{max},"cache_read_input_tokens":{max},"output_tokens":{max}}}"#
            )),
            true,
        );
        let u = o.resolve(Family::Anthropic, Operation::Messages, true, None, None);
        assert_eq!(u.input_tokens, Some(max));
        assert_eq!(u.total_tokens(), Some(max));
    }

    #[test]
    fn totals_only_when_both_known() {
        let u = usage(3, 4, None, None, UsageSource::Provider);
        assert_eq!(u.total_tokens(), Some(7));
        let half = Usage {
            input_tokens: Some(3),
            ..Usage::default()
        };
        assert_eq!(half.total_tokens(), None);
        assert_eq!(estimate_tokens(0), 0);
        assert_eq!(estimate_tokens(1), 1);
        assert_eq!(estimate_tokens(8), 2);
    }
}
