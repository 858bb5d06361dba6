//! Requests that receivers may read more than one way, decided under each reading. A request is forwarded when the
//! policy decides every reading alike — per Action, the same verdict from the same rule — and refused when it does
//! not: the upstream may act on a reading the enforced decision did not see. Refused by the policy's block (403, its
//! rule recorded: [`blocking`]) when the policy blocks some reading with an enforced block — that is its decision
//! for a reading the upstream may act on; else as ambiguous (400, `bad_request`), no one decision fitting every
//! reading. One record either way. The decision enforced when they agree (a constrain's rewrites included) is the
//! one for the request as the proxy parsed it; the other readings only have to agree with it. They are built only for a request that has such an ambiguity ([`build`]
//! returns none otherwise), so the common path costs one look at the fields the policy reads.
//!
//! The ambiguities, each read every way a receiver may read it:
//! - a method override (`X-HTTP-Method-Override`, `_method`: `inspect::other_methods`): the request's own method
//!   and each method it names;
//! - a header field a rule reads, given several values (several field lines, `X-Role` beside `X_Role`: CGI-style
//!   servers read both as `HTTP_X_ROLE`): each value alone (a receiver taking the first or the last) and all of
//!   them joined with `, ` (RFC 9110 §5.3: a list-valued field's lines are one list);
//! - a query parameter a rule reads, given several values: each value alone (first or last);
//! - a query with `;`: split on `&` only (WHATWG URL, most servers) and also on `;` (Rack 2, hence Rails; Python
//!   before 3.9.2; Go before 1.17), when that gives a parameter a rule reads other values;
//! - a query parameter a framework reads under a name a rule reads: as sent, and renamed as Express (qs), Rack and
//!   PHP name it (`cmd[]`, `cmd%5B%5D`, `cmd[x]` are `cmd`; PHP's `user.id`, `user id`, `user[id` are `user_id`);
//! - a backslash in the path, sent or as `%5C`: a segment character to most servers, `/` to IIS and ASP.NET.
//!
//! Every combination of the readings is decided, up to [`MAX_READINGS`] (and [`MAX_READING_BYTES`]: readings times
//! body size); a request with more is refused. The readings share the request's body and its parsed JSON
//! (`model::Shared`); what each reading holds of its own is its head and the parts of the body its Actions read (an
//! MCP element's arguments).

use super::refusal::Refusal;
use crate::inspect::InspectError;
use crate::model::{Action, Decided, HttpRequest, Mode, Pairs, Verdict};
use crate::policy::{same_header, Policy};

/// The most readings one request is decided under; a request that reads more ways is refused.
pub(crate) const MAX_READINGS: usize = 64;

/// The most body bytes all of one request's readings classify together (readings times body size): each reading is
/// classified anew, and its Actions hold what they read of the body (an MCP element's arguments), so a large body
/// that reads many ways is refused rather than read many times.
pub(crate) const MAX_READING_BYTES: usize = 32 << 20;

/// The other readings of one request, as [`build`] makes them.
#[derive(Debug, Default)]
pub(crate) struct Built {
    /// What makes the request read several ways (our words, never request data), for the refusal.
    pub kinds: Vec<&'static str>,
    /// Each reading's HTTP request, in the place of the request's own.
    pub requests: Vec<HttpRequest>,
}

/// The other readings of a request, classified (`classify::classify`): what the decide phase checks.
#[derive(Debug, Default)]
pub(crate) struct Readings {
    /// What makes the request read several ways (our words), for the refusal.
    pub kinds: Vec<&'static str>,
    /// Each reading's Actions.
    pub actions: Vec<Vec<Action>>,
}

impl Readings {
    /// Each reading decided, to be called before the request's own decision ([`agree`]): no rate-limit token is
    /// taken, so a reading sees the buckets as the enforced decision does.
    pub fn decide(&self, policy: &Policy) -> Vec<Decided> {
        self.actions
            .iter()
            .map(|a| policy.decide_reading(a))
            .collect()
    }

