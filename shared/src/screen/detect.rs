//! The pattern detectors (PII, secrets, the deny list) and the scan that
//! applies them, to a whole text or to the growing tail of a stream.
//!
//! Each detector is a regex compiled once at config load, plus a check the
//! regex cannot express (Luhn for cards, mod-97 for IBANs, the invalid SSN
//! ranges, a parse for IPv6). The scan is greedy and left to right: at each
//! position the earliest match of any detector wins (ties: the longer, then
//! the first detector), and scanning goes on after it. That rule depends only
//! on the text from the position on, which is what lets a stream be scanned
//! piece by piece with the same result as the whole text.
//!
//! For a stream, the scan also asks which positions of the tail could still
//! start a match if more text came: the lazy DFA behind each regex is run
//! anchored from each position, and a position whose run has not died by the
//! end of the text is *live*. Text before the first live position is final
//! and can be released; only the live tail is held back. Nothing is held
//! because of a fixed window size, and a value split across any number of
//! pieces is still seen whole.

use regex::{Regex, RegexSet};
use regex_automata::hybrid::dfa::{Cache, DFA};
use regex_automata::{Anchored, Input, MatchKind};
use std::cell::RefCell;
use std::net::Ipv6Addr;

/// What a detector does with what it finds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Refuse the request (or end the answer) with a content_filter error.
    Block,
    /// Replace the value with a placeholder.
    Redact,
    /// Only count it (shadow mode).
    Log,
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Action::Block => "block",
            Action::Redact => "redact",
            Action::Log => "log",
        }
    }
}

/// The built-in detectors, and the deny list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Email,
    Phone,
    CreditCard,
    UsSsn,
    Iban,
    IpAddress,
    AnthropicKey,
    OpenaiKey,
    AwsAccessKey,
    GithubToken,
    SlackToken,
    Jwt,
    PrivateKey,
    PasswordAssignment,
    DenyList,
}

/// Which group of the configuration a detector belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Group {
    Pii,
    Secrets,
    Deny,
}

pub const PII: &[Kind] = &[
    Kind::Email,
    Kind::Phone,
    Kind::CreditCard,
    Kind::UsSsn,
    Kind::Iban,
    Kind::IpAddress,
];

pub const SECRETS: &[Kind] = &[
    Kind::AnthropicKey,
    Kind::OpenaiKey,
    Kind::AwsAccessKey,
    Kind::GithubToken,
    Kind::SlackToken,
    Kind::Jwt,
    Kind::PrivateKey,
    Kind::PasswordAssignment,
];

// Patterns are ASCII (`(?-u)`): the values they find are ASCII, and ASCII
// word boundaries keep the lazy DFA exact on any text.
// Patterns that can start at any word character are bounded (as the RFCs
// bound addresses), so that checking which tail positions are live costs a
// bounded run per position.
const EMAIL: &str = r"(?i-u)\b[a-z0-9][a-z0-9._%+\-]{0,63}@[a-z0-9](?:[a-z0-9\-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9\-]{0,61}[a-z0-9])?){0,8}\.[a-z]{2,24}\b";
const PHONE: &str = r"(?-u)\+[1-9][0-9]{0,3}(?:[ .\-]?\(?[0-9]{1,4}\)?){2,6}\b|\([0-9]{3}\)[ .\-]?[0-9]{3}[ .\-][0-9]{4}\b|\b[0-9]{3}[.\-][0-9]{3}[.\-][0-9]{4}\b|\b[0-9]{3} [0-9]{3} [0-9]{4}\b|\b0[1-9][0-9]{0,3}(?:[ .\-][0-9]{2,8}){1,4}\b";
const CARD: &str = r"(?-u)\b[2-6](?:[ \-]?[0-9]){12,18}\b";
const SSN: &str = r"(?-u)\b[0-9]{3}-[0-9]{2}-[0-9]{4}\b|\b[0-9]{3} [0-9]{2} [0-9]{4}\b";
const IBAN: &str = r"(?-u)\b[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b";
const IP: &str = r"(?i-u)\b(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])(?:\.(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])){3}(?:\.[0-9]{1,10}){0,8}\b|(?:\b[0-9a-f]{1,4}|:):(?:[0-9a-f]{0,4}:){1,6}[0-9a-f]{0,4}\b";
const ANTHROPIC_KEY: &str = r"(?-u)\bsk-ant-[A-Za-z0-9_\-]{20,}";
const OPENAI_KEY: &str = r"(?-u)\bsk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_\-]{20,}";
const AWS_KEY: &str = r"(?-u)\b(?:AKIA|ASIA)[0-9A-Z]{16}\b";
const GITHUB_TOKEN: &str =
    r"(?-u)\b(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{36,255}\b|\bgithub_pat_[A-Za-z0-9_]{22,255}\b";
