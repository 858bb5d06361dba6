//! How a DNS query is decided. A query is an [`Action`] with scheme `dns`, host = the queried name (lower-case, no
//! trailing dot), port 53 and no HTTP part. Most policies never mention DNS, so resolving a name is decided by the
//! question "could a request to this name be allowed?":
//!
//! 1. Rules whose own `scheme:` condition lists `dns` are evaluated like any rule; if one matches, they decide
//!    (most restrictive verdict, rate limits and all).
//! 2. Otherwise a `block` rule whose only condition is `host:` and that matches the name refuses it.
//! 3. Otherwise, under `default: block`, the name resolves only when some non-block rule could match a request to
//!    it: a rule whose `host:` condition matches the name, or which has no `host:` condition. That rule is named as
//!    the deciding rule (verdict `allow`). When there is none, the default block applies.
//! 4. Under `default: allow` or `log`, the default applies.
//!
//! Rules that name `dns` are left out of steps 2 and 3: they already had their say in step 1. Only top-level
//! conditions are looked at; a `host:` nested under `any`/`all`/`not` counts as no host condition (the name
//! resolves, and the request itself is still decided in full later).
//!
//! How a refused name is answered is the policy's too: the top-level `dns: { refused_answer: ... }` key
//! ([`RefusedAnswer`]), compiled here.

use std::time::Instant;

use super::cond::{fault, CResult, Ctx};
use super::yaml::Node;
use super::{fields, Policy, Rule};
use crate::glob::Glob;
use crate::model::{Action, Decision, Reason, Scheme, Verdict};

/// How the DNS stage answers a query the policy refuses (`dns: { refused_answer: ... }`). The name is never sent
/// upstream, whichever is chosen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RefusedAnswer {
    /// A and AAAA are answered with a stand-in address (`enforcer::dns::SYNTHETIC_V4` / `SYNTHETIC_V6`), other
    /// types with no records (NODATA). A tagged agent's connection to it reaches the proxy, which refuses it with
    /// the deciding rule's message (HTTP 403 for HTTP and HTTPS) and forwards nothing. The default: the agent (and
    /// the model behind it) sees why, and nothing retries.
    #[default]
    Synthetic,
    /// NXDOMAIN: the name does not exist. Final (resolvers do not retry), but the client only learns that the name
    /// did not resolve.
    Nxdomain,
    /// REFUSED: resolvers treat it as a temporary failure and retry (glibc asks again; many clients back off and
    /// retry for seconds).
    Refused,
}

/// The policy's `dns:` settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct DnsSettings {
    pub refused_answer: RefusedAnswer,
}

/// Compile the top-level `dns:` mapping.
pub(super) fn compile_settings(node: &Node) -> CResult<DnsSettings> {
    let f = fields(node, &["refused_answer"], "`dns`")?;
    let refused_answer = match f.get("refused_answer") {
        None => RefusedAnswer::default(),
        Some((_, v)) => match v.scalar_text().as_deref() {
            Some("synthetic") => RefusedAnswer::Synthetic,
            Some("nxdomain") => RefusedAnswer::Nxdomain,
            Some("refused") => RefusedAnswer::Refused,
            _ => {
                return fault(
                    v.loc,
                    "unknown refused_answer, expected synthetic, nxdomain or refused",
                )
            }
        },
    };
    Ok(DnsSettings { refused_answer })
}

impl Policy {
    /// Decide a DNS query (scheme `dns`); see the module documentation.
    pub(super) fn evaluate_dns(&self, action: &Action, now: Instant) -> Decision {
        let cx = Ctx::new(action, &self.detectors);
        let matched: Vec<usize> = self
            .rules
            .iter()
            .enumerate()
            .filter(|(_, r)| r.when.names_scheme(Scheme::Dns) && r.when.eval(&cx))
            .map(|(i, _)| i)
            .collect();
        if !matched.is_empty() {
            return self.decide(action, &matched, now, super::Tokens::Take);
        }
        let name = cx.host.as_deref().unwrap_or("");
        let matches = |globs: &[Glob]| globs.iter().any(|g| g.is_match(name));
        let others = || {
            self.rules
                .iter()
                .filter(|r| !r.when.names_scheme(Scheme::Dns))
        };
        if let Some(rule) = others()
            .find(|r| r.verdict == Verdict::Block && r.when.only_host().is_some_and(matches))
        {
            return self.rule_decision(rule, Verdict::Block, rule.message.clone());
        }
        if self.default == Verdict::Block {
            let could_allow = others()
                .find(|r| r.verdict != Verdict::Block && r.when.host_globs().is_none_or(matches));
            if let Some(rule) = could_allow {
                return self.rule_decision(rule, Verdict::Allow, None);
            }
        }
        self.decide(action, &[], now, super::Tokens::Take)
    }

    fn rule_decision(&self, rule: &Rule, verdict: Verdict, message: Option<String>) -> Decision {
        let mut decision = self.decision(verdict, Reason::Rule);
        decision.deciding_rule = Some(rule.id.clone());
        decision.matched_rules = vec![rule.id.clone()];
        decision.message = message;
        decision
    }
}

#[cfg(test)]
mod tests {
    use crate::model::{Action, Agent, Reason, Scheme, Transport, Verdict};
    use crate::policy::Policy;

    fn query(name: &str) -> Action {
        Action {
            agent: Agent {
                profile: Some("agents".into()),
                ..Agent::default()
            }
            .into(),
            transport: Transport {
                scheme: Scheme::Dns,
                host: Some(name.into()),
                ip: None,
                port: 53,
                provider: None,
            },
            ..Action::default()
        }
    }