    /// The refusal for a request whose readings the policy decides otherwise than the request's own.
    pub fn refusal(&self) -> Refusal {
        let what = format!(
            "{}, and the policy decides the readings differently",
            self.kinds.join(", ")
        );
        super::body::refusal(&InspectError::Readings(what))
    }
}

/// Why a request's readings are not built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum Unreadable {
    /// A `_method` part of a multipart body: its value is not read.
    #[error("a method override in a multipart part")]
    MethodInPart,
    /// More combinations than [`MAX_READINGS`], or more copies of the body than [`MAX_READING_BYTES`] hold.
    #[error("too many readings to decide each")]
    TooMany,
}

/// The readings of `http` besides its own (`raw_query`: the query as sent, `http.query` its `&`-split reading), for
/// a policy reading the header fields `headers` (lower-case) and query parameters `queries`: none when it reads one
/// way only.
pub(crate) fn build<'a>(
    http: &HttpRequest,
    raw_query: &str,
    (headers, queries): (
        impl Iterator<Item = &'a str>,
        impl Iterator<Item = &'a str> + Clone,
    ),
) -> Result<Built, Unreadable> {
    let mut kinds = Vec::new();
    let others = crate::inspect::other_methods(http).ok_or(Unreadable::MethodInPart)?;
    // A first look, which copies nothing: most requests read one way only.
    let headers: Vec<&str> = headers.collect();
    let ambiguous = !others.is_empty()
        || has_backslash(&http.path)
        || raw_query.contains(';')
        || headers
            .iter()
            .any(|name| differ(crate::policy::header_values(&http.headers, name)))
        || queries.clone().any(|name| differ(http.query.get_all(name)))
        || (queries.clone().next().is_some()
            && http
                .query
                .0
                .iter()
                .any(|(k, _)| read_as(k, queries.clone()).is_some_and(|name| name != k)));
    if !ambiguous {
        return Ok(Built::default());
    }
    let mut methods = vec![http.method.clone()];
    if !others.is_empty() {
        kinds.push("a method override");
        methods.extend(others);
    }
    let mut paths = vec![http.path.clone()];
    if let Some(slashed) = backslash_as_slash(&http.path) {
        kinds.push("a backslash in the path");
        paths.push(slashed);
    }
    let mut header_sets = vec![http.headers.clone()];
    for name in headers {
        let values: Vec<&str> = crate::policy::header_values(&http.headers, name).collect();
        if differ(values.iter().copied()) {
            if !kinds.contains(&"a header given several values") {
                kinds.push("a header given several values");
            }
            let mut each: Vec<String> = Vec::new();
            for v in values
                .iter()
                .map(|v| v.to_string())
                .chain([values.join(", ")])
            {
                if !each.contains(&v) {
                    each.push(v);
                }
            }
            header_sets = product(header_sets, &each, |h, v| {
                with_only(h, name, v, same_header)
            });
            if header_sets.len() > MAX_READINGS {
                return Err(Unreadable::TooMany);
            }
        }
    }
    let mut splittings = vec![http.query.clone()];
    if raw_query.contains(';') {
        let split = crate::proxy::classify::split_query(raw_query, &['&', ';']);
        if queries
            .clone()
            .any(|q| !http.query.get_all(q).eq(split.get_all(q)))
        {
            kinds.push("a query split on `;`");
            splittings.push(split);
        }
    }
    let renamed: Vec<Pairs> = splittings
        .iter()
        .filter_map(|pairs| framework_reading(pairs, queries.clone()))
        .collect();
    if !renamed.is_empty() {
        kinds.push("a query parameter name frameworks read as another");
        splittings.extend(renamed);
    }
    let mut query_sets = Vec::new();
    for pairs in splittings {
        let mut sets = vec![pairs.clone()];
        for name in queries.clone() {
            let values: Vec<&str> = pairs.get_all(name).collect();
            if differ(values.iter().copied()) {
                if !kinds.contains(&"a query parameter given several values") {
                    kinds.push("a query parameter given several values");
                }
                let mut each: Vec<String> = Vec::new();
                for v in values {
                    if !each.iter().any(|e| e == v) {
                        each.push(v.to_string());
                    }
                }
                sets = product(sets, &each, |q, v| with_only(q, name, v, |k, n| k == n));
            }
            if sets.len() > MAX_READINGS {
                return Err(Unreadable::TooMany);
            }
        }
        query_sets.extend(sets);
    }
    if kinds.is_empty() {
        return Ok(Built::default());
    }
    let count = methods
        .len()
        .saturating_mul(paths.len())
        .saturating_mul(header_sets.len())
        .saturating_mul(query_sets.len());
    if count > MAX_READINGS || count.saturating_mul(http.body.len()) > MAX_READING_BYTES {
        return Err(Unreadable::TooMany);
    }
    let mut requests = Vec::with_capacity(count);
    for method in &methods {
        for path in &paths {
            for headers in &header_sets {
                for query in &query_sets {
                    requests.push(HttpRequest {
                        method: method.clone(),
                        path: path.clone(),
                        headers: headers.clone(),
                        query: query.clone(),
                        ..http.clone()
                    });
                }
            }
        }
    }
    Ok(Built { kinds, requests })
}