const SLACK_TOKEN: &str = r"(?-u)\bxox[abposr]-[0-9A-Za-z]+(?:-[0-9A-Za-z]+){1,4}\b|\bxapp-[0-9]-[A-Za-z0-9\-]{10,}\b|https://hooks\.slack\.com/services/[A-Za-z0-9_/]{20,}";
const JWT: &str = r"(?-u)\beyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]*";
const PRIVATE_KEY: &str = r"(?-u)-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----[\x00-\x7f]*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----";
const PASSWORD: &str = r#"(?i-u)\b(?:[a-z0-9]{1,32}_){0,4}(?:password|passwd|pwd|passphrase|secret|client[_\-]?secret|api[_\-]?key|access[_\-]?token|auth[_\-]?token|secret[_\-]?key)["']?[ ]?[:=][ ]?["']?(?P<v>[!#-&(-+\--:<-_a-~]{6,128})"#;

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Email => "email",
            Kind::Phone => "phone",
            Kind::CreditCard => "credit_card",
            Kind::UsSsn => "us_ssn",
            Kind::Iban => "iban",
            Kind::IpAddress => "ip_address",
            Kind::AnthropicKey => "anthropic_key",
            Kind::OpenaiKey => "openai_key",
            Kind::AwsAccessKey => "aws_access_key",
            Kind::GithubToken => "github_token",
            Kind::SlackToken => "slack_token",
            Kind::Jwt => "jwt",
            Kind::PrivateKey => "private_key",
            Kind::PasswordAssignment => "password_assignment",
            Kind::DenyList => "deny_list",
        }
    }

    pub fn from_name(name: &str) -> Option<Kind> {
        PII.iter()
            .chain(SECRETS)
            .copied()
            .find(|k| k.name() == name)
    }

    pub fn group(self) -> Group {
        if PII.contains(&self) {
            Group::Pii
        } else if self == Kind::DenyList {
            Group::Deny
        } else {
            Group::Secrets
        }
    }

    /// The typed placeholder a redacted value becomes.
    pub fn placeholder(self) -> &'static str {
        match self {
            Kind::Email => "EMAIL",
            Kind::Phone => "PHONE",
            Kind::CreditCard => "CREDIT_CARD",
            Kind::UsSsn => "US_SSN",
            Kind::Iban => "IBAN",
            Kind::IpAddress => "IP_ADDRESS",
            Kind::AnthropicKey | Kind::OpenaiKey | Kind::GithubToken | Kind::SlackToken => {
                "API_KEY"
            }
            Kind::AwsAccessKey => "AWS_ACCESS_KEY",
            Kind::Jwt => "JWT",
            Kind::PrivateKey => "PRIVATE_KEY",
            Kind::PasswordAssignment => "SECRET",
            Kind::DenyList => "DENIED",
        }
    }

    fn pattern(self) -> &'static str {
        match self {
            Kind::Email => EMAIL,
            Kind::Phone => PHONE,
            Kind::CreditCard => CARD,
            Kind::UsSsn => SSN,
            Kind::Iban => IBAN,
            Kind::IpAddress => IP,
            Kind::AnthropicKey => ANTHROPIC_KEY,
            Kind::OpenaiKey => OPENAI_KEY,
            Kind::AwsAccessKey => AWS_KEY,
            Kind::GithubToken => GITHUB_TOKEN,
            Kind::SlackToken => SLACK_TOKEN,
            Kind::Jwt => JWT,
            Kind::PrivateKey => PRIVATE_KEY,
            Kind::PasswordAssignment => PASSWORD,
            Kind::DenyList => "",
        }
    }

    /// Checks a regex match the regex alone cannot; the span to report, or
    /// `None` to reject it. Looks only at the match and the one character
    /// before it, so the answer does not depend on text still to come.
    fn validate(self, text: &str, start: usize, end: usize) -> Option<(usize, usize)> {
        let m = &text[start..end];
        let before = text[..start].chars().next_back();
        match self {
            Kind::CreditCard => card(m).map(|len| (start, start + len)),
            Kind::UsSsn => ssn(m).then_some((start, end)),
            Kind::Iban => iban(m).then_some((start, end)),
            Kind::Phone => phone(m).then_some((start, end)),
            Kind::IpAddress => {
                let dotted_before = before == Some('.') || before == Some(':');
                (!dotted_before && ip(m)).then_some((start, end))
            }
            Kind::PasswordAssignment => secret_value(m).then_some((start, end)),
            _ => Some((start, end)),
        }
    }
}