    fn policy(rules: &str, default: &str) -> Policy {
        let src = format!("version: 1\ndefault: {default}\nrules:\n{rules}");
        Policy::from_yaml(&src, "test.yaml").expect("policy compiles")
    }

    fn decide(p: &Policy, name: &str) -> (Verdict, Option<String>, Reason) {
        let d = p.evaluate(&query(name));
        (d.verdict, d.deciding_rule, d.reason)
    }

    const PROVIDERS: &str = r#"  - id: llm
    when: { host: [api.openai.com, "*.anthropic.com"], scheme: https }
    verdict: log
  - id: big-bodies
    when: { body.size: { gt: 1MiB } }
    verdict: block
"#;

    #[test]
    fn default_block_resolves_only_names_a_non_block_rule_could_allow() {
        let p = policy(PROVIDERS, "block");
        assert_eq!(
            decide(&p, "api.openai.com"),
            (Verdict::Allow, Some("llm".into()), Reason::Rule)
        );
        assert_eq!(decide(&p, "API.Anthropic.com.").0, Verdict::Allow);
        assert_eq!(
            decide(&p, "akiaiosfodnn7example.exfil.test"),
            (Verdict::Block, None, Reason::Default)
        );
        // The block rule without a host condition does not make every name resolvable.
        assert_eq!(decide(&p, "example.com").0, Verdict::Block);
    }

    #[test]
    fn a_non_block_rule_without_host_makes_every_name_resolvable() {
        let rules = "  - id: db\n    when: { scheme: tcp, port: 5432 }\n    verdict: allow\n";
        let p = policy(rules, "block");
        assert_eq!(
            decide(&p, "db.internal"),
            (Verdict::Allow, Some("db".into()), Reason::Rule)
        );
    }

    #[test]
    fn a_host_only_block_rule_refuses_the_name_whatever_the_default() {
        let rules = r#"  - id: anything
    verdict: allow
  - id: no-exfil
    when: { host: "*.exfil.test" }
    verdict: block
    message: no exfiltration
"#;
        for default in ["allow", "block"] {
            let p = policy(rules, default);
            assert_eq!(
                decide(&p, "x.exfil.test"),
                (Verdict::Block, Some("no-exfil".into()), Reason::Rule),
                "default {default}"
            );
            assert_eq!(decide(&p, "ok.test").0, Verdict::Allow, "default {default}");
        }
        // A block rule with more than a host condition blocks some requests, not the name.
        let rules =
            "  - id: no-post\n    when: { host: x.test, method: POST }\n    verdict: block\n";
        assert_eq!(
            decide(&policy(rules, "allow"), "x.test"),
            (Verdict::Allow, None, Reason::Default)
        );
    }

    #[test]
    fn rules_naming_dns_decide_like_any_rule() {
        let rules = r#"  - id: all-https
    when: { scheme: https }
    verdict: allow
  - id: dns-internal
    when: { scheme: dns, host: "*.corp.test" }
    verdict: log
  - id: dns-agents-blocked
    when: { scheme: [dns], profile: agents, host: "*.evil.test" }
    verdict: block
"#;
        let p = policy(rules, "block");
        assert_eq!(
            decide(&p, "a.corp.test"),
            (Verdict::Log, Some("dns-internal".into()), Reason::Rule)
        );
        assert_eq!(
            decide(&p, "a.evil.test"),
            (
                Verdict::Block,
                Some("dns-agents-blocked".into()),
                Reason::Rule
            )
        );
        // No dns rule matches: the https rule (no host condition) could allow a request to it.
        assert_eq!(
            decide(&p, "b.test"),
            (Verdict::Allow, Some("all-https".into()), Reason::Rule)
        );
    }

    #[test]
    fn a_dns_rule_can_detect_secrets_in_the_name() {
        let rules = r#"  - id: anything
    verdict: allow
  - id: no-keys-in-names
    when: { scheme: dns, detect: [aws-access-key] }
    verdict: block
"#;
        let p = policy(rules, "allow");
        assert_eq!(
            decide(&p, "akiaiosfodnn7example.attacker.example"),
            (
                Verdict::Block,
                Some("no-keys-in-names".into()),
                Reason::Rule
            )
        );
        assert_eq!(decide(&p, "example.com").0, Verdict::Allow);
    }

    #[test]
    fn refused_answer_is_set_per_policy_and_defaults_to_synthetic() {
        use crate::policy::RefusedAnswer;
        let base = "version: 1\ndefault: block\n";
        let p = Policy::from_yaml(base, "t.yaml").unwrap();
        assert_eq!(p.dns_refused_answer(), RefusedAnswer::Synthetic);
        for (text, want) in [
            ("nxdomain", RefusedAnswer::Nxdomain),
            ("refused", RefusedAnswer::Refused),
            ("synthetic", RefusedAnswer::Synthetic),
        ] {
            let src = format!("{base}dns: {{ refused_answer: {text} }}\n");
            let p = Policy::from_yaml(&src, "t.yaml").unwrap();
            assert_eq!(p.dns_refused_answer(), want);
        }
        let err = Policy::from_yaml(&format!("{base}dns:\n  refused_answer: drop\n"), "t.yaml")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("t.yaml:4:19:")
                && err.contains("expected synthetic, nxdomain or refused"),
            "{err}"
        );
        let err = Policy::from_yaml(&format!("{base}dns: {{ answer: nxdomain }}\n"), "t.yaml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown key `answer` in `dns`"), "{err}");
    }

    #[test]
    fn non_dns_actions_are_not_affected() {
        let p = policy(PROVIDERS, "block");
        let mut a = query("api.openai.com");
        a.transport.scheme = Scheme::Https;
        a.transport.port = 443;
        assert_eq!(p.evaluate(&a).verdict, Verdict::Log);
    }
}