/// `pairs` with each parameter that a framework reads under a name the policy reads (`queries`) given that name; none
/// when there is no such parameter. Express (qs), Rack (hence Rails) and PHP read `NAME[]` and `NAME[KEY]…` (brackets
/// sent or percent-encoded) as `NAME`, an array or an object; PHP also reads a space or `.` in a top-level name, and
/// an unclosed `[`, as `_` (`user.id`, `user id`, `user[id` are `user_id`; leading spaces dropped).
fn framework_reading<'a>(
    pairs: &Pairs,
    queries: impl Iterator<Item = &'a str> + Clone,
) -> Option<Pairs> {
    let mut renamed = false;
    let out = pairs
        .0
        .iter()
        .map(|(k, v)| match read_as(k, queries.clone()) {
            Some(name) if name != k => {
                renamed = true;
                (name.to_string(), v.clone())
            }
            _ => (k.clone(), v.clone()),
        })
        .collect();
    renamed.then_some(Pairs(out))
}

/// The name of `queries` a framework reads the parameter `key` as, if any.
fn read_as<'a>(key: &str, mut queries: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let bracketed = bracket_base(key).filter(|b| !b.is_empty());
    let php = php_name(key);
    queries.find(|q| bracketed == Some(*q) || php == *q)
}

/// The name before a `[` that a `]` closes later (`cmd` of `cmd[x]`), as qs, Rack and PHP read it.
fn bracket_base(key: &str) -> Option<&str> {
    let open = key.find('[')?;
    key[open..].contains(']').then(|| &key[..open])
}

/// The name PHP gives a top-level parameter (`php_register_variable_ex`): leading spaces dropped, the part before a
/// closed `[`, with each space and `.` and an unclosed `[` read as `_`.
fn php_name(key: &str) -> String {
    let key = key.trim_start_matches(' ');
    let base = bracket_base(key).unwrap_or(key);
    base.chars()
        .map(|c| if matches!(c, ' ' | '.' | '[') { '_' } else { c })
        .collect()
}

/// Whether the policy decides every reading alike with the request's own decision `own`: per Action, the same
/// verdict from the same rule (the default counting as one). A reading with another number of Actions differs.
pub(crate) fn agree(own: &Decided, readings: &[Decided]) -> bool {
    readings.iter().all(|r| {
        r.each.len() == own.each.len()
            && r.each
                .iter()
                .zip(&own.each)
                .all(|(a, b)| a.verdict == b.verdict && a.deciding_rule == b.deciding_rule)
    })
}