fn digits(s: &str) -> Vec<u8> {
    s.bytes()
        .filter(u8::is_ascii_digit)
        .map(|b| b - b'0')
        .collect()
}

pub fn luhn(d: &[u8]) -> bool {
    let mut sum = 0u32;
    for (i, &x) in d.iter().rev().enumerate() {
        let mut x = u32::from(x);
        if i % 2 == 1 {
            x *= 2;
            if x > 9 {
                x -= 9;
            }
        }
        sum += x;
    }
    sum % 10 == 0
}

/// A card number is 13-19 digits with a valid Luhn check, separated
/// consistently; a longer run may be a card followed by more digits (a
/// CVV), so prefixes that end at a separator are tried, longest first.
/// Returns the byte length of the card.
fn card(m: &str) -> Option<usize> {
    let seps: Vec<usize> = m
        .bytes()
        .enumerate()
        .filter(|(_, b)| !b.is_ascii_digit())
        .map(|(i, _)| i)
        .collect();
    let mut ends: Vec<usize> = seps.clone();
    ends.push(m.len());
    for &end in ends.iter().rev() {
        let d = digits(&m[..end]);
        if (13..=19).contains(&d.len()) && luhn(&d) {
            let sep_kinds: Vec<u8> = m.as_bytes()[..end]
                .iter()
                .filter(|b| !b.is_ascii_digit())
                .copied()
                .collect();
            if sep_kinds.windows(2).all(|w| w[0] == w[1]) {
                return Some(end);
            }
        }
    }
    None
}

fn ssn(m: &str) -> bool {
    let d = digits(m);
    if d.len() != 9 {
        return false;
    }
    let area = u32::from(d[0]) * 100 + u32::from(d[1]) * 10 + u32::from(d[2]);
    let group = u32::from(d[3]) * 10 + u32::from(d[4]);
    let serial = d[5..].iter().fold(0u32, |a, &x| a * 10 + u32::from(x));
    area != 0 && area != 666 && area < 900 && group != 0 && serial != 0
}

fn iban(m: &str) -> bool {
    let s: Vec<u8> = m.bytes().filter(|b| *b != b' ').collect();
    if !(15..=34).contains(&s.len()) {
        return false;
    }
    let (head, tail) = s.split_at(4);
    let mut rem = 0u32;
    for &b in tail.iter().chain(head) {
        let v = match b {
            b'0'..=b'9' => u32::from(b - b'0'),
            b'A'..=b'Z' => u32::from(b - b'A') + 10,
            _ => return false,
        };
        rem = if v >= 10 {
            (rem * 100 + v) % 97
        } else {
            (rem * 10 + v) % 97
        };
    }
    rem == 1
}

