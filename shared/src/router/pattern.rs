//! Name patterns for models, consumers and header values: `gpt-4o` (exact),
//! `gpt-4o*` (prefix), `claude-*-sonnet` or `llama-3.?-*` (glob: `*` any run,
//! `?` one character), `*` (anything present). Compiled once at load; the
//! common forms (exact, prefix) never run the glob matcher.

use crate::config::ConfigError;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pattern {
    Any,
    Exact(String),
    Prefix(String),
    Glob(Vec<char>),
}

impl Pattern {
    pub fn compile(field: &str, p: &str) -> Result<Pattern, ConfigError> {
        if p.is_empty() || p.len() > 256 {
            return Err(ConfigError::new(
                field,
                format!("{p:?}: a pattern is 1 to 256 characters"),
            ));
        }
        if p == "*" {
            return Ok(Pattern::Any);
        }
        let wild = |c: char| c == '*' || c == '?';
        Ok(match p.strip_suffix('*') {
            Some(head) if !head.contains(wild) => Pattern::Prefix(head.to_string()),
            _ if p.contains(wild) => Pattern::Glob(p.chars().collect()),
            _ => Pattern::Exact(p.to_string()),
        })
    }

    pub fn matches(&self, v: &str) -> bool {
        match self {
            Pattern::Any => true,
            Pattern::Exact(e) => e == v,
            Pattern::Prefix(p) => v.starts_with(p.as_str()),
            Pattern::Glob(g) => glob(g, v),
        }
    }
}

/// Iterative glob with one backtrack point: linear in practice, never
/// exponential, whatever the pattern.
fn glob(p: &[char], v: &str) -> bool {
    let v: Vec<char> = v.chars().collect();
    let (mut pi, mut vi) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while vi < v.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, vi));
                pi += 1;
            }
            Some(c) if *c == '?' || *c == v[vi] => {
                pi += 1;
                vi += 1;
            }
            _ => match star {
                Some((sp, sv)) => {
                    pi = sp + 1;
                    vi = sv + 1;
                    star = Some((sp, sv + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_as_documented() {
        let cases: &[(&str, &str, bool)] = &[
            ("gpt-4o", "gpt-4o", true),
            ("gpt-4o", "gpt-4o-mini", false),
            ("gpt-4o*", "gpt-4o-mini", true),
            ("gpt-4o*", "gpt-4", false),
            ("claude-*-sonnet", "claude-3-5-sonnet", true),
            ("claude-*-sonnet", "claude-3-5-haiku", false),
            ("llama-3.?-*", "llama-3.1-8b", true),
            ("llama-3.?-*", "llama-3.10-8b", false),
            ("*", "", true),
            ("*mini", "gpt-4o-mini", true),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
        ];
        for (p, v, want) in cases {
            let pat = Pattern::compile("f", p).unwrap();
            assert_eq!(pat.matches(v), *want, "{p} ~ {v}");
        }
        assert!(matches!(
            Pattern::compile("f", "gpt*").unwrap(),
            Pattern::Prefix(_)
        ));
        assert!(Pattern::compile("f", "").is_err());
    }
}
