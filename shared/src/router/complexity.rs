//! The complexity score behind the `auto` model: a sum of a few visible
//! parts, each capped, so that a team reading `route_score` in its access
//! log can say why a request went where it went and move a tier threshold
//! with confidence. No model, no hidden state: the same request always
//! scores the same.
//!
//! | part | points (defaults) |
//! |---|---|
//! | length | 1 per 100 estimated prompt tokens, at most 40 |
//! | depth | 5 per user turn after the first, at most 20 |
//! | code | 15 if the conversation carries code (a fence, `def `, `fn `, `class `, ...) |
//! | tools | 10 if the request offers tools |
//! | reasoning | 10 per distinct reasoning cue in the last user message ("step by step", "analyze", "prove", ...), at most 30 |
//! | output | 10 if the request asks for at least 2000 output tokens |

use super::body::Shape;
use crate::config::ConfigError;
use serde::Deserialize;

/// The score's weights as written; every one has the default above.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Weights {
    pub tokens_per_point: u64,
    pub length_max: u32,
    pub turn_points: u32,
    pub depth_max: u32,
    pub code_points: u32,
    pub tools_points: u32,
    pub cue_points: u32,
    pub cue_max: u32,
    pub long_output_tokens: u64,
    pub output_points: u32,
}

impl Default for Weights {
    fn default() -> Self {
        Weights {
            tokens_per_point: 100,
            length_max: 40,
            turn_points: 5,
            depth_max: 20,
            code_points: 15,
            tools_points: 10,
            cue_points: 10,
            cue_max: 30,
            long_output_tokens: 2000,
            output_points: 10,
        }
    }
}

pub const DEFAULT_CUES: &[&str] = &[
    "step by step",
    "step-by-step",
    "analyze",
    "analyse",
    "analysis",
    "reason",
    "prove",
    "proof",
    "derive",
    "compare",
    "trade-off",
    "tradeoff",
    "evaluate",
    "design",
    "architecture",
    "plan",
    "why",
    "explain in detail",
    "think",
];

#[derive(Clone, Debug)]
pub struct ScoreConfig {
    weights: Weights,
    /// Lower-cased cues.
    cues: Vec<String>,
}

impl ScoreConfig {
    pub fn compile(
        weights: Weights,
        cues: Option<Vec<String>>,
    ) -> Result<ScoreConfig, ConfigError> {
        if weights.tokens_per_point == 0 {
            return Err(ConfigError::new(
                "auto.weights.tokens_per_point",
                "must be at least 1",
            ));
        }
        let cues = match cues {
            Some(c) => {
                if c.iter().any(|c| c.trim().is_empty()) {
                    return Err(ConfigError::new("auto.reasoning_cues", "a cue is empty"));
                }
                c
            }
            None => DEFAULT_CUES.iter().map(|s| s.to_string()).collect(),
        };
        Ok(ScoreConfig {
            weights,
            cues: cues.iter().map(|c| c.to_lowercase()).collect(),
        })
    }
}

/// One request's score, part by part.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Score {
    pub length: u32,
    pub depth: u32,
    pub code: u32,
    pub tools: u32,
    pub reasoning: u32,
    pub output: u32,
}

impl Score {
    pub fn total(&self) -> u32 {
        self.length + self.depth + self.code + self.tools + self.reasoning + self.output
    }
}

/// Scores a request from its estimated prompt tokens and its shape.
pub fn score(c: &ScoreConfig, prompt_tokens: u64, shape: &Shape) -> Score {
    let w = &c.weights;
    let length = u32::try_from(prompt_tokens / w.tokens_per_point)
        .unwrap_or(u32::MAX)
        .min(w.length_max);
    let depth = shape
        .user_turns
        .saturating_sub(1)
        .saturating_mul(w.turn_points)
        .min(w.depth_max);
    let last = shape.last_user.to_lowercase();
    let cues = c
        .cues
        .iter()
        .filter(|cue| contains_word(&last, cue))
        .count();
    let reasoning = u32::try_from(cues)
        .unwrap_or(u32::MAX)
        .saturating_mul(w.cue_points)
        .min(w.cue_max);
    Score {
        length,
        depth,
        code: if shape.code { w.code_points } else { 0 },
        tools: if shape.tools { w.tools_points } else { 0 },
        reasoning,
        output: if shape.max_tokens.is_some_and(|m| m >= w.long_output_tokens) {
            w.output_points
        } else {
            0
        },
    }
}

/// `needle` in `hay` starting at a word boundary ("plan" in "plan this",
/// "planning", not in "explanation").
fn contains_word(hay: &str, needle: &str) -> bool {
    hay.match_indices(needle).any(|(i, _)| {
        hay[..i]
            .chars()
            .next_back()
            .is_none_or(|c| !c.is_alphanumeric())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ScoreConfig {
        ScoreConfig::compile(Weights::default(), None).unwrap()
    }

    #[test]
    fn each_part_counts_as_documented() {
        let short = Shape {
            messages: 1,
            user_turns: 1,
            last_user: "What is the capital of France?".into(),
            ..Shape::default()
        };
        assert_eq!(score(&cfg(), 8, &short).total(), 0);

        let long = Shape {
            messages: 5,
            user_turns: 3,
            last_user: "Analyze the trade-offs step by step and explain WHY.".into(),
            code: true,
            tools: true,
            max_tokens: Some(4000),
            ..Shape::default()
        };
        let s = score(&cfg(), 2_550, &long);
        assert_eq!(
            s,
            Score {
                length: 25,
                depth: 10,
                code: 15,
                tools: 10,
                // analyze, trade-off, step by step, why: 4 cues, capped at 30.
                reasoning: 30,
                output: 10,
            }
        );
        assert_eq!(s.total(), 100);
        assert_eq!(score(&cfg(), 1_000_000, &Shape::default()).length, 40);
    }

    #[test]
    fn cues_start_at_word_boundaries() {
        assert!(contains_word("plan this", "plan"));
        assert!(contains_word("re-plan", "plan"));
        assert!(!contains_word("explanation", "plan"));
        assert!(!contains_word("", "plan"));
    }
}