fn phone(m: &str) -> bool {
    let n = digits(m).len();
    if m.starts_with('+') {
        (8..=15).contains(&n)
    } else if m.starts_with('0') {
        (9..=12).contains(&n)
    } else {
        n == 10
    }
}

fn ip(m: &str) -> bool {
    if m.contains(':') {
        let hex = m.bytes().filter(u8::is_ascii_hexdigit).count();
        return hex >= 3 && m.parse::<Ipv6Addr>().is_ok();
    }
    m.split('.').count() == 4
}

/// The value of a `password=` assignment looks like a secret, not a word of
/// prose or a placeholder: it has a digit, a symbol or mixed case, and is
/// not a template reference or an already redacted value.
fn secret_value(m: &str) -> bool {
    let v = m
        .rsplit(['=', ':'])
        .next()
        .unwrap_or("")
        .trim_start_matches([' ', '"', '\'']);
    if v.starts_with(['$', '<', '{', '[', '*', '%']) || v.chars().all(|c| c == 'x' || c == '*') {
        return false;
    }
    // A value a specific detector knows is left to it (`OPENAI_API_KEY=sk-...`
    // is an OpenAI key, with its own placeholder).
    if [
        "sk-",
        "AKIA",
        "ASIA",
        "ghp_",
        "gho_",
        "ghs_",
        "github_pat_",
        "xox",
        "eyJ",
    ]
    .iter()
    .any(|p| v.starts_with(p))
    {
        return false;
    }
    let digit = v.bytes().any(|b| b.is_ascii_digit());
    let symbol = v.bytes().any(|b| !b.is_ascii_alphanumeric());
    let upper = v.bytes().any(|b| b.is_ascii_uppercase());
    let lower = v.bytes().any(|b| b.is_ascii_lowercase());
    digit || symbol || (upper && lower)
}

/// Values a detector lets through: exact values (case-insensitive), e-mail
/// domains written `@example.com` (subdomains included), and regexes that
/// must match the whole value.
#[derive(Debug, Default)]
pub struct Allow {
    values: Vec<String>,
    domains: Vec<String>,
    patterns: Vec<Regex>,
}

impl Allow {
    pub fn compile(field: &str, entries: &[String]) -> Result<Allow, String> {
        let mut a = Allow::default();
        for (i, e) in entries.iter().enumerate() {
            if e.is_empty() {
                return Err(format!("{field}[{i}]: an empty entry would allow nothing"));
            }
            if let Some(d) = e.strip_prefix('@') {
                a.domains.push(d.to_ascii_lowercase());
            } else if let Some(p) = e.strip_prefix("re:") {
                let r = Regex::new(&format!("^(?:{p})$"))
                    .map_err(|err| format!("{field}[{i}]: bad regex: {err}"))?;
                a.patterns.push(r);
            } else {
                a.values.push(e.to_lowercase());
            }
        }
        Ok(a)
    }

    pub fn allows(&self, value: &str) -> bool {
        let lower = value.to_lowercase();
        if self.values.contains(&lower) {
            return true;
        }
        if let Some((_, domain)) = lower.rsplit_once('@') {
            if self
                .domains
                .iter()
                .any(|d| domain == d || domain.ends_with(&format!(".{d}")))
            {
                return true;
            }
        }
        self.patterns.iter().any(|p| p.is_match(value))
    }
}

/// One compiled detector.
#[derive(Debug)]
pub struct Detector {
    pub kind: Kind,
    pub action: Action,
    regex: Regex,
    allow: Allow,
    /// The regex has a `v` group: only that part is redacted.
    value_group: bool,
}

impl Detector {
    pub fn builtin(kind: Kind, action: Action, allow: Allow) -> Result<Detector, String> {
        Detector::new(kind, action, kind.pattern(), allow)
    }