/// The decision carried out for a request whose readings the policy decides differently ([`agree`] false) when it
/// blocks one of them with an enforced block: the request's own decision when it is that, else the first other
/// reading's block, for every Action of the request (its `each` all that block). `None` when no reading is so
/// blocked (a shadow block is not carried out): the request is refused as ambiguous ([`Readings::refusal`]).
pub(crate) fn blocking(own: &Decided, readings: &[Decided]) -> Option<Decided> {
    let blocks =
        |d: &Decided| d.decision.verdict == Verdict::Block && d.decision.mode == Mode::Enforce;
    if blocks(own) {
        return Some(own.clone());
    }
    let reading = readings.iter().find(|r| blocks(r))?;
    let actions = own.each.len();
    Some(Decided {
        decision: reading.decision.clone(),
        index: if reading.index < actions {
            reading.index
        } else {
            own.index
        },
        each: vec![reading.decision.clone(); actions],
    })
}

/// The path with each backslash, sent or percent-encoded, read as `/` (IIS, ASP.NET); `None` when it has none.
fn backslash_as_slash(path: &str) -> Option<String> {
    has_backslash(path).then(|| {
        path.replace('\\', "/")
            .replace("%5C", "/")
            .replace("%5c", "/")
    })
}

/// Whether the path has a backslash once percent-decoded (sent as `\`, or as `%5C`).
fn has_backslash(path: &str) -> bool {
    path.contains('\\') || path.contains("%5C") || path.contains("%5c")
}

/// Whether `values` are not all one.
fn differ<'v>(mut values: impl Iterator<Item = &'v str>) -> bool {
    let first = values.next();
    values.any(|v| Some(v) != first)
}

/// Each of `sets` with each of `values`, by `with`.
fn product(
    sets: Vec<Pairs>,
    values: &[String],
    with: impl Fn(&Pairs, &str) -> Pairs,
) -> Vec<Pairs> {
    sets.iter()
        .flat_map(|s| values.iter().map(|v| with(s, v)).collect::<Vec<_>>())
        .collect()
}

