//! The policy's glob dialects, compiled once: plain globs (`*` any run of characters, `?` one character), path
//! globs (`*` within one segment, `**` across segments; a trailing `/**` also matches the bare prefix) and host
//! globs (exact, `*`, or `*.suffix` meaning one or more labels before the suffix). Patterns without wildcards
//! compare as plain strings. Shared by the policy's conditions and the constrain stage's `drop_tools`.

#![forbid(unsafe_code)]

use regex::Regex;

#[derive(Debug, thiserror::Error)]
pub enum GlobError {
    #[error("empty glob, expected a pattern such as `delete_*`")]
    Empty,
    #[error("`{ch}` is not supported in globs, expected only `*`, `?` and literal characters")]
    Unsupported { ch: char },
    #[error("`***` is not a glob wildcard, expected `*` or `**`")]
    TripleStar,
    #[error("`**` must be a whole path segment (as in `/a/**/b` or `/a/**`)")]
    PartialDoubleStar,
    #[error("a host glob may only use `*` as its whole leftmost label (as in `*.example.com`)")]
    BadHostGlob,
    #[error("path globs must start with `/` or `*`")]
    RelativePath,
}

#[derive(Debug, Clone)]
pub enum Glob {
    Exact(String),
    Any,
    Suffix(String),
    /// `/a/b/**`: `/a/b` itself or anything below it (stored without the trailing `/**`).
    Subtree(String),
    Pattern(Regex),
}

impl Glob {
    pub fn is_match(&self, s: &str) -> bool {
        match self {
            Glob::Exact(e) => e == s,
            Glob::Any => true,
            Glob::Suffix(suffix) => s.len() > suffix.len() && s.ends_with(suffix.as_str()),
            Glob::Subtree(prefix) => s
                .strip_prefix(prefix.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/')),
            Glob::Pattern(re) => re.is_match(s),
        }
    }

    pub fn exact(&self) -> Option<&str> {
        match self {
            Glob::Exact(e) => Some(e),
            _ => None,
        }
    }

    /// A plain glob: `*` any characters, `?` one character.
    pub fn plain(src: &str) -> Result<Glob, GlobError> {
        check_chars(src)?;
        if src.contains("***") {
            return Err(GlobError::TripleStar);
        }
        if src == "*" {
            return Ok(Glob::Any);
        }
        if !src.contains(['*', '?']) {
            return Ok(Glob::Exact(src.to_owned()));
        }
        let mut re = String::from("(?s)^");
        for ch in src.chars() {
            match ch {
                '*' => re.push_str(".*"),
                '?' => re.push('.'),
                c => push_literal(&mut re, c),
            }
        }
        re.push('$');
        build(&re)
    }

    /// A path glob: `*` within one segment, `**` across segments.
    pub fn path(src: &str) -> Result<Glob, GlobError> {
        check_chars(src)?;
        if src.contains("***") {
            return Err(GlobError::TripleStar);
        }
        if src == "*" || src == "**" || src == "/**" {
            return Ok(Glob::Any);
        }
        if !src.starts_with('/') && !src.starts_with('*') {
            return Err(GlobError::RelativePath);
        }
        if !src.contains(['*', '?']) {
            return Ok(Glob::Exact(src.to_owned()));
        }
        if let Some(prefix) = src.strip_suffix("/**") {
            if !prefix.contains(['*', '?']) {
                return Ok(Glob::Subtree(prefix.to_owned()));
            }
        }
        let segments: Vec<&str> = src.split('/').collect();
        let mut re = String::from("(?s)^");
        let last = segments.len() - 1;
        for (i, seg) in segments.iter().enumerate() {
            if *seg == "**" {
                if i == last {
                    // `/a/**` matches `/a` and everything below it.
                    if re.ends_with('/') {
                        re.pop();
                    }
                    re.push_str("(?:/.*)?");
                } else {
                    // `/a/**/b` matches `/a/b`, `/a/x/b`, ...
                    re.push_str("(?:[^/]*/)*");
                }
                continue;
            }
            if seg.contains("**") {
                return Err(GlobError::PartialDoubleStar);
            }
            for ch in seg.chars() {
                match ch {
                    '*' => re.push_str("[^/]*"),
                    '?' => re.push_str("[^/]"),
                    c => push_literal(&mut re, c),
                }
            }
            if i != last {
                re.push('/');
            }
        }
        re.push('$');
        build(&re)
    }

    /// A host glob: exact (case-insensitive; an IP literal in its canonical spelling, `host::request_host`, which is
    /// how requests name it), `*`, or `*.suffix`.
    pub fn host(src: &str) -> Result<Glob, GlobError> {
        check_chars(src)?;
        let lower = src.trim_end_matches('.').to_ascii_lowercase();
        if lower == "*" {
            return Ok(Glob::Any);
        }
        if let Some(rest) = lower.strip_prefix("*.") {
            if rest.is_empty() || rest.contains(['*', '?']) {
                return Err(GlobError::BadHostGlob);
            }
            return Ok(Glob::Suffix(format!(".{rest}")));
        }
        if lower.contains(['*', '?']) {
            return Err(GlobError::BadHostGlob);
        }
        Ok(Glob::Exact(crate::host::request_host(&lower).into_owned()))
    }
}

/// A plain glob kept with the text it was compiled from, for what a rewrite names (`drop_tools`): compiled once,
/// shown and serialised as its text, equal when the texts are equal.
#[derive(Debug, Clone)]
pub struct NameGlob {
    text: String,
    glob: Glob,
}

impl NameGlob {
    /// Compile a plain glob (`*` any run of characters, `?` one character).
    pub fn new(text: &str) -> Result<NameGlob, GlobError> {
        Ok(NameGlob {
            text: text.to_owned(),
            glob: Glob::plain(text)?,
        })
    }

