//! Prompt-injection scoring: weighted phrase rules and a threshold.
//!
//! A single word ("ignore", "previous", "instructions", "system") says
//! nothing; injections are phrases that tell the model to drop what it was
//! told, to become someone else, to reveal its instructions, or to decode and
//! obey hidden text. Each rule is such a phrase with a weight; a text's score
//! is the sum of the weights of the distinct rules it matches, and it is an
//! injection at or above the threshold (default 1.0). Strong phrases weigh
//! 1.0 alone; weaker cues (a persona, "developer mode") need company. The
//! weights were tuned on `testdata/prompts.jsonl`, which has benign texts that
//! use the same words.

use regex::RegexSet;

/// One scoring rule: an id for logs and metrics, a weight, a pattern.
struct Rule {
    id: &'static str,
    weight: f64,
    pattern: &'static str,
}

// Patterns run on NFKC-normalised, whitespace-folded text, case-insensitively.
const RULES: &[Rule] = &[
    // Instruction override: a verb of dropping, then what was said before.
    Rule {
        id: "override",
        weight: 1.0,
        pattern: r"\b(?:ignore|disregard|forget|override|bypass|skip|drop)\b(?:\s+(?:all|any|every|each|of|the|your|my|these|those|its))*\s+(?:previous|prior|above|preceding|earlier|initial|original|system|developer|safety|existing|old)\s+(?:instructions?|prompts?|rules|directions|guidelines|directives|commands|guardrails|restrictions|constraints|programming|context)\b",
    },
    Rule {
        id: "override_everything",
        weight: 1.0,
        pattern: r"\b(?:ignore|disregard|forget)\s+(?:everything|all)\s+(?:you\s+(?:were|have\s+been)\s+told|(?:above|before|so\s+far))\b",
    },
    Rule {
        id: "new_instructions",
        weight: 0.5,
        pattern: r"\b(?:new|updated|real|actual|true)\s+(?:instructions|system\s+prompt|directives?)\s*:",
    },
    Rule {
        id: "instead_do",
        weight: 0.3,
        pattern: r"\b(?:instead|from\s+now\s+on)\b.{0,40}\b(?:you\s+(?:will|must|shall)|only\s+(?:respond|answer|reply|say))\b",
    },
    // Role reassignment.
    Rule {
        id: "role_now",
        weight: 0.6,
        pattern: r"\byou\s+are\s+(?:now|no\s+longer)\b",
    },
    Rule {
        id: "role_unrestricted",
        weight: 1.0,
        pattern: r"\b(?:act|behave|respond|roleplay)\s+as\s+(?:an?\s+)?(?:unrestricted|unfiltered|uncensored|jailbroken|evil|rogue)\b",
    },
    Rule {
        id: "pretend",
        weight: 0.3,
        pattern: r"\bpretend\s+(?:to\s+be|you\s+are|that\s+you)\b",
    },
    // System-prompt extraction.
    Rule {
        id: "extract_prompt",
        weight: 1.0,
        pattern: r"\b(?:reveal|show|print|repeat|output|display|leak|dump|recite|tell\s+me|give\s+me|write\s+out)\b(?:\s+(?:me|us|all|the|your|of|full|entire|exact|verbatim|complete))*\s+(?:(?:system|initial|hidden|secret|original|developer|internal)\s+){1,2}(?:prompt|instructions|message|rules)\b",
    },
    Rule {
        id: "extract_question",
        weight: 1.0,
        pattern: r"\bwhat\s+(?:is|are|was|were)\s+your\s+(?:system\s+prompt|initial\s+instructions|hidden\s+instructions|original\s+instructions)\b",
    },
    Rule {
        id: "words_above",
        weight: 1.0,
        pattern: r"\brepeat\s+(?:the\s+)?(?:words|text)\s+above\b",
    },
    // Jailbreak personas and modes.
    Rule {
        id: "dan",
        weight: 1.0,
        pattern: r"\bdo\s+anything\s+now\b",
    },
    Rule {
        id: "mode",
        weight: 0.5,
        pattern: r"\b(?:developer|god|jailbreak|unrestricted|dan|evil)\s+mode\b(?:\s+(?:enabled|activated|on))?",
    },
    Rule {
        id: "no_limits",
        weight: 0.5,
        pattern: r"\b(?:no|without(?:\s+any)?)\s+(?:ethical|moral|content|safety)\s+(?:guidelines|restrictions|constraints|filters|limits|policies)\b",
    },
    Rule {
        id: "jailbreak_word",
        weight: 0.4,
        pattern: r"\bjailbr(?:eak|oken)\b",
    },
    // Encoded-instruction cues.
    Rule {
        id: "decode_and_obey",
        weight: 1.0,
        pattern: r"\b(?:decode|decrypt|translate|deobfuscate)\b.{0,60}\b(?:and|then)\s+(?:follow|execute|obey|run|do\s+what|carry\s+out)\b",
    },
    Rule {
        id: "obey_hidden",
        weight: 1.0,
        pattern: r"\b(?:follow|execute|obey)\s+(?:the\s+)?(?:hidden|encoded|decoded|embedded|secret)\s+(?:instructions?|commands?|text|message)\b",
    },
    // Chat-template delimiters smuggled into text.
    Rule {
        id: "delimiter",
        weight: 0.6,
        pattern: r"<\|im_start\|>|<\|im_end\|>|\[/?INST\]|<</?SYS>>|<\|(?:system|assistant)\|>|(?m:^)\s*###\s*(?:system|instruction)s?\s*:",
    },
    Rule {
        id: "end_of_prompt",
        weight: 0.5,
        pattern: r"\b(?:end\s+of\s+(?:the\s+)?(?:system\s+)?prompt|system\s+override|admin\s+override)\b",
    },
];

/// The compiled rules and the threshold.
#[derive(Debug)]
pub struct Injection {
    /// Every rule in one automaton: one pass over the text finds them all.
    set: RegexSet,
    pub threshold: f64,
}

/// A text's score and the rules that made it.
#[derive(Debug, Default, PartialEq)]
pub struct Score {
    pub score: f64,
    pub rules: Vec<&'static str>,
}

impl Injection {
    pub fn new(threshold: f64) -> Result<Injection, String> {
        let set = RegexSet::new(RULES.iter().map(|r| format!("(?i){}", r.pattern)))
            .map_err(|e| format!("rules: {e}"))?;
        Ok(Injection { set, threshold })
    }

    /// Scores a normalised text.
    pub fn score(&self, text: &str) -> Score {
        let mut s = Score::default();
        for i in self.set.matches(text).iter() {
            if let Some(r) = RULES.get(i) {
                s.score += r.weight;
                s.rules.push(r.id);
            }
        }
        s
    }

    pub fn is_injection(&self, s: &Score) -> bool {
        s.score + 1e-9 >= self.threshold
    }
}
