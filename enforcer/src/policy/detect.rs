//! Secret and PII detectors: a cheap keyword prefilter, then a regex, then an optional validator (Luhn for card
//! numbers). Built-in detectors cover common API keys, private keys, e-mail addresses and card numbers; a policy may
//! add its own under `detectors:`. Used by `detect:` conditions and by the constrain stage's redaction.
//!
//! A detector of a provider's API key knows its provider (`openai-key`: `openai`, `anthropic-key`: `anthropic`; a
//! policy's own detector may name one): that key in a credential header ([`CREDENTIAL_HEADERS`]) of a request to
//! that provider's API is the agent authenticating, not a secret leaving — see [`Detectors::own_credential`].

use std::ops::Range;

use regex::Regex;

use crate::glob::Glob;

#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    #[error("invalid regex: {0}")]
    Regex(#[from] regex::Error),
    #[error("detector `{0}` is built in; choose another name")]
    Builtin(String),
    #[error("unknown validator `{0}`, expected `luhn`")]
    Validator(String),
}

/// A check that a regex match really is what it looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validator {
    Luhn,
}

impl Validator {
    pub fn parse(name: &str) -> Result<Validator, DetectError> {
        match name {
            "luhn" => Ok(Validator::Luhn),
            other => Err(DetectError::Validator(other.to_owned())),
        }
    }

    fn accepts(self, text: &str) -> bool {
        match self {
            Validator::Luhn => luhn(text),
        }
    }
}

/// The keyword prefilter: a plain substring search for one keyword, an alternation of literals for several (the
/// regex engine turns it into a SIMD multi-literal search).
#[derive(Debug, Clone)]
enum Prefilter {
    None,
    One(String),
    Many(Regex),
}

impl Prefilter {
    fn new(keywords: Vec<String>) -> Prefilter {
        match keywords.len() {
            0 => Prefilter::None,
            1 => Prefilter::One(keywords.into_iter().next().unwrap_or_default()),
            _ => {
                let alternation: Vec<String> = keywords.iter().map(|k| regex::escape(k)).collect();
                match Regex::new(&alternation.join("|")) {
                    Ok(re) => Prefilter::Many(re),
                    // Too many or too long keywords to compile: run the detector's regex unfiltered.
                    Err(_) => Prefilter::None,
                }
            }
        }
    }

    fn passes(&self, text: &str) -> bool {
        match self {
            Prefilter::None => true,
            Prefilter::One(k) => text.contains(k.as_str()),
            Prefilter::Many(re) => re.is_match(text),
        }
    }
}

/// The request header fields that carry a client's credentials to the server it talks to (RFC 9110 §11.6.2
/// `Authorization`; Anthropic `x-api-key`, Gemini `x-goog-api-key`, Azure OpenAI `api-key`; `Proxy-Authorization`
/// for a proxy on the way), lower case.
pub const CREDENTIAL_HEADERS: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "x-api-key",
    "x-goog-api-key",
    "api-key",
];

#[derive(Debug, Clone)]
struct Detector {
    name: String,
    prefilter: Prefilter,
    regex: Regex,
    validator: Option<Validator>,
    /// The LLM provider whose API keys this detector finds (`openai`, `anthropic`, `gemini`), if it is such one.
    provider: Option<String>,
    /// Values that are not findings although the detector matches them (the policy's `exempt:`), lower-case globs
    /// compared with the lower-cased match.
    exempt: Vec<Glob>,
}

impl Detector {
    fn find(&self, text: &str) -> Vec<Range<usize>> {
        if !self.prefilter(text) {
            return Vec::new();
        }
        self.regex
            .find_iter(text)
            .filter(|m| self.counts(m.as_str()))
            .map(|m| m.range())
            .collect()
    }

    fn fires(&self, text: &str) -> bool {
        if !self.prefilter(text) {
            return false;
        }
        if self.validator.is_none() && self.exempt.is_empty() {
            return self.regex.is_match(text);
        }
        self.regex.find_iter(text).any(|m| self.counts(m.as_str()))
    }

    /// Whether a regex match is a finding: its validator accepts it and no exemption covers it.
    fn counts(&self, matched: &str) -> bool {
        if !self.validator.is_none_or(|v| v.accepts(matched)) {
            return false;
        }
        if self.exempt.is_empty() {
            return true;
        }
        let lower = matched.to_ascii_lowercase();
        !self.exempt.iter().any(|g| g.is_match(&lower))
    }

    fn prefilter(&self, text: &str) -> bool {
        self.prefilter.passes(text)
    }
}

/// A named set of detectors.
#[derive(Debug, Clone)]
pub struct Detectors {
    list: Vec<Detector>,
}

/// The built-in detectors: name, keywords, regex, validator, the provider whose keys they are.
type Builtin = (
    &'static str,
    &'static [&'static str],
    &'static str,
    Option<Validator>,
    Option<&'static str>,
);