    pub fn is_match(&self, name: &str) -> bool {
        self.glob.is_match(name)
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl PartialEq for NameGlob {
    fn eq(&self, other: &NameGlob) -> bool {
        self.text == other.text
    }
}

impl std::str::FromStr for NameGlob {
    type Err = GlobError;
    fn from_str(text: &str) -> Result<NameGlob, GlobError> {
        NameGlob::new(text)
    }
}

impl std::fmt::Display for NameGlob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl serde::Serialize for NameGlob {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> serde::Deserialize<'de> for NameGlob {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<NameGlob, D::Error> {
        let text = String::deserialize(d)?;
        NameGlob::new(&text).map_err(serde::de::Error::custom)
    }
}

fn check_chars(src: &str) -> Result<(), GlobError> {
    if src.is_empty() {
        return Err(GlobError::Empty);
    }
    if let Some(ch) = src
        .chars()
        .find(|c| matches!(c, '[' | ']' | '{' | '}' | '\\'))
    {
        return Err(GlobError::Unsupported { ch });
    }
    Ok(())
}

fn push_literal(re: &mut String, c: char) {
    let mut buf = [0u8; 4];
    re.push_str(&regex::escape(c.encode_utf8(&mut buf)));
}

fn build(re: &str) -> Result<Glob, GlobError> {
    // The pattern is built from escaped literals and fixed fragments, so it always compiles; map the impossible
    // failure to an error rather than panicking.
    Regex::new(re)
        .map(Glob::Pattern)
        .map_err(|_| GlobError::Unsupported { ch: '*' })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_globs() {
        let g = Glob::path("/repos/acme/**").unwrap();
        assert!(g.is_match("/repos/acme"));
        assert!(g.is_match("/repos/acme/x/y"));
        assert!(!g.is_match("/repos/acmex"));
        assert!(!g.is_match("/repos/other/x"));
        assert!(matches!(g, Glob::Subtree(_)));
        let g = Glob::path("/*/acme/**").unwrap();
        assert!(g.is_match("/repos/acme"));
        assert!(g.is_match("/repos/acme/x/y"));
        assert!(!g.is_match("/repos/acmex"));
        let g = Glob::path("/a/*/c").unwrap();
        assert!(g.is_match("/a/b/c"));
        assert!(!g.is_match("/a/b/x/c"));
        let g = Glob::path("/a/**/c").unwrap();
        assert!(g.is_match("/a/c"));
        assert!(g.is_match("/a/b/x/c"));
        assert!(Glob::path("/a**").is_err());
        assert!(Glob::path("/a/***").is_err());
        assert!(Glob::path("/a/[ab]").is_err());
    }

    #[test]
    fn host_and_plain_globs() {
        let g = Glob::host("*.Example.com").unwrap();
        assert!(g.is_match("api.example.com"));
        assert!(g.is_match("a.b.example.com"));
        assert!(!g.is_match("example.com"));
        assert!(!g.is_match("badexample.com"));
        assert!(Glob::host("api.*.com").is_err());
        // An address is matched however the rule spells it, as requests' hosts are spelt canonically.
        assert!(Glob::host("FD00:0::7").unwrap().is_match("fd00::7"));
        assert!(Glob::host("::ffff:10.0.0.7").unwrap().is_match("10.0.0.7"));
        let g = Glob::plain("delete_*").unwrap();
        assert!(g.is_match("delete_file"));
        assert!(!g.is_match("undelete_file"));
        assert!(Glob::plain("a.b").unwrap().is_match("a.b"));
        assert!(!Glob::plain("a.?").unwrap().is_match("a.bc"));
    }

    #[test]
    fn name_globs_as_drop_tools_uses_them() {
        let m = |g: &str, n: &str| NameGlob::new(g).unwrap().is_match(n);
        assert!(m("delete_*", "delete_file"));
        assert!(m("*", ""));
        assert!(m("mcp:*", "mcp:https://x/y"));
        assert!(m("a?c*d", "abcxxd"));
        assert!(!m("delete_*", "undelete_file"));
        assert!(!m("a?c", "ac"));
        assert_eq!(NameGlob::new("x_*").unwrap().to_string(), "x_*");
    }
}