    pub fn new(
        kind: Kind,
        action: Action,
        pattern: &str,
        allow: Allow,
    ) -> Result<Detector, String> {
        let regex = Regex::new(pattern).map_err(|e| e.to_string())?;
        Ok(Detector {
            kind,
            action,
            value_group: regex.capture_names().any(|n| n == Some("v")),
            regex,
            allow,
        })
    }

    /// The next accepted match at or after `from`: where it starts and
    /// ends (scanning resumes at the end), and the span to report.
    fn next(&self, text: &str, mut from: usize) -> Option<Match> {
        while from <= text.len() {
            let (start, end, value) = if self.value_group {
                let caps = self.regex.captures_at(text, from)?;
                let m = caps.get(0)?;
                let v = caps.name("v").unwrap_or(m);
                (m.start(), m.end(), Some((v.start(), v.end())))
            } else {
                let m = self.regex.find_at(text, from)?;
                (m.start(), m.end(), None)
            };
            if let Some((s, e)) = self.kind.validate(text, start, end) {
                return Some(Match {
                    start: s,
                    end: e,
                    value: value.unwrap_or((s, e)),
                });
            }
            from = next_char(text, start);
        }
        None
    }
}

/// Whether a match could start at `at` and go past the end of `text`: the
/// anchored run from `at` is still alive at the end. A run still alive
/// after `cap` bytes counts as live.
fn live_at(dfa: &DFA, cache: &mut Cache, text: &str, at: usize, cap: usize) -> bool {
    let input = Input::new(text).range(at..).anchored(Anchored::Yes);
    let Ok(mut sid) = dfa.start_state_forward(cache, &input) else {
        return true;
    };
    if sid.is_dead() {
        return false;
    }
    let bytes = &text.as_bytes()[at..];
    if bytes.len() > cap {
        return true;
    }
    for &b in bytes {
        match dfa.next_state(cache, sid, b) {
            Ok(next) => sid = next,
            Err(_) => return true,
        }
        if sid.is_dead() {
            return false;
        }
        if sid.is_quit() {
            return true;
        }
    }
    true
}

fn next_char(text: &str, at: usize) -> usize {
    text[at..]
        .chars()
        .next()
        .map_or(text.len() + 1, |c| at + c.len_utf8())
}

/// A match a detector accepted.
#[derive(Clone, Copy, Debug)]
struct Match {
    start: usize,
    end: usize,
    /// The part reported and redacted.
    value: (usize, usize),
}

/// A value found: which detector, and its span in the scanned text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Found {
    pub detector: usize,
    pub start: usize,
    pub end: usize,
}

/// What a scan found, and how far the text is final.
#[derive(Debug, Default)]
pub struct Scan {
    pub found: Vec<Found>,
    /// Text before this offset can be released; after it, a match may still
    /// start (always the end of the text for a final scan).
    pub safe: usize,
}

/// The detectors of one configuration, in precedence order.
#[derive(Debug, Default)]
pub struct Scanner {
    pub detectors: Vec<Detector>,
    /// All the patterns in one automaton: one pass over a text says which
    /// detectors can match at all, so a clean text costs one scan, not one
    /// per detector.
    set: Option<RegexSet>,
    /// All the patterns in one lazy DFA that reports every pattern (not the
    /// leftmost-first one), run anchored from a tail position: its run dies
    /// only when no detector can match from there. `None` when the patterns
    /// do not fit one DFA; then every tail position counts as live (held up
    /// to the bound).
    live: Option<(DFA, RefCell<Cache>)>,
}

/// Room the lazy DFA of the live check may use for its states; past it the
/// cache is cleared and rebuilt, so memory stays bounded.
const DFA_CACHE_BYTES: usize = 512 * 1024;

