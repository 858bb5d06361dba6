//! Policy evaluation of arbitrary Actions: the input is read (libFuzzer's `arbitrary`) as an Action whose strings are
//! either taken from the shipped policies' vocabulary (hosts, methods, tools, secrets) or raw, with a JSON body
//! where the bytes parse as one, and maybe a proposed tool call or a response (the proposal and response phases).
//! Every shipped policy decides it alone and in a batch; nothing may panic and the decision of a batch is one of its
//! Actions' decisions.

#![no_main]

use enforcer::model::{
    Action, Agent, HttpRequest, HttpResponse, LlmCall, McpCall, Pairs, Proposal, Scheme, SessionState,
    Transport,
};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

const WORDS: &[&str] = &[
    "",
    "api.openai.com",
    "api.anthropic.com",
    "generativelanguage.googleapis.com",
    "api.github.com",
    "sql.internal",
    "pastebin.com",
    "GET",
    "POST",
    "HEAD",
    "/repos/acme/x",
    "/v1/messages",
    "/mcp",
    "tools/call",
    "delete_all",
    "read_file",
    "function",
    "shell",
    "mcp:fs/delete_all",
    "coding-agent",
    "AKIAIOSFODNN7EXAMPLE",
    "ghp_abcdefghijklmnopqrstuvwxyz0123456789",
    "itk_abcdefghijklmnopqrstuvwxyz012345",
    "select 1",
    "DROP TABLE t",
    "a@b.example",
    "4111 1111 1111 1111",
    "application/json",
    "*",
    "**",
    "..",
    "%2e%2e",
    "\u{0}",
    "é",
];

fn word(u: &mut Unstructured) -> Result<String> {
    if u.ratio(1, 3)? {
        u.arbitrary()
    } else {
        Ok((*u.choose(WORDS)?).to_string())
    }
}

fn opt_word(u: &mut Unstructured) -> Result<Option<String>> {
    maybe(u, word)
}

/// `Some` of what `part` reads, or `None`, as the input says.
fn maybe<T>(
    u: &mut Unstructured,
    part: impl FnOnce(&mut Unstructured) -> Result<T>,
) -> Result<Option<T>> {
    Ok(if u.arbitrary()? { Some(part(u)?) } else { None })
}

/// A word, and its JSON where it parses as JSON.
fn text(u: &mut Unstructured) -> Result<(String, Option<serde_json::Value>)> {
    let text = word(u)?;
    let json = serde_json::from_str(&text).ok();
    Ok((text, json))
}

fn pairs(u: &mut Unstructured) -> Result<Pairs> {
    let n = u.int_in_range(0..=4)?;
    (0..n)
        .map(|_| Ok((word(u)?, word(u)?)))
        .collect::<Result<_>>()
        .map(Pairs)
}

fn http(u: &mut Unstructured) -> Result<HttpRequest> {
    let (body, json) = text(u)?;
    Ok(HttpRequest {
        method: word(u)?,
        path: word(u)?,
        query: pairs(u)?,
        headers: pairs(u)?,
        content_type: opt_word(u)?,
        body_size: u.arbitrary()?,
        body: body.into(),
        json: json.map(Into::into),
        upgrade: opt_word(u)?,
    })
}

fn mcp(u: &mut Unstructured) -> Result<McpCall> {
    Ok(McpCall {
        method: word(u)?,
        tool: opt_word(u)?,
        args: text(u)?.1,
        resource: opt_word(u)?,
        session: opt_word(u)?,
    })
}

fn llm(u: &mut Unstructured) -> Result<LlmCall> {
    Ok(LlmCall {
        provider: word(u)?,
        model: opt_word(u)?,
        stream: u.arbitrary()?,
        tools: (0..u.int_in_range(0..=3)?)
            .map(|_| word(u))
            .collect::<Result<_>>()?,
        has_tool_results: u.arbitrary()?,
    })
}

fn proposal(u: &mut Unstructured) -> Result<Proposal> {
    Ok(Proposal {
        tool: word(u)?,
        kind: word(u)?,
        args: text(u)?.1,
        call_id: opt_word(u)?,
    })
}

fn response(u: &mut Unstructured) -> Result<HttpResponse> {
    let (body, json) = text(u)?;
    Ok(HttpResponse {
        status: u.arbitrary()?,
        headers: pairs(u)?,
        content_type: opt_word(u)?,
        body_size: body.len() as u64,
        body,
        json,
    })
}

fn action(u: &mut Unstructured) -> Result<Action> {
    Ok(Action {
        agent: Agent {
            profile: opt_word(u)?,
            cgroup: opt_word(u)?,
            pid: u.arbitrary()?,
            exe: opt_word(u)?,
            uid: u.arbitrary()?,
            session: opt_word(u)?,
            user: opt_word(u)?,
            groups: maybe(u, |u| Ok(vec![word(u)?]))?.unwrap_or_default(),
        }
        .into(),
        transport: Transport {
            scheme: *u.choose(&[Scheme::Http, Scheme::Https, Scheme::Tcp, Scheme::Dns])?,
            host: opt_word(u)?,
            ip: u.arbitrary()?,
            port: u.arbitrary()?,
            provider: opt_word(u)?,
        },
        http: maybe(u, http)?.map(Into::into),
        mcp: maybe(u, mcp)?,
        llm: maybe(u, llm)?,
        proposal: maybe(u, proposal)?,
        response: maybe(u, response)?,
        session: maybe(u, session)?.map(Into::into),
    })
}

fn session(u: &mut Unstructured) -> Result<SessionState> {
    let mut counts = std::collections::BTreeMap::new();
    if let Some(name) = opt_word(u)? {
        counts.insert(name, u.arbitrary()?);
    }
    Ok(SessionState {
        labels: maybe(u, |u| Ok(vec![word(u)?]))?.unwrap_or_default(),
        counts,
        previous_tool: opt_word(u)?,
    })
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let mut actions = Vec::new();
    while actions.len() < 4 {
        match action(&mut u) {
            Ok(a) => actions.push(a),
            Err(_) => break,
        }
    }
    for policy in enforcer_fuzz::policies() {
        for a in &actions {
            let d = policy.evaluate(a);
            let _ = (policy.relay(&d), enforcer::inspect::block_message(&d));
        }
        let decided = policy.decide_all(&actions);
        assert!(decided.index < decided.each.len().max(1));
    }
});