const BUILTIN: &[Builtin] = &[
    (
        "aws-access-key",
        &["AKIA", "ASIA", "ABIA", "ACCA"],
        r"(?-u:\b)(?:AKIA|ASIA|ABIA|ACCA)[0-9A-Z]{16}(?-u:\b)",
        None,
        None,
    ),
    (
        "github-token",
        &["ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"],
        r"(?-u:\b)(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255})(?-u:\b)",
        None,
        None,
    ),
    (
        "openai-key",
        &["sk-"],
        r"(?-u:\b)sk-(?:(?:proj|svcacct|admin)-[A-Za-z0-9_-]{20,}|[A-Za-z0-9]{20,})",
        None,
        Some("openai"),
    ),
    (
        "anthropic-key",
        &["sk-ant-"],
        r"(?-u:\b)sk-ant-[a-z]+[0-9]*-[A-Za-z0-9_-]{20,}",
        None,
        Some("anthropic"),
    ),
    (
        "slack-token",
        &["xox"],
        r"(?-u:\b)xox[abposr]-[A-Za-z0-9-]{10,}",
        None,
        None,
    ),
    (
        "private-key",
        &["PRIVATE KEY-----"],
        r"(?s)-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\z)",
        None,
        None,
    ),
    (
        "email",
        &["@"],
        r"(?-u:\b)[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?-u:\b)",
        None,
        None,
    ),
    (
        "card-number",
        &[],
        // Payment cards start with a major industry identifier 2-6 (ISO/IEC 7812-1): Mastercard 2 and 5, Amex, JCB
        // and Diners 3, Visa 4, Discover, UnionPay and Maestro 6. Other runs of 13-19 digits that pass Luhn by chance
        // — a Unix time in milliseconds (1…) in an agent's request metadata — are not card numbers.
        r"(?-u:\b)[2-6](?:[ -]?[0-9]){12,18}(?-u:\b)",
        Some(Validator::Luhn),
        None,
    ),
];

impl Detectors {
    /// The built-in detectors: aws-access-key, github-token, openai-key, anthropic-key, slack-token, private-key,
    /// email, card-number (Luhn-validated).
    pub fn builtin() -> Detectors {
        // Compiled once per process; cloning shares the compiled regexes.
        static CACHE: std::sync::OnceLock<Detectors> = std::sync::OnceLock::new();
        CACHE
            .get_or_init(|| {
                let list = BUILTIN
                    .iter()
                    .filter_map(|(name, keywords, re, validator, provider)| {
                        // The built-in patterns are constants covered by tests; a failure would drop only that one.
                        let regex = Regex::new(re).ok()?;
                        Some(Detector {
                            name: (*name).to_owned(),
                            prefilter: Prefilter::new(
                                keywords.iter().map(|k| (*k).to_owned()).collect(),
                            ),
                            regex,
                            validator: *validator,
                            provider: provider.map(String::from),
                            exempt: Vec::new(),
                        })
                    })
                    .collect();
                Detectors { list }
            })
            .clone()
    }

    /// Add a policy-defined detector; `provider` names the LLM provider whose API keys it finds, if it does.
    pub fn add(
        &mut self,
        name: &str,
        regex: &str,
        keywords: Vec<String>,
        validator: Option<Validator>,
        provider: Option<String>,
    ) -> Result<(), DetectError> {
        if BUILTIN.iter().any(|(n, ..)| *n == name) {
            return Err(DetectError::Builtin(name.to_owned()));
        }
        let regex = regex::RegexBuilder::new(regex)
            .size_limit(1 << 20)
            .dfa_size_limit(2 << 20)
            .build()?;
        self.list.retain(|d| d.name != name);
        self.list.push(Detector {
            name: name.to_owned(),
            prefilter: Prefilter::new(keywords),
            regex,
            validator,
            provider,
            exempt: Vec::new(),
        });
        Ok(())
    }

    /// Make the values `globs` match (compared lower-case) no findings of detector `name` — a vendor's no-reply
    /// address in an agent's own instructions is no personal e-mail address. `Err(name)` when there is no such
    /// detector.
    pub fn exempt(&mut self, name: &str, globs: Vec<Glob>) -> Result<(), String> {
        match self.list.iter_mut().find(|d| d.name == name) {
            Some(d) => {
                d.exempt.extend(globs);
                Ok(())
            }
            None => Err(name.to_string()),
        }
    }

    /// Whether what detector number `i` finds in the request header `header` (lower case) is the client's own
    /// credential for `provider`, the LLM provider the request goes to: the header is a credential header and the
    /// detector finds that provider's keys. Such a value is not a finding; the same key in another header, the
    /// URL or the body, or a key of another provider, is.
    pub fn own_credential(&self, i: usize, header: &str, provider: Option<&str>) -> bool {
        let owned = self.list.get(i).and_then(|d| d.provider.as_deref());
        owned.is_some() && owned == provider && CREDENTIAL_HEADERS.contains(&header)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.list.iter().map(|d| d.name.as_str())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index(name).is_some()
    }