impl Scanner {
    pub fn new(detectors: Vec<Detector>) -> Scanner {
        let patterns: Vec<&str> = detectors.iter().map(|d| d.regex.as_str()).collect();
        let set = RegexSet::new(&patterns).ok();
        let live = DFA::builder()
            .configure(
                DFA::config()
                    .match_kind(MatchKind::All)
                    .cache_capacity(DFA_CACHE_BYTES)
                    .unicode_word_boundary(true),
            )
            .build_many(&patterns)
            .ok()
            .map(|dfa| {
                let cache = dfa.create_cache();
                (dfa, RefCell::new(cache))
            });
        Scanner {
            detectors,
            set,
            live,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.detectors.is_empty()
    }

    /// Scans `text` from `from`. With `final_text` the text is complete;
    /// otherwise more may follow, and the scan stops before the first
    /// position that could still start a match.
    pub fn scan(&self, text: &str, from: usize, final_text: bool) -> Scan {
        self.scan_held(text, from, final_text, usize::MAX)
    }

    /// As [`Scanner::scan`], for a stream that holds at most `max_hold`
    /// bytes: positions further back are released anyway, so they are not
    /// checked.
    pub fn scan_held(&self, text: &str, from: usize, final_text: bool, max_hold: usize) -> Scan {
        let mut found = Vec::new();
        // The common text matches nothing: one forward scan says so, cheaper
        // than the overlapping scan that says which detectors may match.
        if self
            .set
            .as_ref()
            .is_some_and(|set| !set.is_match_at(text, from))
        {
            let safe = if final_text {
                text.len()
            } else {
                self.first_live(
                    text,
                    from.max(text.len().saturating_sub(max_hold)),
                    max_hold,
                )
            };
            return Scan { found, safe };
        }
        let mut p = from;
        // Each detector's next match at or after p, found once and reused
        // until p passes its start.
        let mut next: Vec<Option<Option<Match>>> = vec![None; self.detectors.len()];
        if let Some(set) = &self.set {
            let may = set.matches_at(text, from);
            for (i, n) in next.iter_mut().enumerate() {
                if !may.matched(i) {
                    *n = Some(None);
                }
            }
        }
        let mut live: Option<usize> = None;
        loop {
            let mut best: Option<(Match, usize)> = None;
            for (i, d) in self.detectors.iter().enumerate() {
                let stale = match &next[i] {
                    None => true,
                    Some(Some(m)) => m.start < p,
                    Some(None) => false,
                };
                if stale {
                    next[i] = Some(d.next(text, p));
                }
                let Some(Some(m)) = next[i] else { continue };
                let better = match &best {
                    None => true,
                    Some((b, _)) => m.start < b.start || (m.start == b.start && m.end > b.end),
                };
                if better {
                    best = Some((m, i));
                }
            }
            if !final_text {
                let l = match live {
                    Some(l) if l >= p => l,
                    _ => {
                        self.first_live(text, p.max(text.len().saturating_sub(max_hold)), max_hold)
                    }
                };
                live = Some(l);
                if best.as_ref().is_none_or(|(m, _)| m.start >= l) {
                    return Scan { found, safe: l };
                }
            }
            let Some((m, i)) = best else {
                return Scan {
                    found,
                    safe: text.len(),
                };
            };
            let (vs, ve) = m.value;
            if !self.detectors[i].allow.allows(&text[vs..ve]) {
                found.push(Found {
                    detector: i,
                    start: vs,
                    end: ve,
                });
            }
            p = if m.end > m.start {
                m.end
            } else {
                next_char(text, m.start)
            };
            if p > text.len() {
                return Scan {
                    found,
                    safe: text.len(),
                };
            }
        }
    }

    /// The first position at or after `from` where a match could still start.
    fn first_live(&self, text: &str, from: usize, cap: usize) -> usize {
        let Some((dfa, cache)) = &self.live else {
            return from;
        };
        let Ok(mut cache) = cache.try_borrow_mut() else {
            return from;
        };
        let mut at = from;
        while at < text.len() {
            if text.is_char_boundary(at) && live_at(dfa, &mut cache, text, at, cap) {
                return at;
            }
            at += 1;
        }
        text.len()
    }
}