/// `pairs` with `name` (as `same` matches names) given `value` alone, in the place of its first value.
fn with_only(pairs: &Pairs, name: &str, value: &str, same: impl Fn(&str, &str) -> bool) -> Pairs {
    let mut out = Vec::with_capacity(pairs.0.len());
    let mut placed = false;
    for (k, v) in &pairs.0 {
        if !same(k, name) {
            out.push((k.clone(), v.clone()));
        } else if !placed {
            out.push((k.clone(), value.to_string()));
            placed = true;
        }
    }
    Pairs(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::classify::parse_query;

    fn request(method: &str, path: &str, query: &str, headers: &[(&str, &str)]) -> HttpRequest {
        HttpRequest {
            method: method.into(),
            path: path.into(),
            query: parse_query(query),
            headers: Pairs(
                headers
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..HttpRequest::default()
        }
    }

    fn readings(http: &HttpRequest, query: &str, headers: &[&str], queries: &[&str]) -> Built {
        build(
            http,
            query,
            (headers.iter().copied(), queries.iter().copied()),
        )
        .unwrap()
    }

    #[test]
    fn a_request_that_reads_one_way_has_no_other_readings() {
        let http = request(
            "POST",
            "/a",
            "mode=read&mode=read&other=1&other=2&f=a;b",
            &[("x-role", "reader"), ("x-other", "1"), ("x-other", "2")],
        );
        let r = readings(
            &http,
            "mode=read&mode=read&other=1&other=2&f=a;b",
            &["x-role"],
            &["mode"],
        );
        assert!(r.kinds.is_empty() && r.requests.is_empty(), "{r:?}");
    }

    #[test]
    fn a_header_is_read_value_by_value_and_as_one_list() {
        let http = request(
            "GET",
            "/",
            "",
            &[
                ("anthropic-beta", "a"),
                ("x-a", "1"),
                ("Anthropic_Beta", "b"),
            ],
        );
        let r = readings(&http, "", &["anthropic-beta"], &[]);
        let seen: Vec<Vec<&str>> = r
            .requests
            .iter()
            .map(|h| crate::policy::header_values(&h.headers, "anthropic-beta").collect())
            .collect();
        assert_eq!(seen, [vec!["a"], vec!["b"], vec!["a, b"]]);
        assert!(r.requests.iter().all(|h| h.headers.get("x-a") == Some("1")));
    }

    #[test]
    fn a_query_is_read_value_by_value_and_split_on_semicolons() {
        let q = "include[]=a&include[]=b";
        let r = readings(&request("GET", "/", q, &[]), q, &[], &["include[]"]);
        let seen: Vec<Vec<&str>> = r
            .requests
            .iter()
            .map(|h| h.query.get_all("include[]").collect())
            .collect();
        assert_eq!(seen, [vec!["a"], vec!["b"]]);
        let q = "mode=read;mode=write";
        let r = readings(&request("GET", "/", q, &[]), q, &[], &["mode"]);
        let seen: Vec<Vec<&str>> = r
            .requests
            .iter()
            .map(|h| h.query.get_all("mode").collect())
            .collect();
        assert_eq!(seen, [vec!["read;mode=write"], vec!["read"], vec!["write"]]);
        let q = "q=a;b";
        let r = readings(&request("GET", "/", q, &[]), q, &[], &["q"]);
        let seen: Vec<Vec<&str>> = r
            .requests
            .iter()
            .map(|h| h.query.get_all("q").collect())
            .collect();
        assert_eq!(seen, [vec!["a;b"], vec!["a"]]);
    }

    #[test]
    fn a_query_is_read_with_the_names_frameworks_give_its_parameters() {
        let read = |q: &str, names: &[&str]| {
            let r = readings(&request("GET", "/", q, &[]), q, &[], names);
            r.requests
                .iter()
                .map(|h| h.query.0.clone())
                .collect::<Vec<_>>()
        };
        let pair = |k: &str, v: &str| (k.to_string(), v.to_string());
        // The request's own reading, then the frameworks'.
        let cases = [
            ("cmd[]=id", "cmd", "cmd[]", "id"),
            ("cmd%5B%5D=id", "cmd", "cmd[]", "id"),
            ("cmd[x][y]=id", "cmd", "cmd[x][y]", "id"),
            ("user.id=0", "user_id", "user.id", "0"),
            ("user+id=0", "user_id", "user id", "0"),
            ("user[id=0", "user_id", "user[id", "0"),
        ];
        for (q, name, sent, value) in cases {
            assert_eq!(
                read(q, &[name]),
                [vec![pair(sent, value)], vec![pair(name, value)]],
                "{q}"
            );
        }
        // The plain name beside a framework's: each value alone.
        assert_eq!(
            read("cmd=ls&cmd[]=rm", &["cmd"]),
            [
                vec![pair("cmd", "ls"), pair("cmd[]", "rm")],
                vec![pair("cmd", "ls")],
                vec![pair("cmd", "rm")]
            ]
        );
        // Names no rule reads, and names read as themselves, make no other reading.
        assert!(read("filter[]=a&user.name=b", &["cmd", "user_id"]).is_empty());
        assert!(read("cmd=id", &["cmd"]).is_empty());
        assert!(read("cmd[=id&cmdx[]=1", &["cmd"]).is_empty());
    }

    #[test]
    fn overrides_and_backslashes_are_read_every_way_in_every_combination() {
        let http = request(
            "POST",
            "/admin%5Cusers",
            "",
            &[("x-http-method-override", "GET, delete")],
        );
        let r = readings(&http, "", &[], &[]);
        let seen: Vec<(&str, &str)> = r
            .requests
            .iter()
            .map(|h| (h.method.as_str(), h.path.as_str()))
            .collect();
        assert_eq!(
            seen,
            [
                ("POST", "/admin%5Cusers"),
                ("POST", "/admin/users"),
                ("GET", "/admin%5Cusers"),
                ("GET", "/admin/users"),
                ("DELETE", "/admin%5Cusers"),
                ("DELETE", "/admin/users"),
            ]
        );
        assert_eq!(r.kinds, ["a method override", "a backslash in the path"]);
    }

    #[test]
    fn the_readings_share_the_requests_body_and_json() {
        let mut http = request("POST", "/", "", &[("x-http-method-override", "GET, PUT")]);
        http.body = r#"{"a":1}"#.into();
        http.json = Some(crate::model::Shared::new(serde_json::json!({"a": 1})));
        let r = readings(&http, "", &[], &[]);
        assert_eq!(r.requests.len(), 3);
        for reading in &r.requests {
            assert!(crate::model::Shared::same(&reading.body, &http.body));
            let (mine, own) = (reading.json.as_ref(), http.json.as_ref());
            assert!(crate::model::Shared::same(mine.unwrap(), own.unwrap()));
        }
    }

    /// The policy's enforced block of any reading is carried out (the request's own first), for every Action; a
    /// shadow block or no block at all leaves the request to be refused as ambiguous.
    #[test]
    fn an_enforced_block_of_any_reading_is_the_decision() {
        use crate::model::{Decision, Reason};
        let d = |verdict: Verdict, rule: Option<&str>, mode: Mode| {
            let reason = if rule.is_some() {
                Reason::Rule
            } else {
                Reason::Default
            };
            Decision {
                deciding_rule: rule.map(str::to_string),
                matched_rules: rule.map(str::to_string).into_iter().collect(),
                ..Decision::bare(verdict, reason, mode, "h".into())
            }
        };
        let decided = |decision: Decision, n: usize| Decided {
            decision: decision.clone(),
            index: 0,
            each: vec![decision; n],
        };
        let allow = decided(d(Verdict::Allow, None, Mode::Enforce), 2);
        let logged = decided(d(Verdict::Log, Some("log-it"), Mode::Enforce), 2);
        let block = d(Verdict::Block, Some("no-deletes"), Mode::Enforce);
        let blocked = decided(block.clone(), 1);
        let shadow = decided(d(Verdict::Block, Some("no-deletes"), Mode::Shadow), 2);

        let carried = blocking(&allow, &[logged.clone(), blocked.clone()]).unwrap();
        assert_eq!(carried.decision, block);
        assert_eq!(carried.each, [block.clone(), block.clone()]);
        assert_eq!(carried.index, 0);
        let own = decided(d(Verdict::Block, Some("own"), Mode::Enforce), 2);
        assert_eq!(blocking(&own, &[blocked]), Some(own));
        assert_eq!(blocking(&allow, &[logged.clone(), shadow.clone()]), None);
        assert_eq!(blocking(&shadow, &[logged]), None);
    }

    #[test]
    fn too_many_readings_or_an_unread_override_are_refused() {
        let q: Vec<String> = (0..(MAX_READINGS + 1)).map(|i| format!("p={i}")).collect();
        let q = q.join("&");
        let http = request("GET", "/", &q, &[]);
        assert!(build(&http, &q, ([].into_iter(), ["p"].into_iter())).is_err());
        let mut large = request("POST", "/", "", &[("x-http-method-override", "GET, PUT")]);
        large.body = "x".repeat(MAX_READING_BYTES / 2).into();
        assert_eq!(
            build(&large, "", ([].into_iter(), [].into_iter())).unwrap_err(),
            Unreadable::TooMany
        );
        let mut http = request("POST", "/", "", &[]);
        http.content_type = Some("multipart/form-data; boundary=b".into());
        http.body =
            "--b\r\nContent-Disposition: form-data; name=\"_method\"\r\n\r\nPUT\r\n--b--".into();
        assert_eq!(
            build(&http, "", ([].into_iter(), [].into_iter())).unwrap_err(),
            Unreadable::MethodInPart
        );
    }
}