    /// Byte ranges in `text` where detector `name` fires (after prefilter, regex and validator).
    pub fn find(&self, name: &str, text: &str) -> Vec<Range<usize>> {
        self.index(name)
            .and_then(|i| self.list.get(i))
            .map(|d| d.find(text))
            .unwrap_or_default()
    }

    pub(crate) fn index(&self, name: &str) -> Option<usize> {
        self.list.iter().position(|d| d.name == name)
    }

    pub(crate) fn len(&self) -> usize {
        self.list.len()
    }

    /// Whether detector number `i` fires anywhere in `text`.
    pub(crate) fn fires(&self, i: usize, text: &str) -> bool {
        self.list.get(i).is_some_and(|d| d.fires(text))
    }
}

/// Luhn checksum over the digits of `text` (spaces and dashes ignored), 13 to 19 digits.
pub fn luhn(text: &str) -> bool {
    let digits: Vec<u32> = text
        .chars()
        .filter(|c| !matches!(c, ' ' | '-'))
        .map(|c| c.to_digit(10))
        .collect::<Option<Vec<u32>>>()
        .unwrap_or_default();
    if !(13..=19).contains(&digits.len()) {
        return false;
    }
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            if i % 2 == 1 {
                let dd = d * 2;
                if dd > 9 {
                    dd - 9
                } else {
                    dd
                }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fires(name: &str, text: &str) -> bool {
        !Detectors::builtin().find(name, text).is_empty()
    }

    #[test]
    fn every_builtin_compiles() {
        assert_eq!(Detectors::builtin().len(), BUILTIN.len());
    }

    #[test]
    fn builtin_detectors_fire_on_secrets_only() {
        assert!(fires("aws-access-key", "key=AKIAIOSFODNN7EXAMPLE&x"));
        assert!(!fires("aws-access-key", "AKIAshort"));
        assert!(fires(
            "github-token",
            "token ghp_0123456789abcdefghijABCDEFGHIJ012345"
        ));
        assert!(fires(
            "openai-key",
            "Bearer sk-proj-abcdefghijklmnopqrstuvwxyz012345"
        ));
        assert!(!fires(
            "openai-key",
            "sk-ant-api03-abcdefghijklmnopqrstuvwxyz"
        ));
        assert!(fires(
            "anthropic-key",
            "sk-ant-api03-abcdefghijklmnopqrstuvwxyz_0123"
        ));
        assert!(fires("slack-token", "xoxb-123456789012-abcdef"));
        assert!(fires(
            "private-key",
            "-----BEGIN RSA PRIVATE KEY-----\nMIIE\n-----END RSA PRIVATE KEY-----"
        ));
        assert!(fires("email", "write to alice@example.com today"));
        assert!(!fires("email", "a @ b"));
        assert!(fires("card-number", "card 4111 1111 1111 1111 exp"));
        assert!(!fires("card-number", "card 4111 1111 1111 1112 exp"));
        assert!(!fires("card-number", "order 1234567890123"));
        // A Unix time in milliseconds that happens to pass Luhn (one in ten does; Codex CLI sends one in its turn
        // metadata) is no card number.
        assert!(super::luhn("1796023728837"));
        assert!(!fires(
            "card-number",
            r#"{"turn_started_at_unix_ms":1796023728837}"#
        ));
    }

    #[test]
    fn find_returns_exact_ranges() {
        let text = "a AKIAIOSFODNN7EXAMPLE b";
        let r = Detectors::builtin().find("aws-access-key", text);
        assert_eq!(r.len(), 1);
        assert_eq!(&text[r[0].clone()], "AKIAIOSFODNN7EXAMPLE");
    }

    #[test]
    fn exempt_values_are_no_findings() {
        let mut d = Detectors::builtin();
        let globs = ["noreply@*", "*@users.noreply.github.com"]
            .iter()
            .map(|g| Glob::plain(g).unwrap())
            .collect();
        d.exempt("email", globs).unwrap();
        let text = "Co-Authored-By: Claude <NoReply@anthropic.com>, 1+bob@users.noreply.github.com, alice@example.com";
        let i = d.index("email").unwrap();
        let found: Vec<&str> = d
            .find("email", text)
            .into_iter()
            .map(|r| &text[r])
            .collect();
        assert_eq!(found, ["alice@example.com"]);
        assert!(d.fires(i, text));
        assert!(!d.fires(i, "attribution: noreply@anthropic.com"));
        assert_eq!(d.exempt("nope", Vec::new()), Err("nope".to_string()));
        // The built-in set itself is untouched.
        assert!(!Detectors::builtin()
            .find("email", "noreply@anthropic.com")
            .is_empty());
    }

    #[test]
    fn luhn_checks() {
        assert!(luhn("4111111111111111"));
        assert!(luhn("5500-0000-0000-0004"));
        assert!(!luhn("4111111111111112"));
        assert!(!luhn("41111"));
    }
}
